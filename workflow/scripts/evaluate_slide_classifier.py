from pathlib import Path

from medrobust.device import select_device
from medrobust.evaluate.slide_classifier import evaluate_slide_classifier
from medrobust.logs import script_logging
from medrobust.slide_index import read_slide_index

with script_logging(snakemake):
    evaluate_slide_classifier(
        Path(snakemake.input.model).parent,
        read_slide_index(snakemake.input.features, "features"),
        snakemake.output[0],
        device=select_device(snakemake.params.device, threads=snakemake.threads),
    )
