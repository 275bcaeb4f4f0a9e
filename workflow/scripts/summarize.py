from medrobust.logs import script_logging
from medrobust.report.summary import summarize_metrics

with script_logging(snakemake):
    summarize_metrics(list(snakemake.input), snakemake.output.csv, snakemake.output.json)
