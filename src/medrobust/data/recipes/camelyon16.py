"""CAMELYON16: lymph-node whole-slide images, normal or tumor, with lesion annotations.

Training slides carry their label in their name (`normal_001`, `tumor_001`);
test slides (`test_001`) take it from the reference table, one row per slide
(`test_001,Tumor,...` in the challenge's `testing/reference.csv`, or with an
`image,class,...` header and `.tif` names in the mirror's
`evaluation/reference.csv`). Tumour annotations (ASAP XML) are listed in
`lesion_annotations.csv` (`sample_id, annotation_path`).

Downloads come from a mirror of the challenge folder (default: the AWS Open
Data bucket); every slide is checked against the organisers' `checksums.md5`
in that folder. Or `root` names a copy the user has, in any layout.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Mapping, Sequence

from medrobust.data.archives import extract_archive
from medrobust.data.download import Checksum, RetryPolicy, download_file
from medrobust.data.http import RemoteFile, checksum_for, fetch_files, mirror_advice
from medrobust.data.assemble import (
    Sample,
    assign_splits,
    check_unique,
    find_one,
    link_folder,
    recipe_classes,
    source_section,
    write_samples,
    write_table,
)
from medrobust.data.manifest import begin_dataset
from medrobust.config import config_from_mapping
from medrobust.data.sources import register_source
from medrobust.errors import ConfigError, InputError
from medrobust.logs import get_logger

log = get_logger(__name__)

MIRROR = "https://camelyon-dataset.s3.us-west-2.amazonaws.com/CAMELYON16"
CHECKSUMS = "checksums.md5"
REFERENCE = "evaluation/reference.csv"
CLASSES = ("normal", "tumor")
SLIDE_ID = re.compile(r"^(normal|tumor|test)_\d{3}$")
ANNOTATION_COLUMNS = ("sample_id", "annotation_path")


@dataclass(frozen=True)
class Camelyon16Source:
    root: str | None = None                 # a local copy, any layout
    mirror: str = MIRROR                    # a folder laid out like the AWS bucket
    slides: Sequence[str] | None = None     # a subset of slide ids; default: all
    val_fraction: float = 0.1               # of the training slides, stratified
    seed: int = 0
    checksums: Mapping[str, Any] = field(default_factory=dict)  # pins, e.g. for checksums.md5
    allow_unverified: bool = False
    download: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> "Camelyon16Source":
        options = config_from_mapping(cls, mapping, "source (camelyon16)")
        if not 0 <= options.val_fraction < 1:
            raise ConfigError(f"source (camelyon16): val_fraction must be in [0, 1), not "
                              f"{options.val_fraction!r}")
        bad = [slide for slide in options.slides or () if not SLIDE_ID.match(str(slide))]
        if bad:
            raise ConfigError(f"source (camelyon16): slides must be ids like normal_001, "
                              f"tumor_001 or test_001, not {', '.join(map(str, bad))}")
        return options


@dataclass(frozen=True)
class Slides:
    """What a copy of CAMELYON16 holds: slide files, the reference table, annotations."""

    images: Mapping[str, Path]
    reference: Path
    annotations: Mapping[str, Path]
    sha256: Mapping[str, str] = field(default_factory=dict)  # known from the download


@register_source("camelyon16", Camelyon16Source)
def fetch_camelyon16(dataset_config: Mapping[str, Any], out_dir: Path) -> Path:
    options = Camelyon16Source.from_mapping(source_section(dataset_config))
    classes = recipe_classes(dataset_config, CLASSES, "camelyon16", kind="slides")
    out_dir = begin_dataset(out_dir)
    with mirror_advice("mirror", options.mirror, MIRROR):
        slides = (local_slides(link_folder(options.root, out_dir / "data"), out_dir)
                  if options.root is not None else download_slides(options, out_dir))
    wanted = set(options.slides) if options.slides else set(slides.images)
    missing = sorted(wanted - set(slides.images))
    if missing:
        raise InputError(f"CAMELYON16: no slide {', '.join(missing[:5])} in "
                         f"{options.root or options.mirror}")
    labels = read_reference(slides.reference)
    samples = []
    for slide in sorted(wanted):
        label = slide.split("_")[0] if not slide.startswith("test_") else labels.get(slide)
        if label is None:
            log.warning("%s: not in %s; left out", slide, slides.reference)
            continue
        # training slides get train or val from a stratified split below
        samples.append(Sample(slide, slides.images[slide], label,
                              "test" if slide.startswith("test_") else None,
                              slides.sha256.get(slide)))
    samples = assign_splits(samples, {"train": 1 - options.val_fraction,
                                      "val": options.val_fraction}, options.seed)
    write_table(out_dir / "lesion_annotations.csv", ANNOTATION_COLUMNS,
                [{"sample_id": s.sample_id,
                  "annotation_path": slides.annotations[s.sample_id].relative_to(out_dir)
                  .as_posix()} for s in samples if s.sample_id in slides.annotations])
    return write_samples(out_dir, samples, classes, "slides")


def read_reference(path: Path) -> dict[str, str]:
    """Slide id -> normal/tumor; InputError names a row whose class is neither."""
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        rows = [(reader.line_num, [cell.strip() for cell in row]) for row in reader
                if any(cell.strip() for cell in row)]
    if not rows:
        raise InputError(f"{path}: empty reference table")
    header = [cell.lower() for cell in rows[0][1]]
    if "image" in header and "class" in header:   # the mirror's form, with a header
        image, label, rows = header.index("image"), header.index("class"), rows[1:]
    else:                                          # the challenge's form: name,class,...
        image, label = 0, 1
    labels, first_line = {}, {}
    for line, row in rows:
        if len(row) <= max(image, label):
            raise InputError(f"{path}: line {line}: expected a slide name and a class")
        check_unique(row[image].removesuffix(".tif"), line, first_line,
                     f"{path}: line {line}")
        value = row[label].lower()
        if value not in CLASSES:
            raise InputError(f"{path}: line {line} (slide {row[image]!r}): class "
                             f"{row[label]!r} is neither Normal nor Tumor")
        labels[row[image].removesuffix(".tif")] = value
    return labels


def local_slides(data: Path, out_dir: Path) -> Slides:
    """Slides, reference table and annotations anywhere under the user's copy."""
    images = {path.stem: path for path in data.rglob("*.tif") if SLIDE_ID.match(path.stem)}
    annotations = {path.stem: path for path in data.rglob("*.xml") if SLIDE_ID.match(path.stem)}
    # the challenge's own layout ships the annotations zipped
    for index, archive in enumerate(sorted(data.rglob("lesion_annotations.zip"))):
        folder = extract_archive(archive,
                                 out_dir / "annotations" / f"{index}_{archive.parent.name}")
        annotations.update({path.stem: path for path in folder.rglob("*.xml")
                            if SLIDE_ID.match(path.stem)})
    reference = find_one(data, "reference.csv", "it comes with the test set (testing/ or "
                         "evaluation/ of the challenge data, https://camelyon17.grand-challenge"
                         ".org/Data/)")
    return Slides(images, reference, annotations)


