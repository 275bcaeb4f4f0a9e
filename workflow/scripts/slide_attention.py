from pathlib import Path

from medrobust.device import select_device
from medrobust.evaluate.slide_attention import AttentionSettings, analyse_slide_attention
from medrobust.logs import script_logging
from medrobust.slide_index import read_slide_index

with script_logging(snakemake):
    statistics = snakemake.params.statistics
    analyse_slide_attention(
        Path(snakemake.input.model).parent,
        read_slide_index(snakemake.input.features, "features"),
        read_slide_index(snakemake.input.tiles, "tiles"),
        snakemake.input.dataset,
        snakemake.output[0],
        AttentionSettings.from_mapping(snakemake.params.settings),
        n_resamples=statistics["bootstrap_resamples"],
        confidence=statistics["confidence"],
        seed=statistics["seed"],
        alpha=statistics["alpha"],
        device=select_device(snakemake.params.device, threads=snakemake.threads),
    )
