# Raw data for each dataset: resources/{dataset}/ with manifest.csv and
# dataset.json. A checkpoint, because the slides a dataset holds are known
# only once its manifest exists. Runs on the submit host (localrule), and the
# result may be shared between workflows with `snakemake --cache download`. A local
# source's labels table is its input: editing the table fetches the dataset again.


checkpoint download:
    input:
        source_files,
    output:
        directory("resources/{dataset}"),
    params:
        dataset=dataset_source,
        code=code_fingerprint("data"),
    log:
        "logs/download/{dataset}.log",
    localrule: True
    cache: "omit-software"
    conda:
        "../../envs/medrobust.yaml"
    script:
        "../scripts/download.py"
