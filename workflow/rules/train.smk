# Classifiers: image models (plain or with a defense) on the image stores,
# MIL slide models (plain or trained by MHIM-MIL) on the feature stores; pixel denoisers that image
# models sit behind, trained with the classifiers fixed.


rule train_image_classifier:
    input:
        "results/preprocessed/{dataset}.zarr",
        pretrained=pretrained_weights_file,
    output:
        weights="results/models/{dataset}/{image_model}/model.safetensors",
        config="results/models/{dataset}/{image_model}/config.json",
        history="results/models/{dataset}/{image_model}/history.json",
    params:
        model=image_model_config,
        device=config["device"],
        code=code_fingerprint("train", "models"),
    threads: 1  # so other jobs run beside it; raise with --set-threads for big CPU runs
    priority: IMAGE_TRAINING_PRIORITY
    resources:
        gpu=1,
        mem_mb=4000,
    log:
        "logs/train_image_classifier/{dataset}/{image_model}.log",
    benchmark:
        "benchmarks/train_image_classifier/{dataset}/{image_model}.tsv",
    conda:
        "../../envs/medrobust.yaml"
    script:
        "../scripts/train_image_classifier.py"


rule train_slide_classifier:
    input:
        features=CONFIGURED_FEATURE_INDEX,
        teacher=mhim_teacher_weights,  # MHIM-MIL: the trained model its teacher starts from
    output:
        weights="results/models/{dataset}/{slide_model}/model.safetensors",
        config="results/models/{dataset}/{slide_model}/config.json",
        history="results/models/{dataset}/{slide_model}/history.json",
    params:
        model=slide_model_config,
        device=config["device"],
        code=code_fingerprint("train", "models"),
    threads: 1  # start-up dominates; raise with --set-threads for big CPU runs
    # MHIM-MIL's student trains from its base model: it starts before the base model's
    # attention and robustness jobs, as the slide study's longest chain runs through it
    priority: SLIDE_STUDY_PRIORITY + 1
    resources:
        gpu=1,
        mem_mb=4000,
    log:
        "logs/train_slide_classifier/{dataset}/{slide_model}.log",
    benchmark:
        "benchmarks/train_slide_classifier/{dataset}/{slide_model}.tsv",
    conda:
        "../../envs/medrobust.yaml"
    script:
        "../scripts/train_slide_classifier.py"


# k-fold cross-validation (cv_folds): one job per fold, so folds train side by side
# (and on a cluster, on separate GPUs); its validation slides are its own fold.
rule train_slide_fold:
    input:
        features=CONFIGURED_FEATURE_INDEX,
        teacher=mhim_teacher_weights,  # MHIM-MIL: the same fold of its base model
    output:
        weights="results/models/{dataset}/{slide_model}/folds/{fold}/model.safetensors",
        config="results/models/{dataset}/{slide_model}/folds/{fold}/config.json",
        history="results/models/{dataset}/{slide_model}/folds/{fold}/history.json",
    params:
        model=slide_model_config,
        fold_seed=config["seed"],  # the same folds for every model of the dataset
        device=config["device"],
        code=code_fingerprint("train", "models"),
    threads: 1
    priority: SLIDE_STUDY_PRIORITY
    resources:
        gpu=1,
        mem_mb=4000,
    log:
        "logs/train_slide_fold/{dataset}/{slide_model}/{fold}.log",
    benchmark:
        "benchmarks/train_slide_fold/{dataset}/{slide_model}/{fold}.tsv",
    conda:
        "../../envs/medrobust.yaml"
    script:
        "../scripts/train_slide_classifier.py"


rule train_denoiser:
    input:
        unpack(denoiser_inputs),
    output:
        weights=f"{DENOISER_RUN}/model.safetensors",
        config=f"{DENOISER_RUN}/config.json",
        history=f"{DENOISER_RUN}/history.json",
    params:
        denoiser=denoiser_training,
        models=denoiser_models,
        device=config["device"],
        code=code_fingerprint("train", "models", "attacks"),  # HGD crafts its examples
    threads: 2
    resources:
        gpu=1,
        mem_mb=4000,
    log:
        "logs/train_denoiser/{dataset}/{denoiser}.log",
    conda:
        "../../envs/medrobust.yaml"
    script:
        "../scripts/train_denoiser.py"
