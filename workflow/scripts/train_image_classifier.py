from pathlib import Path

from medrobust.device import select_device
from medrobust.logs import script_logging
from medrobust.train.image_classifier import train_image_classifier

with script_logging(snakemake):
    model = dict(snakemake.params.model)
    train_image_classifier(
        snakemake.input[0],
        Path(snakemake.output.weights).parent,
        model_config=model,
        training_config=model.pop("training"),
        device=select_device(snakemake.params.device, threads=snakemake.threads),
    )
