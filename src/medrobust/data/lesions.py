"""Lesion annotations of mammography datasets, as masks on each raw image's pixel grid.

Two side tables carry them (docs/datasets.md): the synthetic source's
`lesions.csv` (one disc per mass and per calcification speck: centre `x, y`
and `radius` in pixels) and the CBIS-DDSM recipe's `rois.csv` (one ROI mask
DICOM per abnormality, the size of its mammogram). Both become the same
records, so the visibility analysis (`medrobust.evaluate.lesion_visibility`)
never asks which source a dataset came from
(`medrobust.conditions.has_lesion_annotations` names the sources that write one).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Collection

import numpy as np
import pandas as pd
import pydicom

from medrobust.data.manifest import MANIFEST_NAME, read_manifest
from medrobust.errors import InputError
from medrobust.logs import get_logger

log = get_logger(__name__)

LESION_TYPES = ("calcification", "mass")
SYNTHETIC_TABLE = "lesions.csv"    # written by medrobust.data.synthetic.mammograms
ROI_TABLE = "rois.csv"             # written by medrobust.data.recipes.cbis_ddsm
SYNTHETIC_COLUMNS = ("sample_id", "lesion_type", "x", "y", "radius")
ROI_COLUMNS = ("sample_id", "lesion_type", "mask_path")


@dataclass(frozen=True)
class LesionMask:
    """One lesion (a mass, a calcification speck, or a CBIS-DDSM ROI) on its image's grid."""

    sample_id: str
    lesion_type: str
    mask: np.ndarray    # bool (H, W), the raw image's size


def read_lesion_masks(dataset_dir: str | os.PathLike,
                      sample_ids: Collection[str]) -> list[LesionMask]:
    """The lesions of `sample_ids` in a downloaded dataset folder, in table order."""
    dataset_dir = Path(dataset_dir)
    wanted = set(sample_ids)
    if (dataset_dir / SYNTHETIC_TABLE).is_file():
        return _synthetic_masks(dataset_dir, wanted)
    if (dataset_dir / ROI_TABLE).is_file():
        return _roi_masks(dataset_dir, wanted)
    raise InputError(f"{dataset_dir}: has no lesion table ({SYNTHETIC_TABLE} of the synthetic "
                     f"mammography source or {ROI_TABLE} of the CBIS-DDSM recipe)")


def _read_table(path: Path, columns: tuple[str, ...], wanted: set[str]) -> pd.DataFrame:
    try:
        table = pd.read_csv(path, dtype={"sample_id": str, "mask_path": str},
                            keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise InputError(f"{path}: unreadable lesion table ({error})") from error
    missing = [column for column in columns if column not in table]
    if missing:
        raise InputError(f"{path}: lacks column(s) {', '.join(missing)}")
    unknown = sorted(set(table["lesion_type"]) - set(LESION_TYPES))
    if unknown:
        raise InputError(f"{path}: unknown lesion_type {unknown}; "
                         f"expected {' or '.join(LESION_TYPES)}")
    return table[table["sample_id"].isin(wanted)]


def _synthetic_masks(dataset_dir: Path, wanted: set[str]) -> list[LesionMask]:
    path = dataset_dir / SYNTHETIC_TABLE
    table = _read_table(path, SYNTHETIC_COLUMNS, wanted)
    manifest = read_manifest(dataset_dir / MANIFEST_NAME).table.set_index("sample_id")
    unknown = sorted(set(table["sample_id"]) - set(manifest.index))
    if unknown:
        raise InputError(f"{path}: sample(s) {unknown[:5]} are not in the manifest")
    shapes: dict[str, tuple[int, int]] = {}
    lesions = []
    for row in table.itertuples(index=False):
        if row.sample_id not in shapes:
            shapes[row.sample_id] = _dicom_shape(dataset_dir / manifest.at[row.sample_id, "path"])
        rows, cols = np.ogrid[:shapes[row.sample_id][0], :shapes[row.sample_id][1]]
        disc = np.hypot(rows - float(row.y), cols - float(row.x)) <= float(row.radius)
        lesions.append(LesionMask(row.sample_id, row.lesion_type, disc))
    return lesions


def _roi_masks(dataset_dir: Path, wanted: set[str]) -> list[LesionMask]:
    path = dataset_dir / ROI_TABLE
    table = _read_table(path, ROI_COLUMNS, wanted)
    without = table["mask_path"].str.strip() == ""
    if without.any():  # the recipe keeps ROIs whose mask file it could not match
        log.warning("%s: %d ROI(s) have no mask_path and are left out", path, int(without.sum()))
    lesions = []
    for row in table[~without].itertuples(index=False):
        mask_path = dataset_dir / row.mask_path
        try:
            mask = pydicom.dcmread(mask_path).pixel_array > 0
        except Exception as error:  # pydicom raises many kinds on a broken file
            raise InputError(f"{mask_path}: not a readable ROI mask DICOM ({error})") from error
        lesions.append(LesionMask(row.sample_id, row.lesion_type, mask))
    return lesions


def _dicom_shape(path: Path) -> tuple[int, int]:
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Rows", "Columns"])
        return int(header.Rows), int(header.Columns)
    except Exception as error:  # pydicom raises many kinds on a broken file
        raise InputError(f"{path}: not a readable DICOM ({error})") from error
