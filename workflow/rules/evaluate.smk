# Predictions and metrics of one model under one condition (clean, an attack
# at one epsilon, or a perturbation at one severity).


rule evaluate_image_classifier:
    input:
        model="results/models/{dataset}/{image_model}/model.safetensors",
        images=lambda wildcards: condition_store(wildcards.dataset, wildcards.condition),
    output:
        predictions="results/evaluate/{dataset}/{image_model}/{condition}.csv",
        metrics="results/evaluate/{dataset}/{image_model}/{condition}.json",
    params:
        device=config["device"],
        code=code_fingerprint("evaluate"),
    threads: 1  # start-up dominates; raise with --set-threads for big CPU runs
    resources:
        gpu=1,
    log:
        "logs/evaluate_image_classifier/{dataset}/{image_model}/{condition}.log",
    conda:
        "../../envs/medrobust.yaml"
    script:
        "../scripts/evaluate_image_classifier.py"


rule evaluate_slide_classifier:
    input:
        model="results/models/{dataset}/{slide_model}/model.safetensors",
        features=lambda wildcards: slide_feature_stores(wildcards),
    output:
        predictions="results/evaluate/{dataset}/{slide_model}/clean.csv",
        metrics="results/evaluate/{dataset}/{slide_model}/clean.json",
    params:
        device=config["device"],
        code=code_fingerprint("evaluate"),
    threads: 1
    log:
        "logs/evaluate_slide_classifier/{dataset}/{slide_model}.log",
    conda:
        "../../envs/medrobust.yaml"
    script:
        "../scripts/evaluate_slide_classifier.py"
