from pathlib import Path

from medrobust.device import select_device
from medrobust.logs import script_logging
from medrobust.train.slide_classifier import train_slide_classifier

with script_logging(snakemake):
    train_slide_classifier(
        list(snakemake.input.features),
        Path(snakemake.output.weights).parent,
        model_config=snakemake.params.model,
        device=select_device(snakemake.params.device, threads=snakemake.threads),
        teacher_dir=Path(snakemake.input.teacher).parent if snakemake.input.teacher else None,
    )
