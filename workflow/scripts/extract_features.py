from medrobust.device import select_device
from medrobust.features.extract import FeatureConfig, extract_slide_features
from medrobust.logs import script_logging

with script_logging(snakemake):
    extract_slide_features(
        snakemake.input[0],
        snakemake.output[0],
        FeatureConfig.from_mapping(snakemake.params.features),
        device=select_device(snakemake.params.device, threads=snakemake.threads),
    )
