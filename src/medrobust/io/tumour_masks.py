"""Tumour masks of a slide dataset, from whichever annotations its source wrote.

- Synthetic slides: `annotations.csv` (`sample_id, mask_path, mask_downsample`),
  a PNG per slide, one pixel per `mask_downsample` level-0 pixels.
- CAMELYON16: `lesion_annotations.csv` (`sample_id, annotation_path`), ASAP XML
  polygons in level-0 pixels, rasterised here at the downsample asked for.
  As in the challenge's own evaluation code, polygons of group `_2`
  (exclusion: normal tissue inside a tumour outline) are cut out of the
  polygons of every other group.

A slide without an entry has no mask (for CAMELYON16: every normal slide,
whose tumour mask would be empty; it is read as "unknown", not "empty").
"""

from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from medrobust.errors import InputError

SYNTHETIC_TABLE = "annotations.csv"
CAMELYON_TABLE = "lesion_annotations.csv"
EXCLUSION_GROUPS = ("_2", "Exclusion")


@dataclass(frozen=True)
class TumourMask:
    mask: np.ndarray     # bool (height, width)
    downsample: float    # level-0 pixels per mask pixel


def _read_table(path: Path, columns: tuple[str, ...]) -> dict[str, dict]:
    try:
        table = pd.read_csv(path, dtype={"sample_id": str})
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: unreadable annotation table ({error})") from error
    missing = [column for column in columns if column not in table]
    if missing:
        raise InputError(f"{path}: annotation table lacks the columns {', '.join(missing)}")
    return {row["sample_id"]: row for row in table.to_dict("records")}


class TumourAnnotations:
    """The annotations of one dataset folder (`resources/{dataset}`)."""

    def __init__(self, dataset_dir: str | os.PathLike):
        self.dataset_dir = Path(dataset_dir)
        synthetic, camelyon = self.dataset_dir / SYNTHETIC_TABLE, self.dataset_dir / CAMELYON_TABLE
        self.pngs = (_read_table(synthetic, ("sample_id", "mask_path", "mask_downsample"))
                     if synthetic.is_file() else {})
        self.polygons = (_read_table(camelyon, ("sample_id", "annotation_path"))
                         if camelyon.is_file() else {})

    @property
    def available(self) -> bool:
        """Whether the dataset has any tumour annotation at all."""
        return bool(self.pngs or self.polygons)

    def mask(self, slide_id: str, level0_size: tuple[int, int],
             downsample: float) -> TumourMask | None:
        """The slide's tumour mask, or None without an annotation.

        `level0_size` (width, height) and `downsample` set the raster of polygon
        annotations; a PNG mask keeps its own.
        """
        if slide_id in self.pngs:
            row = self.pngs[slide_id]
            path = self.dataset_dir / row["mask_path"]
            try:
                with Image.open(path) as image:
                    mask = np.asarray(image.convert("L")) > 127
            except OSError as error:
                raise InputError(f"{path}: unreadable tumour mask ({error})") from error
            return TumourMask(mask, float(row["mask_downsample"]))
        if slide_id in self.polygons:
            path = self.dataset_dir / self.polygons[slide_id]["annotation_path"]
            return TumourMask(rasterise_asap(path, level0_size, downsample), float(downsample))
        return None


def rasterise_asap(path: str | os.PathLike, level0_size: tuple[int, int],
                   downsample: float) -> np.ndarray:
    """An ASAP XML annotation as a boolean mask, one pixel per `downsample` level-0 pixels:
    tumour polygons filled, exclusion polygons (group `_2`) cut out."""
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError) as error:
        raise InputError(f"{path}: unreadable ASAP annotation ({error})") from error
    size = (math.ceil(level0_size[0] / downsample), math.ceil(level0_size[1] / downsample))
    tumour, exclusion = Image.new("1", size, 0), Image.new("1", size, 0)
    for annotation in root.iter("Annotation"):
        try:
            points = [(float(point.get("X")) / downsample, float(point.get("Y")) / downsample)
                      for point in annotation.iter("Coordinate")]
        except (TypeError, ValueError) as error:
            raise InputError(f"{path}: annotation {annotation.get('Name')!r} has a coordinate "
                             f"without numeric X and Y ({error})") from error
        if len(points) < 3:
            continue  # a dot or a line encloses no area
        target = exclusion if annotation.get("PartOfGroup") in EXCLUSION_GROUPS else tumour
        ImageDraw.Draw(target).polygon(points, fill=1)
    return np.asarray(tumour) & ~np.asarray(exclusion)
