# Image datasets become one Zarr store of fixed-size images; slide datasets
# become one Zarr store of tissue tiles per slide, with its QC picture. A slide
# left out under on_bad_input: skip still gets both (an empty store with the
# reason), so every slide's downstream jobs run and know why it is missing.


rule preprocess_images:
    input:
        "resources/{dataset}",
    output:
        directory(plan.CLEAN_STORE),
    params:
        preprocess=lambda wildcards: DATASETS[wildcards.dataset]["preprocess"],
        on_bad_input=config["on_bad_input"],
        code=code_fingerprint("preprocess", "io"),
    threads: 4
    log:
        "logs/preprocess_images/{dataset}.log",
    benchmark:
        "benchmarks/preprocess_images/{dataset}.tsv",
    conda:
        "../../envs/medrobust.yaml"
    script:
        "../scripts/preprocess_images.py"


rule tile_slide:
    input:
        "resources/{dataset}",
    output:
        tiles=directory("results/tiles/{dataset}/{slide}.zarr"),
        qc="results/tiles/{dataset}/{slide}.qc.png",
    params:
        tiling=lambda wildcards: DATASETS[wildcards.dataset]["tiling"],
        slide=slide_record,
        on_bad_input=config["on_bad_input"],
        code=code_fingerprint("preprocess", "io"),
    threads: 2
    resources:
        mem_mb=4000,
    log:
        "logs/tile_slide/{dataset}/{slide}.log",
    benchmark:
        "benchmarks/tile_slide/{dataset}/{slide}.tsv",
    conda:
        "../../envs/medrobust.yaml"
    script:
        "../scripts/tile_slide.py"
