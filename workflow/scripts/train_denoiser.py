from pathlib import Path

from medrobust.device import select_device
from medrobust.logs import script_logging
from medrobust.train.denoiser import train_denoiser

with script_logging(snakemake):
    train_denoiser(
        snakemake.input.images,
        Path(snakemake.output.weights).parent,
        settings=snakemake.params.denoiser,
        models=snakemake.params.models,
        device=select_device(snakemake.params.device, threads=snakemake.threads),
    )
