from pathlib import Path

from medrobust.config import FEATURE_LOADER_KEYS
from medrobust.device import select_device
from medrobust.evaluate.slide_robustness import SlideRobustnessConfig, slide_robustness_run
from medrobust.features.extract import FeatureConfig
from medrobust.logs import script_logging
from medrobust.slide_index import read_slide_index

# the loader's speed settings are resources, not params: tuning them reruns nothing
loader = {key: getattr(snakemake.resources, key) for key in FEATURE_LOADER_KEYS}
with script_logging(snakemake):
    slide_robustness_run(
        Path(snakemake.input.model).parent,
        read_slide_index(snakemake.input.features, "features", split="test"),
        read_slide_index(snakemake.input.tiles, "tiles", split="test"),
        snakemake.params.perturbed,
        snakemake.output[0],
        settings=SlideRobustnessConfig.from_mapping(snakemake.params.settings),
        features=FeatureConfig.from_mapping({**snakemake.params.features, **loader}),
        statistics=snakemake.params.statistics,
        device=select_device(snakemake.params.device, threads=snakemake.threads),
    )
