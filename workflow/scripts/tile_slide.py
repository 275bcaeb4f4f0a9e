from pathlib import Path

from medrobust.logs import script_logging
from medrobust.preprocess.tiling import TilingConfig, tile_slide

with script_logging(snakemake):
    slide = snakemake.params.slide
    tile_slide(
        Path(snakemake.input[0]) / slide["path"],
        snakemake.output.tiles,
        TilingConfig.from_mapping(snakemake.params.tiling),
        slide_id=slide["slide_id"],
        label=slide["label"],
        split=slide["split"],
        source_sha256=slide["sha256"],
        workers=snakemake.threads,
        qc_path=snakemake.output.qc,
        on_bad_input=snakemake.params.on_bad_input,
    )
