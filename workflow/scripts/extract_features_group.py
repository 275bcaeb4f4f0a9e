from medrobust.device import select_device
from medrobust.features.extract import FeatureConfig
from medrobust.features.groups import extract_group_features
from medrobust.logs import script_logging

with script_logging(snakemake):
    extract_group_features(
        list(snakemake.input),
        snakemake.output[0],
        FeatureConfig.from_mapping(snakemake.params.features),
        device=select_device(snakemake.params.device, threads=snakemake.threads),
        code=snakemake.params.code,
    )
