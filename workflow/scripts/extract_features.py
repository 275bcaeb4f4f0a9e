from medrobust.config import FEATURE_LOADER_KEYS
from medrobust.device import select_device
from medrobust.features.extract import FeatureConfig, extract_slide_features
from medrobust.logs import script_logging

# the loader's speed settings come from the config, not params: tuning them reruns nothing
loader = {key: snakemake.config["features"][key] for key in FEATURE_LOADER_KEYS}
with script_logging(snakemake):
    extract_slide_features(
        snakemake.input[0],
        snakemake.output[0],
        FeatureConfig.from_mapping({**snakemake.params.features, **loader}),
        device=select_device(snakemake.params.device, threads=snakemake.threads),
    )
