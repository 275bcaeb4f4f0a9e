"""ISIC 2018 Task 3 (HAM10000): training images and the ground-truth CSV.

The ground truth is one row per image, `image,MEL,NV,BCC,AKIEC,BKL,DF,VASC`,
with 1.0 in the column of its diagnosis and 0.0 elsewhere. `selection: skin4`
is the skin study's subset: MEL, NV, BCC and BKL, NV capped at 1,500 images
drawn with the seed, split about 5:1 train:test, stratified. No checksums are
published for the two archives (docs/datasets.md): pin them, or opt in to an
unverified first download.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from medrobust.data.http import (
    RemoteFile,
    checksum_for,
    mirror_advice,
    obtain_data,
    warn_if_splits_differ,
)
from medrobust.data.assemble import (
    DEFAULT_SPLITS,
    Sample,
    assign_splits,
    find_one,
    read_table,
    recipe_classes,
    source_section,
    write_samples,
)
from medrobust.data.manifest import begin_dataset
from medrobust.config import config_from_mapping
from medrobust.data.sources import register_source
from medrobust.errors import ConfigError, InputError, check_choice

BASE_URL = "https://isic-challenge-data.s3.amazonaws.com/2018"
IMAGES = "ISIC2018_Task3_Training_Input.zip"
GROUND_TRUTH = "ISIC2018_Task3_Training_GroundTruth.zip"
OFFICIAL_IMAGES = 10015   # the Task 3 training set: HAM10000
TABLE = "ISIC2018_Task3_Training_GroundTruth.csv"
CLASSES = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")   # the CSV's column order
SKIN4 = ("MEL", "NV", "BCC", "BKL")
SKIN4_NV_CAP = 1500
SKIN4_SPLITS = {"train": 5 / 6, "test": 1 / 6}
SELECTIONS = {"all": CLASSES, "skin4": SKIN4}


@dataclass(frozen=True)
class ISIC2018Source:
    selection: str = "all"                    # all | skin4
    nv_cap: int | None = None                 # skin4 default: 1500
    splits: Mapping[str, float] | None = None  # skin4 default 5:1 train:test; all: 0.7/0.1/0.2
    seed: int = 0
    root: str | None = None                   # a local copy: folder with the CSV and the JPEGs
    base_url: str = BASE_URL                  # a mirror of the challenge's files
    checksums: Mapping[str, Any] = field(default_factory=dict)
    allow_unverified: bool = False
    download: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> "ISIC2018Source":
        options = config_from_mapping(cls, mapping, "source (isic2018)")
        check_choice("source (isic2018): selection", options.selection, SELECTIONS)
        if options.nv_cap is not None and (not isinstance(options.nv_cap, int)
                                           or options.nv_cap < 1):
            raise ConfigError(f"source (isic2018): nv_cap must be a positive integer, "
                              f"not {options.nv_cap!r}")
        return options

    @property
    def cap(self) -> int | None:
        if self.nv_cap is None and self.selection == "skin4":
            return SKIN4_NV_CAP
        return self.nv_cap

    @property
    def fractions(self) -> Mapping[str, float]:
        if self.splits is not None:
            return self.splits
        return SKIN4_SPLITS if self.selection == "skin4" else DEFAULT_SPLITS

    def remote_files(self) -> list[RemoteFile]:
        return [RemoteFile.of(f"{self.base_url.rstrip('/')}/{name}",
                              checksum_for(name, None, self.checksums, self.allow_unverified,
                                           "source (isic2018)"), extract=True)
                for name in (IMAGES, GROUND_TRUTH)]


@register_source("isic2018", ISIC2018Source)
def fetch_isic2018(dataset_config: Mapping[str, Any], out_dir: Path) -> Path:
    options = ISIC2018Source.from_mapping(source_section(dataset_config))
    classes = recipe_classes(dataset_config, SELECTIONS[options.selection], "isic2018")
    files = [] if options.root is not None else options.remote_files()
    out_dir = begin_dataset(out_dir)
    with mirror_advice("base_url", options.base_url, BASE_URL):
        data = obtain_data(options.root, files, out_dir, options.download)
    table = find_one(data, TABLE, "it is in ISIC2018_Task3_Training_GroundTruth.zip, at "
                     "https://challenge.isic-archive.com/data/#2018")
    warn_if_splits_differ("ISIC 2018 Task 3", {"training": len(read_table(table))},
                          {"training": OFFICIAL_IMAGES}, "HAM10000")
    samples = read_ground_truth(table, data, classes)
    samples = cap_class(samples, "NV", options.cap, options.seed)
    samples = assign_splits(samples, options.fractions, options.seed)
    return write_samples(out_dir, samples, classes, "images")


def read_ground_truth(table: Path, data: Path, classes: tuple[str, ...] | list[str]
                      ) -> list[Sample]:
    """Samples of the wanted `classes`; InputError names a row that is not one-hot."""
    rows = read_table(table, ("image", *CLASSES))
    images = {path.stem: path for path in data.rglob("ISIC_*.jpg")}
    samples = []
    for line, row in rows:
        where = f"{table}: line {line} (image {row['image']!r})"
        try:
            scores = [float(row[name]) for name in CLASSES]
        except ValueError:
            raise InputError(f"{where}: the class columns must hold numbers") from None
        hot = [name for name, score in zip(CLASSES, scores, strict=True) if score == 1.0]
        if len(hot) != 1 or sum(scores) != 1.0:
            raise InputError(f"{where}: expected 1.0 in exactly one of {', '.join(CLASSES)} "
                             f"and 0.0 elsewhere, got {', '.join(row[n] for n in CLASSES)}")
        if hot[0] not in classes:
            continue
        if row["image"] not in images:
            raise InputError(f"{where}: no image {row['image']}.jpg under {data}")
        samples.append(Sample(row["image"], images[row["image"]], hot[0]))
    return samples


def cap_class(samples: list[Sample], label: str, cap: int | None, seed: int) -> list[Sample]:
    """Keep at most `cap` samples of `label`, drawn at random with `seed`."""
    members = sorted((s for s in samples if s.label == label), key=lambda s: s.sample_id)
    if cap is None or len(members) <= cap:
        return samples
    chosen = np.random.default_rng(seed).choice(len(members), size=cap, replace=False)
    keep = {members[index].sample_id for index in chosen}
    return [s for s in samples if s.label != label or s.sample_id in keep]
