from pathlib import Path

from medrobust.logs import script_logging
from medrobust.slide_index import write_slide_index

with script_logging(snakemake):
    write_slide_index(
        Path(snakemake.input.dataset) / "manifest.csv",
        snakemake.output[0],
        snakemake.params.stores,
    )
