# Predictions and metrics of one model under every condition it is evaluated
# under (clean, each attack at each budget, each perturbation at each
# severity), in one job: the model loads once, and a condition costs a few
# forward passes where a job of its own would cost seconds of start-up. A
# model with a pixel denoiser is evaluated behind it. On the clean store's
# validation split the job chooses the model's operating point, and MagNet's
# detector sets its thresholds.


rule evaluate_image_classifier:
    input:
        model="results/models/{dataset}/{image_model}/model.safetensors",
        images=lambda wildcards: plan.model_condition_runs(config, wildcards.image_model),
        clean=plan.CLEAN_STORE,
        denoiser=lambda wildcards: denoiser_weights(wildcards.image_model),
    output:
        directory(plan.EVALUATION_RUN.format(dataset="{dataset}", model="{image_model}")),
    params:
        conditions=lambda wildcards: plan.model_condition_stores(config, wildcards.image_model),
        denoiser=lambda wildcards: denoiser_folder(wildcards.image_model),
        detector=lambda wildcards: detector_settings(wildcards.image_model),
        device=config["device"],
        code=code_fingerprint("evaluate"),
    threads: 1  # start-up dominates; raise with --set-threads for big CPU runs
    resources:
        gpu=1,
    log:
        "logs/evaluate_image_classifier/{dataset}/{image_model}.log",
    benchmark:
        "benchmarks/evaluate_image_classifier/{dataset}/{image_model}.tsv",
    conda:
        "../../envs/medrobust.yaml"
    script:
        "../scripts/evaluate_image_classifier.py"


# The Fourier heat map of one model: its error rate under Fourier-basis noise at
# every frequency of a grid, in one job that perturbs the clean test split in
# memory (docs/perturbations.md).


rule fourier_heatmap:
    input:
        model="results/models/{dataset}/{image_model}/model.safetensors",
        images=plan.CLEAN_STORE,
        denoiser=lambda wildcards: denoiser_weights(wildcards.image_model),
    output:
        plan.FOURIER_HEATMAP.format(dataset="{dataset}", model="{image_model}"),
    params:
        settings=config.get("fourier_heatmap"),
        seed=config["seed"],
        denoiser=lambda wildcards: denoiser_folder(wildcards.image_model),
        device=config["device"],
        code=code_fingerprint("evaluate", "perturbations"),
    threads: 1
    resources:
        gpu=1,
    log:
        "logs/fourier_heatmap/{dataset}/{image_model}.log",
    benchmark:
        "benchmarks/fourier_heatmap/{dataset}/{image_model}.tsv",
    conda:
        "../../envs/medrobust.yaml"
    script:
        "../scripts/fourier_heatmap.py"


rule evaluate_slide_classifier:
    input:
        model="results/models/{dataset}/{slide_model}/model.safetensors",
        features=CONFIGURED_FEATURE_INDEX,
    output:
        directory(plan.EVALUATION_RUN.format(dataset="{dataset}", model="{slide_model}")),
    params:
        device=config["device"],
        code=code_fingerprint("evaluate"),
    threads: 1
    priority: SLIDE_STUDY_PRIORITY
    log:
        "logs/evaluate_slide_classifier/{dataset}/{slide_model}.log",
    benchmark:
        "benchmarks/evaluate_slide_classifier/{dataset}/{slide_model}.tsv",
    conda:
        "../../envs/medrobust.yaml"
    script:
        "../scripts/evaluate_slide_classifier.py"


# Every cross-validation fold's model on the fixed test split; the mean and spread across folds.
rule evaluate_slide_folds:
    input:
        folds=cv_fold_weights,
        features=CONFIGURED_FEATURE_INDEX,
    output:
        json="results/cv/{dataset}/{slide_model}.json",
        csv="results/cv/{dataset}/{slide_model}.csv",
    params:
        device=config["device"],
        code=code_fingerprint("evaluate"),
    threads: 1
    priority: SLIDE_STUDY_PRIORITY
    log:
        "logs/evaluate_slide_folds/{dataset}/{slide_model}.log",
    benchmark:
        "benchmarks/evaluate_slide_folds/{dataset}/{slide_model}.tsv",
    conda:
        "../../envs/medrobust.yaml"
    script:
        "../scripts/evaluate_slide_folds.py"


