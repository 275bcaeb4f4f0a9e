# Adversarial test images crafted on a source model (white-box when the
# source is the evaluated model itself, black-box transfer otherwise), and
# model-independent perturbations of the test images.


rule attack:
    input:
        model="results/models/{dataset}/{source}/model.safetensors",
        images="results/preprocessed/{dataset}.zarr",
    output:
        directory("results/attacks/{dataset}/{attack}/eps{eps}/from_{source}.zarr"),
    params:
        settings=attack_settings,
        device=config["device"],
    threads: 1  # start-up dominates; raise with --set-threads for big CPU runs
    resources:
        gpu=1,
        mem_mb=4000,
    log:
        "logs/attack/{dataset}/{attack}/eps{eps}/from_{source}.log",
    conda:
        "../../envs/medrobust.yaml"
    script:
        "../scripts/attack.py"


rule perturb:
    input:
        "results/preprocessed/{dataset}.zarr",
    output:
        directory("results/perturbations/{dataset}/{perturbation}/severity{severity}.zarr"),
    params:
        seed=config["seed"],
    threads: 1
    log:
        "logs/perturb/{dataset}/{perturbation}/severity{severity}.log",
    conda:
        "../../envs/medrobust.yaml"
    script:
        "../scripts/perturb.py"
