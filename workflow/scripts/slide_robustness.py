from pathlib import Path

from medrobust.device import select_device
from medrobust.evaluate.slide_robustness import SlideRobustnessConfig, slide_robustness_run
from medrobust.features.extract import FeatureConfig
from medrobust.logs import script_logging
from medrobust.slide_index import read_slide_index

with script_logging(snakemake):
    slide_robustness_run(
        Path(snakemake.input.model).parent,
        read_slide_index(snakemake.input.features, "features", split="test"),
        read_slide_index(snakemake.input.tiles, "tiles", split="test"),
        snakemake.params.perturbed,
        snakemake.output[0],
        settings=SlideRobustnessConfig.from_mapping(snakemake.params.settings),
        features=FeatureConfig.from_mapping(snakemake.params.features),
        statistics=snakemake.params.statistics,
        device=select_device(snakemake.params.device, threads=snakemake.threads),
    )
