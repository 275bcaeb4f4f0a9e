from pathlib import Path

from medrobust.config import FEATURE_LOADER_KEYS
from medrobust.device import select_device
from medrobust.features.extract import FeatureConfig
from medrobust.features.groups import extract_group_features
from medrobust.logs import script_logging

# the loader's speed settings are resources, not params: tuning them reruns nothing
loader = {key: getattr(snakemake.resources, key) for key in FEATURE_LOADER_KEYS}
with script_logging(snakemake):
    extract_group_features(
        [Path(snakemake.input[0]) / f"{slide}.zarr" for slide in snakemake.params.slides],
        snakemake.output[0],
        FeatureConfig.from_mapping({**snakemake.params.features, **loader}),
        device=select_device(snakemake.params.device, threads=snakemake.threads),
        code=snakemake.params.code,
    )