def download_slides(options: Camelyon16Source, out_dir: Path) -> Slides:
    """Fetch the checksum list, then the reference table, the slides and their annotations."""
    section = "source (camelyon16)"
    mirror = options.mirror.rstrip("/")
    policy = RetryPolicy.from_mapping(options.download)
    # the organisers' list is what every other file is checked against; pin it if you can
    pinned = (checksum_for(CHECKSUMS, None, options.checksums, False, section)
              if CHECKSUMS in options.checksums else None)
    listing = download_file(f"{mirror}/{CHECKSUMS}", out_dir / CHECKSUMS, pinned,
                            policy=policy).path
    listed = read_md5_list(listing)
    slides = sorted(options.slides or {PurePosixPath(path).stem for path in listed
                                       if path.endswith(".tif")
                                       and SLIDE_ID.match(PurePosixPath(path).stem)})

    def remote(path: str, name: str) -> RemoteFile:
        checksum = checksum_for(PurePosixPath(path).name, listed.get(path), options.checksums,
                                options.allow_unverified, section)
        return RemoteFile.of(f"{mirror}/{path}", checksum, name=name)

    files = [remote(_listed(listed, REFERENCE, listing) or REFERENCE, "reference.csv")]
    annotated = []
    for slide in slides:
        image = _listed(listed, f"{slide}.tif", listing)
        if image is None:
            raise InputError(f"{listing}: lists no {slide}.tif")
        files.append(remote(image, f"images/{slide}.tif"))
        annotation = _listed(listed, f"{slide}.xml", listing)
        if annotation is not None:
            files.append(remote(annotation, f"annotations/{slide}.xml"))
            annotated.append(slide)
    if not annotated:
        log.warning("%s lists no annotation (.xml) for the chosen slides; none downloaded",
                    listing)
    placed = fetch_files(files, out_dir, policy)
    return Slides({slide: placed[f"images/{slide}.tif"].path for slide in slides},
                  placed["reference.csv"].path,
                  {slide: placed[f"annotations/{slide}.xml"].path for slide in annotated},
                  {slide: placed[f"images/{slide}.tif"].sha256 for slide in slides})


def read_md5_list(path: Path) -> dict[str, Checksum]:
    """`md5sum` output (`<md5>  <path>` or `<md5> *<path>`): relative path -> md5."""
    listed = {}
    for line_number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        digest, _, name = line.strip().partition(" ")
        name = name.strip().lstrip("*").removeprefix("./")
        try:
            listed[name] = Checksum("md5", digest)
        except ConfigError:
            raise InputError(f"{path}: line {line_number} is not `<md5> <path>`") from None
    if not listed:
        raise InputError(f"{path}: lists no files")
    return listed


def _listed(listed: Mapping[str, Checksum], name: str, listing: Path) -> str | None:
    """The listed path ending in `name` (a file name or a tail like evaluation/x.csv)."""
    found = [path for path in listed if path == name or path.endswith("/" + name)]
    if len(found) > 1:
        raise InputError(f"{listing}: {name} is listed {len(found)} times "
                         f"({', '.join(found[:3])}); set `mirror` to one layout")
    return found[0] if found else None
