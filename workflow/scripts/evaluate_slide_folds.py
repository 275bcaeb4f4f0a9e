from pathlib import Path

from medrobust.device import select_device
from medrobust.evaluate.cross_validation import evaluate_folds
from medrobust.logs import script_logging
from medrobust.slide_index import read_slide_index

with script_logging(snakemake):
    evaluate_folds(
        [Path(weights).parent for weights in snakemake.input.folds],
        read_slide_index(snakemake.input.features, "features"),
        snakemake.output.json,
        snakemake.output.csv,
        device=select_device(snakemake.params.device, threads=snakemake.threads),
    )
