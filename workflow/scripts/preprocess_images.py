from pathlib import Path

from medrobust.logs import script_logging
from medrobust.preprocess.images import ImagePreprocessConfig, build_image_store

with script_logging(snakemake):
    build_image_store(
        Path(snakemake.input[0]) / "manifest.csv",
        snakemake.output[0],
        ImagePreprocessConfig.from_mapping(snakemake.params.preprocess),
        on_bad_input=snakemake.params.on_bad_input,
        workers=snakemake.threads,
    )
