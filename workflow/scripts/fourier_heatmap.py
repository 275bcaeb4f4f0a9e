from pathlib import Path

from medrobust.device import select_device
from medrobust.evaluate.fourier_heatmap import fourier_heatmap
from medrobust.logs import script_logging

with script_logging(snakemake):
    fourier_heatmap(
        Path(snakemake.input.model).parent,
        snakemake.input.images,
        snakemake.output[0],
        settings=snakemake.params.settings,
        seed=snakemake.params.seed,
        device=select_device(snakemake.params.device, threads=snakemake.threads),
        denoiser_dir=snakemake.params.denoiser,
    )
