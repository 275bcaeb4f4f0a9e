from medrobust.config import FEATURE_LOADER_KEYS
from medrobust.device import select_device
from medrobust.features.extract import FeatureConfig
from medrobust.logs import script_logging
from medrobust.perturbations.slide_tiles import slide_perturbation_run
from medrobust.slide_index import read_slide_index

# the loader's speed settings are resources, not params: tuning them reruns nothing
loader = {key: getattr(snakemake.resources, key) for key in FEATURE_LOADER_KEYS}
with script_logging(snakemake):
    slide_perturbation_run(
        read_slide_index(snakemake.input[0], "tiles", split="test"),
        snakemake.output[0],
        name=snakemake.wildcards.tile_perturbation,
        severities=snakemake.params.severities,
        fractions=snakemake.params.fractions,
        seed=snakemake.params.seed,
        features=FeatureConfig.from_mapping({**snakemake.params.features, **loader}),
        params=snakemake.params.settings,
        device=select_device(snakemake.params.device, threads=snakemake.threads),
    )
