from medrobust.logs import script_logging
from medrobust.preprocess.groups import tile_slide_group
from medrobust.preprocess.tiling import TilingConfig

with script_logging(snakemake):
    tile_slide_group(
        snakemake.input[0],
        snakemake.output[0],
        snakemake.params.slides,
        TilingConfig.from_mapping(snakemake.params.tiling),
        workers=snakemake.threads,
        on_bad_input=snakemake.params.on_bad_input,
        code=snakemake.params.code,
    )
