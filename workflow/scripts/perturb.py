from medrobust.device import select_device
from medrobust.logs import script_logging
from medrobust.perturbations.run import perturbation_run

with script_logging(snakemake):
    perturbation_run(
        snakemake.input[0],
        snakemake.output[0],
        name=snakemake.wildcards.perturbation,
        severities=snakemake.params.severities,
        seed=snakemake.params.seed,
        params=snakemake.params.settings,
        device=select_device(snakemake.params.device, threads=snakemake.threads),
    )
