# Tile embeddings per slide with a CNN backbone; on a GPU when one is free.
# A dataset with slides_per_job > 1 is embedded a group of slides per job, from its
# tiling group's folder into a folder of its own (medrobust.slide_groups).


rule extract_features:
    input:
        tiles="results/tiles/{dataset}/{slide}.zarr",
        weights=FEATURE_WEIGHTS_FILE,
    output:
        directory("results/features/{dataset}/{backbone}/{slide}.zarr"),
    wildcard_constraints:
        dataset=_alternatives(SLIDES_ONE_PER_JOB),
    params:
        job=lambda wildcards: FEATURE_JOB,  # a function: Snakemake leaves its braces alone
        code=code_fingerprint("features", "slide_jobs"),
    threads: 1  # start-up dominates; raise with --set-threads for big CPU runs
    priority: SLIDE_STUDY_PRIORITY
    resources:
        gpu=1,
        mem_mb=4000,
        **FEATURE_LOADER,
    log:
        "logs/extract_features/{dataset}/{backbone}/{slide}.log",
    benchmark:
        "benchmarks/extract_features/{dataset}/{backbone}/{slide}.tsv",
    conda:
        "../../envs/medrobust.yaml"
    # a shell command, not a script: planning one job per slide (medrobust.slide_jobs)
    shell:
        slide_job_command("extract_features {params.job:q} {input.tiles:q} --features {output:q}"
                          " --loader-workers {resources.loader_workers}"
                          " --prefetch-batches {resources.prefetch_batches}"
                          " --threads {threads} --log {log:q}")


rule extract_features_group:
    input:
        f"{TILES_STAGE}/{GROUPS_FOLDER}/{{group}}",
        weights=FEATURE_WEIGHTS_FILE,
    output:
        directory(f"{FEATURES_STAGE}/{GROUPS_FOLDER}/{{group}}"),
    params:
        slides=group_members,
        features=FEATURE_PARAMS,
        device=config["device"],
        code=code_fingerprint("features"),
    threads: 1
    priority: SLIDE_STUDY_PRIORITY
    resources:
        gpu=1,
        mem_mb=4000,  # slides are embedded one after another
        **FEATURE_LOADER,
    log:
        "logs/extract_features_group/{dataset}/{backbone}/{group}.log",
    benchmark:
        "benchmarks/extract_features_group/{dataset}/{backbone}/{group}.tsv",
    conda:
        "../../envs/medrobust.yaml"
    script:
        "../scripts/extract_features_group.py"


# Every slide's feature store of a dataset in one index, as index_slide_tiles.
rule index_slide_features:
    input:
        stage_jobs_outputs(FEATURES_STAGE),
        dataset="resources/{dataset}",
    output:
        FEATURE_INDEX,
    params:
        stores=lambda wildcards: {"features": slide_outputs(FEATURES_STAGE, "zarr", wildcards)},
        code=code_fingerprint("slide_index"),
    log:
        "logs/index_slide_features/{dataset}/{backbone}.log",
    localrule: True
    priority: SLIDE_STUDY_PRIORITY
    conda:
        "../../envs/medrobust.yaml"
    script:
        "../scripts/index_slide_stores.py"
