# Tile embeddings per slide with a CNN backbone; on a GPU when one is free.


rule extract_features:
    input:
        "results/tiles/{dataset}/{slide}.zarr",
        weights=feature_weights_file,
    output:
        directory("results/features/{dataset}/{backbone}/{slide}.zarr"),
    params:
        features=feature_params,
        device=config["device"],
        code=code_fingerprint("features"),
    threads: 1  # start-up dominates; raise with --set-threads for big CPU runs
    resources:
        gpu=1,
        mem_mb=4000,
    log:
        "logs/extract_features/{dataset}/{backbone}/{slide}.log",
    benchmark:
        "benchmarks/extract_features/{dataset}/{backbone}/{slide}.tsv",
    conda:
        "../../envs/medrobust.yaml"
    script:
        "../scripts/extract_features.py"
