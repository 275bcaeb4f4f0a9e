from pathlib import Path

from medrobust.logs import get_logger, script_logging
from medrobust.slide_groups import GROUPS_FOLDER, unused_group_folders
from medrobust.slide_index import write_slide_index

with script_logging(snakemake):
    write_slide_index(
        Path(snakemake.input.dataset) / "manifest.csv",
        snakemake.output[0],
        snakemake.params.stores,
    )
    # never deleted here: they may be all a failed run has; the log says they are unused
    stage = Path(snakemake.output[0]).parent
    unused = unused_group_folders(stage, [path for paths in snakemake.params.stores.values()
                                          for path in paths])
    if unused:
        get_logger("index_slide_stores").warning(
            "%s: %d folder(s) that this run does not use (%s): left by a failed group job "
            "never rerun, or by an earlier slides_per_job; delete them to free their space",
            stage / GROUPS_FOLDER, len(unused), ", ".join(path.name for path in unused))
