from medrobust.evaluate.lesion_visibility import lesion_visibility_run
from medrobust.logs import script_logging

with script_logging(snakemake):
    lesion_visibility_run(
        snakemake.input.dataset,
        snakemake.input.images,
        snakemake.output[0],
        radii=snakemake.params.radii,
        evaluations=snakemake.params.evaluations,
        settings=snakemake.params.settings,
        confidence=snakemake.params.confidence,
    )
