from pathlib import Path

from medrobust.device import select_device
from medrobust.evaluate.image_classifier import evaluate_image_classifier
from medrobust.logs import script_logging

with script_logging(snakemake):
    evaluate_image_classifier(
        Path(snakemake.input.model).parent,
        snakemake.params.conditions,
        snakemake.input.clean,
        snakemake.output[0],
        device=select_device(snakemake.params.device, threads=snakemake.threads),
        denoiser_dir=snakemake.params.denoiser,
        detector=snakemake.params.detector,
    )
