from pathlib import Path

from medrobust.attacks.run import craft_attack_run
from medrobust.device import select_device
from medrobust.logs import script_logging

with script_logging(snakemake):
    craft_attack_run(
        Path(snakemake.input.model).parent,
        snakemake.input.images,
        snakemake.output[0],
        attack_name=snakemake.wildcards.attack,
        epsilons=snakemake.params.epsilons,
        attack_params=snakemake.params.settings,
        device=select_device(snakemake.params.device, threads=snakemake.threads),
        denoiser_dir=snakemake.params.denoiser,
    )
