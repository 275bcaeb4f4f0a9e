"""ISIC 2018 Task 3 (HAM10000): training images, the ground-truth CSV and the lesion groupings.

The ground truth is one row per image, `image,MEL,NV,BCC,AKIEC,BKL,DF,VASC`,
with 1.0 in the column of its diagnosis and 0.0 elsewhere. The 10,015 images
show 7,470 lesions, several images of some; the lesion groupings CSV
(`image,lesion_id,diagnosis_confirm_type`) says which. By default the split is
by lesion (`split_by: lesion`): all images of a lesion go to one split, so a
lesion seen in training is never tested on. `split_by: image` is the old
random split by image, for reproducing papers that split so.

`selection: skin4` is the skin study's subset: MEL, NV, BCC and BKL, NV capped
at 1,500 images drawn with the seed (by whole lesions unless split by image),
split about 5:1 train:test, stratified. No checksums are published for the
three files (docs/datasets.md): pin them, or opt in to an unverified first
download.
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
    check_unique,
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
from medrobust.logs import get_logger

log = get_logger(__name__)

BASE_URL = "https://isic-challenge-data.s3.amazonaws.com/2018"
IMAGES = "ISIC2018_Task3_Training_Input.zip"
GROUND_TRUTH = "ISIC2018_Task3_Training_GroundTruth.zip"
OFFICIAL_IMAGES = 10015   # the Task 3 training set: HAM10000
TABLE = "ISIC2018_Task3_Training_GroundTruth.csv"
GROUPINGS = "ISIC2018_Task3_Training_LesionGroupings.csv"   # a plain CSV, not zipped
CLASSES = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")   # the CSV's column order
SKIN4 = ("MEL", "NV", "BCC", "BKL")
SKIN4_NV_CAP = 1500
SKIN4_SPLITS = {"train": 5 / 6, "test": 1 / 6}
SELECTIONS = {"all": CLASSES, "skin4": SKIN4}
SPLIT_BY = ("lesion", "image")


@dataclass(frozen=True)
class ISIC2018Source:
    selection: str = "all"                    # all | skin4
    nv_cap: int | None = None                 # skin4 default: 1500
    splits: Mapping[str, float] | None = None  # skin4 default 5:1 train:test; all: 0.7/0.1/0.2
    seed: int = 0
    split_by: str = "lesion"                  # lesion | image (the old split, leaks lesions)
    root: str | None = None                   # a local copy: folder with the CSVs and the JPEGs
    base_url: str = BASE_URL                  # a mirror of the challenge's files
    checksums: Mapping[str, Any] = field(default_factory=dict)
    allow_unverified: bool = False
    download: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> "ISIC2018Source":
        options = config_from_mapping(cls, mapping, "source (isic2018)")
        check_choice("source (isic2018): selection", options.selection, SELECTIONS)
        check_choice("source (isic2018): split_by", options.split_by, SPLIT_BY)
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

    @property
    def by_lesion(self) -> bool:
        return self.split_by == "lesion"

    def remote_files(self) -> list[RemoteFile]:
        # the groupings only where they are used: `split_by: image` downloads what it did
        names = (IMAGES, GROUND_TRUTH, *((GROUPINGS,) if self.by_lesion else ()))
        return [RemoteFile.of(f"{self.base_url.rstrip('/')}/{name}",
                              checksum_for(name, None, self.checksums, self.allow_unverified,
                                           "source (isic2018)"),
                              extract=name != GROUPINGS)
                for name in names]


@register_source("isic2018", ISIC2018Source)
def fetch_isic2018(dataset_config: Mapping[str, Any], out_dir: Path) -> Path:
    options = ISIC2018Source.from_mapping(source_section(dataset_config))
    classes = recipe_classes(dataset_config, SELECTIONS[options.selection], "isic2018")
    files = [] if options.root is not None else options.remote_files()
    out_dir = begin_dataset(out_dir)
    with mirror_advice("base_url", options.base_url, BASE_URL):
        data = obtain_data(options.root, files, out_dir, options.download)
    # resolved: messages name the user's files, not their link under resources/
    table = find_one(data, TABLE, "it is in ISIC2018_Task3_Training_GroundTruth.zip, at "
                     "https://challenge.isic-archive.com/data/#2018").resolve()
    rows = read_diagnoses(table)
    warn_if_splits_differ("ISIC 2018 Task 3", {"training": len(rows)},
                          {"training": OFFICIAL_IMAGES}, "HAM10000")
    lesions = None
    if options.by_lesion:
        groupings = find_one(data, GROUPINGS, f"it is at {BASE_URL}/{GROUPINGS}; put it "
                             f"beside the ground truth, or set `split_by: image` to split by "
                             f"image (which lets a lesion's images straddle the splits)"
                             ).resolve()
        lesions = read_lesions(groupings, rows, table)
    samples = find_images(rows, table, data, classes, lesions)
    samples = cap_class(samples, "NV", options.cap, options.seed)
    samples = assign_splits(samples, options.fractions, options.seed)
    return write_samples(out_dir, samples, classes, "images")


@dataclass(frozen=True)
class Diagnosis:
    """One row of the ground truth: an image and its class."""

    line: int
    image: str
    label: str


def read_diagnoses(table: Path) -> list[Diagnosis]:
    """Every row of the ground truth; InputError names a row that is not one-hot, or a
    repeated image."""
    diagnoses, first_line = [], {}
    for line, row in read_table(table, ("image", *CLASSES)):
        where = f"{table}: line {line} (image {row['image']!r})"
        check_unique(row["image"], line, first_line, where)
        try:
            scores = [float(row[name]) for name in CLASSES]
        except ValueError:
            raise InputError(f"{where}: the class columns must hold numbers") from None
        hot = [name for name, score in zip(CLASSES, scores, strict=True) if score == 1.0]
        if len(hot) != 1 or sum(scores) != 1.0:
            raise InputError(f"{where}: expected 1.0 in exactly one of {', '.join(CLASSES)} "
                             f"and 0.0 elsewhere, got {', '.join(row[n] for n in CLASSES)}")
        diagnoses.append(Diagnosis(line, row["image"], hot[0]))
    return diagnoses


def find_images(diagnoses: list[Diagnosis], table: Path, data: Path,
                classes: tuple[str, ...] | list[str],
                lesions: Mapping[str, str] | None = None) -> list[Sample]:
    """Samples of the wanted `classes`, each in the group of its lesion (if `lesions`)."""
    images = {path.stem: path for path in data.rglob("ISIC_*.jpg")}
    samples = []
    for row in diagnoses:
        if row.label not in classes:
            continue
        if row.image not in images:
            raise InputError(f"{table}: line {row.line} (image {row.image!r}): no image "
                             f"{row.image}.jpg under {data}")
        samples.append(Sample(row.image, images[row.image], row.label,
                              group=lesions[row.image] if lesions is not None else None))
    return samples


def read_lesions(groupings: Path, diagnoses: list[Diagnosis], table: Path) -> dict[str, str]:
    """Image -> lesion id, for every image of the ground truth `table`.

    InputError names an image the groupings lack, an image listed twice, and a
    lesion whose images have two diagnoses (one lesion has one diagnosis: the
    tables do not belong together). Groupings rows of images that are not in
    the ground truth (a trimmed table) are left out, and the log says how many.
    """
    lesions, first_line = {}, {}
    for line, row in read_table(groupings, ("image", "lesion_id")):
        where = f"{groupings}: line {line} (image {row['image']!r})"
        if not row["image"] or not row["lesion_id"]:
            raise InputError(f"{where}: empty image or lesion_id cell")
        check_unique(row["image"], line, first_line, where)
        lesions[row["image"]] = row["lesion_id"]
    missing = [row for row in diagnoses if row.image not in lesions]
    if missing:
        raise InputError(f"{groupings}: no lesion for {len(missing)} image(s) of {table} "
                         f"(first: {missing[0].image}, line {missing[0].line}); the two "
                         f"tables do not match: use the challenge's files, or "
                         f"`split_by: image`")
    extra = sorted(set(lesions) - {row.image for row in diagnoses})
    if extra:
        # a ground truth trimmed on purpose is fine; a wrong file shows in the count
        log.warning("%s: %d image(s) are not in %s (first: %s); they are left out",
                    groupings, len(extra), table, extra[0])
    check_one_diagnosis(diagnoses, lesions, groupings, table)
    return {row.image: lesions[row.image] for row in diagnoses}


def check_one_diagnosis(diagnoses: list[Diagnosis], lesions: Mapping[str, str],
                        groupings: Path, table: Path) -> None:
    """InputError naming the first lesion whose images have two diagnoses, and both images."""
    first: dict[str, Diagnosis] = {}
    for row in diagnoses:
        seen = first.setdefault(lesions[row.image], row)
        if seen.label != row.label:
            raise InputError(
                f"{groupings}: lesion {lesions[row.image]} has images of two diagnoses in "
                f"{table}: {seen.image} {seen.label} (line {seen.line}) and {row.image} "
                f"{row.label} (line {row.line}); a lesion has one diagnosis, so one of the "
                f"tables is wrong")


def cap_class(samples: list[Sample], label: str, cap: int | None, seed: int) -> list[Sample]:
    """Keep about `cap` samples of `label`, drawn at random with `seed`.

    Samples without groups: exactly `cap`. Grouped samples (lesions) are kept
    or dropped whole: groups are drawn until the cap is reached or passed by
    the last one drawn, so a lesion is never cut in two.
    """
    members = sorted((s for s in samples if s.label == label), key=lambda s: s.sample_id)
    if cap is None or len(members) <= cap:
        return samples
    rng = np.random.default_rng(seed)
    if all(s.group is None for s in members):
        chosen = rng.choice(len(members), size=cap, replace=False)
        keep = {members[index].sample_id for index in chosen}
        return [s for s in samples if s.label != label or s.sample_id in keep]
    keep_groups = draw_groups(members, cap, rng)
    return [s for s in samples if s.label != label or s.group in keep_groups]


def draw_groups(members: list[Sample], cap: int, rng: np.random.Generator) -> set[str | None]:
    """Groups of `members`, in a seeded order (from sorted ids), until they hold `cap`."""
    sizes: dict[str | None, int] = {}
    for sample in members:
        sizes[sample.group] = sizes.get(sample.group, 0) + 1
    if None in sizes:
        raise ValueError("cap_class: some samples of the class have a group and some not")
    names = sorted(sizes)
    kept, count = set(), 0
    for index in rng.permutation(len(names)):
        if count >= cap:
            break
        kept.add(names[index])
        count += sizes[names[index]]
    return kept
