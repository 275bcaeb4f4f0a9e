from pathlib import Path

from medrobust.device import select_device
from medrobust.logs import script_logging
from medrobust.train.slide_classifier import train_slide_classifier
from medrobust.slide_index import read_slide_index

with script_logging(snakemake):
    fold = snakemake.wildcards.get("fold")  # set in train_slide_fold's jobs only
    train_slide_classifier(
        read_slide_index(snakemake.input.features, "features"),
        Path(snakemake.output.weights).parent,
        model_config=snakemake.params.model,
        device=select_device(snakemake.params.device, threads=snakemake.threads),
        teacher_dir=Path(snakemake.input.teacher).parent if snakemake.input.teacher else None,
        fold=None if fold is None else int(fold),
        fold_seed=snakemake.params.get("fold_seed", 0),
    )
