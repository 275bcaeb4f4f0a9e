# Predictions and metrics of one model under every condition it is evaluated
# under (clean, each attack at each budget, each perturbation at each
# severity), in one job: the model loads once, and a condition costs a few
# forward passes where a job of its own would cost seconds of start-up. A
# model with a pixel denoiser is evaluated behind it; MagNet's detector sets
# its thresholds on the clean store's validation split.


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


rule evaluate_slide_classifier:
    input:
        model="results/models/{dataset}/{slide_model}/model.safetensors",
        features=lambda wildcards: slide_feature_stores(wildcards),
    output:
        directory(plan.EVALUATION_RUN.format(dataset="{dataset}", model="{slide_model}")),
    params:
        device=config["device"],
        code=code_fingerprint("evaluate"),
    threads: 1
    log:
        "logs/evaluate_slide_classifier/{dataset}/{slide_model}.log",
    benchmark:
        "benchmarks/evaluate_slide_classifier/{dataset}/{slide_model}.tsv",
    conda:
        "../../envs/medrobust.yaml"
    script:
        "../scripts/evaluate_slide_classifier.py"


# Where a slide classifier looks and whether its decision rests on a few tiles:
# per-tile attention, heatmaps, localisation AUC against the tumour masks, and
# re-scoring without the k most-attended (or k random) tiles, from the stored
# features. Its intervals are computed here, not in summarize: they come from
# tables only this job writes, and the bootstrap settings are its params.
rule slide_attention:
    input:
        model="results/models/{dataset}/{slide_model}/model.safetensors",
        features=slide_feature_stores,
        tiles=slide_tile_stores,
        dataset="resources/{dataset}",  # the slides (thumbnails) and tumour masks
    output:
        directory(ATTENTION_RUN),
    params:
        settings={key: value for key, value in config["slide_attention"].items() if key != "models"},
        statistics={
            "bootstrap_resamples": config["report"]["bootstrap_resamples"],
            "confidence": config["report"]["confidence"],
            "seed": config["seed"],
        },
        device=config["device"],
        code=code_fingerprint("evaluate", "io", "preprocess", "models"),
    threads: 1
    log:
        "logs/slide_attention/{dataset}/{slide_model}.log",
    benchmark:
        "benchmarks/slide_attention/{dataset}/{slide_model}.tsv",
    conda:
        "../../envs/medrobust.yaml"
    script:
        "../scripts/slide_attention.py"
