# Image datasets become one Zarr store of fixed-size images; slide datasets
# become one Zarr store of tissue tiles per slide, with its QC picture. A slide
# left out under on_bad_input: skip still gets both (an empty store with the
# reason), so every slide's downstream jobs run and know why it is missing.
# A dataset with slides_per_job > 1 is tiled a group of slides per job, into a
# folder per group (medrobust.slide_groups); the dataset's tile index lists them.


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
    priority: IMAGE_TRAINING_PRIORITY  # it heads the image chain (common.smk)
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
    wildcard_constraints:
        dataset=_alternatives(SLIDES_ONE_PER_JOB),
    params:
        job=lambda wildcards: json.dumps({"slide": slide_record(wildcards),
                                          "tiling": DATASETS[wildcards.dataset]["tiling"],
                                          "on_bad_input": config["on_bad_input"]}),
        code=code_fingerprint("preprocess", "io", "slide_jobs"),
    # a small slide's tiling is start-up-bound, and a 2-thread job waits for two free
    # cores while 1-thread jobs keep taking them (the profiles raise it for real slides)
    threads: 1
    priority: SLIDE_STUDY_PRIORITY
    resources:
        mem_mb=4000,
    log:
        "logs/tile_slide/{dataset}/{slide}.log",
    benchmark:
        "benchmarks/tile_slide/{dataset}/{slide}.tsv",
    conda:
        "../../envs/medrobust.yaml"
    # a shell command, not a script: planning one job per slide (medrobust.slide_jobs)
    shell:
        slide_job_command("tile_slide {params.job:q} {input:q} --tiles {output.tiles:q}"
                          " --qc {output.qc:q} --workers {threads} --log {log:q}")


rule tile_slide_group:
    input:
        "resources/{dataset}",
    output:
        directory(f"{TILES_STAGE}/{GROUPS_FOLDER}/{{group}}"),
    params:
        tiling=lambda wildcards: DATASETS[wildcards.dataset]["tiling"],
        slides=group_slide_records,
        on_bad_input=config["on_bad_input"],
        code=code_fingerprint("preprocess", "io"),
    threads: 1  # as tile_slide
    priority: SLIDE_STUDY_PRIORITY
    resources:
        mem_mb=4000,  # slides are tiled one after another: a slide's memory, not the group's
    log:
        "logs/tile_slide_group/{dataset}/{group}.log",
    benchmark:
        "benchmarks/tile_slide_group/{dataset}/{group}.tsv",
    conda:
        "../../envs/medrobust.yaml"
    script:
        "../scripts/tile_slide_group.py"


# Every slide's tile store and QC picture of a dataset in one index, which the jobs
# that read them all take as input (medrobust.slide_index: planning cost). With slides
# in groups it lists them in their group folders: no job per slide at all.
rule index_slide_tiles:
    input:
        stage_jobs_outputs(TILES_STAGE),
        dataset="resources/{dataset}",
    output:
        TILE_INDEX,
    params:
        stores=lambda wildcards: {"tiles": slide_outputs(TILES_STAGE, "zarr", wildcards),
                                  "qc": slide_outputs(TILES_STAGE, "qc.png", wildcards)},
        code=code_fingerprint("slide_index"),
    log:
        "logs/index_slide_tiles/{dataset}.log",
    localrule: True
    priority: SLIDE_STUDY_PRIORITY
    conda:
        "../../envs/medrobust.yaml"
    script:
        "../scripts/index_slide_stores.py"
