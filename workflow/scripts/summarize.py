from medrobust.logs import script_logging
from medrobust.report.summary import summarize_evaluations

with script_logging(snakemake):
    summarize_evaluations(
        snakemake.params.evaluations,
        snakemake.params.defenses,
        snakemake.params.statistics,
        out_csv=snakemake.output.csv,
        out_json=snakemake.output.json,
        per_class_csv=snakemake.output.per_class,
        comparisons_csv=snakemake.output.comparisons,
        baselines=snakemake.params.baselines,
        dataset_folders=snakemake.input.datasets,
    )