# The mammography study's microcalcification analysis: per dataset with lesion
# annotations, each lesion's visibility on the test images at every low-pass
# radius, beside the models' sensitivity on calcification-only and mass-only
# positives read from their evaluations. No model runs here: numpy only.
rule lesion_visibility:
    input:
        dataset="resources/{dataset}",
        images=plan.CLEAN_STORE,
        evaluations=lambda wildcards: LESION_PLANS[wildcards.dataset]["evaluation_runs"],
    output:
        directory(plan.LESION_VISIBILITY_RUN),
    params:
        radii=lambda wildcards: LESION_PLANS[wildcards.dataset]["radii"],
        evaluations=lambda wildcards: LESION_PLANS[wildcards.dataset]["evaluations"],
        settings=config["lesion_visibility"],
        confidence=config["report"]["confidence"],
        code=code_fingerprint("evaluate", "data", "perturbations", "preprocess"),
    threads: 1
    log:
        "logs/lesion_visibility/{dataset}.log",
    benchmark:
        "benchmarks/lesion_visibility/{dataset}.tsv",
    conda:
        "../../envs/medrobust.yaml"
    script:
        "../scripts/lesion_visibility.py"


# A slide model on its test slides with a fraction of their tiles perturbed (features
# from perturb_slide_tiles) and with PGD on its most-attended tiles, every condition in
# one job; metrics with intervals (docs/mil.md, "Robustness of slide models").
rule slide_robustness:
    input:
        model="results/models/{dataset}/{slide_model}/model.safetensors",
        features=CONFIGURED_FEATURE_INDEX,
        tiles=TILE_INDEX,
        perturbed=lambda wildcards: list(slide_perturbation_runs(wildcards).values()),
    output:
        directory(plan.SLIDE_ROBUSTNESS_RUN.format(dataset="{dataset}", model="{slide_model}")),
    params:
        settings=slide_robustness_settings,
        perturbed=slide_perturbation_runs,
        features=FEATURE_PARAMS,
        statistics=INTERVAL_SETTINGS,
        device=config["device"],
        code=code_fingerprint("evaluate", "attacks", "perturbations", "features"),
    threads: 1
    priority: SLIDE_STUDY_PRIORITY
    resources:
        gpu=1,
        **FEATURE_LOADER,
    log:
        "logs/slide_robustness/{dataset}/{slide_model}.log",
    benchmark:
        "benchmarks/slide_robustness/{dataset}/{slide_model}.tsv",
    conda:
        "../../envs/medrobust.yaml"
    script:
        "../scripts/slide_robustness.py"


# Where a slide classifier looks and whether its decision rests on a few tiles:
# per-tile attention, heatmaps, localisation AUC against the tumour masks, and
# re-scoring without the k most-attended (or k random) tiles, from the stored
# features. Its intervals are computed here, not in summarize: they come from
# tables only this job writes, and the bootstrap settings are its params.
rule slide_attention:
    input:
        model="results/models/{dataset}/{slide_model}/model.safetensors",
        features=CONFIGURED_FEATURE_INDEX,
        tiles=TILE_INDEX,
        dataset="resources/{dataset}",  # the slides (thumbnails) and tumour masks
    output:
        directory(ATTENTION_RUN),
    params:
        settings={key: value for key, value in config["slide_attention"].items() if key != "models"},
        statistics=COMPARISON_SETTINGS,
        device=config["device"],
        code=code_fingerprint("evaluate", "io", "preprocess", "models"),
    threads: 1
    priority: SLIDE_STUDY_PRIORITY
    log:
        "logs/slide_attention/{dataset}/{slide_model}.log",
    benchmark:
        "benchmarks/slide_attention/{dataset}/{slide_model}.tsv",
    conda:
        "../../envs/medrobust.yaml"
    script:
        "../scripts/slide_attention.py"
