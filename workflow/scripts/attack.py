from pathlib import Path

from medrobust.attacks.run import craft_attack_run
from medrobust.device import select_device
from medrobust.logs import script_logging

with script_logging(snakemake):
    craft_attack_run(
        Path(snakemake.input.model).parent,
        snakemake.input.images,
        snakemake.output[0],
        attacks=snakemake.params.attacks,
        device=select_device(snakemake.params.device, threads=snakemake.threads),
        denoiser_dir=snakemake.params.denoiser,
    )
