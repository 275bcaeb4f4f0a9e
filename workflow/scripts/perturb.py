from medrobust.logs import script_logging
from medrobust.perturbations.run import perturb_store

with script_logging(snakemake):
    perturb_store(
        snakemake.input[0],
        snakemake.output[0],
        name=snakemake.wildcards.perturbation,
        severity=snakemake.params.severity,
        seed=snakemake.params.seed,
    )
