from medrobust.data.sources import fetch_dataset
from medrobust.logs import script_logging

with script_logging(snakemake):
    fetch_dataset(snakemake.params.dataset, snakemake.output[0])
