# Adversarial test images crafted on a source model (white-box when the
# source is the evaluated model itself, black-box transfer otherwise), and
# model-independent perturbations of the test images. One job per source model
# covers every attack at every budget, one per perturbation every severity. A source
# with a pixel denoiser is attacked through it.


rule attack:
    input:
        model="results/models/{dataset}/{source}/model.safetensors",
        images=plan.CLEAN_STORE,
        denoiser=lambda wildcards: denoiser_weights(wildcards.source),
    output:
        directory(plan.ATTACK_RUN),
    params:
        attacks=config["attacks"],
        denoiser=lambda wildcards: denoiser_folder(wildcards.source),
        device=config["device"],
        code=code_fingerprint("attacks"),
    threads: 1  # start-up dominates; raise with --set-threads for big CPU runs
    resources:
        gpu=1,
        mem_mb=4000,
    log:
        "logs/attack/{dataset}/from_{source}.log",
    benchmark:
        "benchmarks/attack/{dataset}/from_{source}.tsv",
    conda:
        "../../envs/medrobust.yaml"
    script:
        "../scripts/attack.py"


rule perturb:
    input:
        plan.CLEAN_STORE,
    output:
        directory(plan.PERTURBATION_RUN),
    params:
        severities=lambda wildcards: config["perturbations"][wildcards.perturbation]["severities"],
        settings=lambda wildcards: perturbation_settings(wildcards.perturbation),
        seed=config["seed"],
        device=config["device"],
        code=code_fingerprint("perturbations"),
    threads: 1
    resources:
        gpu=1,
    log:
        "logs/perturb/{dataset}/{perturbation}.log",
    benchmark:
        "benchmarks/perturb/{dataset}/{perturbation}.tsv",
    conda:
        "../../envs/medrobust.yaml"
    script:
        "../scripts/perturb.py"


# Slide robustness: one job per tile perturbation of a slide dataset perturbs a seeded
# fraction (the largest configured) of every test slide's tiles at every severity and
# embeds them again; all slide models of the dataset share these features (docs/mil.md).


rule perturb_slide_tiles:
    input:
        TILE_INDEX,
    output:
        directory(plan.SLIDE_PERTURBATION_RUN),
    params:
        severities=lambda wildcards: tile_perturbations()[wildcards.tile_perturbation]["severities"],
        settings=lambda wildcards: perturbation_settings(wildcards.tile_perturbation, tile_perturbations()),
        fractions=lambda wildcards: config["slide_robustness"]["fractions"],
        features=lambda wildcards: {**FEATURE_PARAMS, "backbone": wildcards.backbone},
        seed=config["seed"],
        device=config["device"],
        code=code_fingerprint("perturbations", "features"),
    threads: 1
    priority: SLIDE_STUDY_PRIORITY
    resources:
        gpu=1,
        mem_mb=4000,
        **FEATURE_LOADER,
    log:
        "logs/perturb_slide_tiles/{dataset}/{backbone}/{tile_perturbation}.log",
    benchmark:
        "benchmarks/perturb_slide_tiles/{dataset}/{backbone}/{tile_perturbation}.tsv",
    conda:
        "../../envs/medrobust.yaml"
    script:
        "../scripts/perturb_slide_tiles.py"
