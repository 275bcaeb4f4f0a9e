"""Synthetic screening mammograms, written as DICOM like a real FFDM unit's.

Each image is one breast (CC or MLO view, left or right) seen against the
chest wall: a half-ellipse of fatty tissue with smoothed-noise
fibroglandular texture, a brighter skin line, the pectoral muscle on MLO
views, on a dark background. Malignant images carry a mass (a bright blob
with an irregular edge) or a cluster of microcalcifications (5-10 bright
specks, each 1.6-2.4 px wide at the default 64 px store, the detail a
low-pass filter erases), never both; benign
images carry no lesion. Images are rendered in display terms (bright =
dense) and stored as 12-bit values; every other image is MONOCHROME1, which
stores the inverted values, so readers must honour Photometric
Interpretation to see the same picture.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (DigitalMammographyXRayImageStorageForPresentation,
                         ExplicitVRLittleEndian, generate_uid)

from medrobust.data.manifest import check_split_fractions, stratified_split, write_dataset
from medrobust.data.synthetic.base import SourceConfig, register_modality, smooth_noise
from medrobust.io.atomic import atomic_path
from medrobust.io.checksums import sha256_file
from medrobust.progress import progress

MAX_STORED = 4095            # 12 bits stored
FIELD_OF_VIEW_MM = 240.0     # image height in mm, as on a 24 x 30 cm detector
WINDOW_TOP = 0.95            # display value at the top of the VOI window
LESION_COLUMNS = ("sample_id", "lesion_type", "x", "y", "radius")


@dataclass(frozen=True)
class MammogramConfig(SourceConfig):
    where = "synthetic mammography source"

    n_samples: int = 160
    height: int = 320
    width: int = 256
    malignant_fraction: float = 0.5
    splits: Mapping[str, float] = field(
        default_factory=lambda: {"train": 0.6, "val": 0.15, "test": 0.25})
    seed: int = 0

    def __post_init__(self):
        self.check_int("n_samples", 1)
        self.check_int("height", 64)   # lesions need room to stay a few pixels wide
        self.check_int("width", 64)
        self.check_number("malignant_fraction", 0.0, 1.0)
        self.check_int("seed", 0)
        object.__setattr__(self, "splits", check_split_fractions(self.splits))


@dataclass(frozen=True)
class Lesion:
    lesion_type: str     # mass or calcification (one row per speck)
    x: int
    y: int
    radius: float


@register_modality("mammography", kind="images", default_classes=("benign", "malignant"),
                   config_type=MammogramConfig)
def generate_mammograms(config: MammogramConfig, classes: list[str], out_dir: Path) -> Path:
    """Write `dicom/*.dcm`, `lesions.csv` and the manifest into `out_dir`."""
    rng = np.random.default_rng(config.seed)
    n = config.n_samples
    malignant = np.zeros(n, dtype=bool)
    malignant[rng.permutation(n)[:round(n * config.malignant_fraction)]] = True
    labels = [classes[int(flag)] for flag in malignant]
    splits = stratified_split(labels, config.splits, config.seed)

    (out_dir / "dicom").mkdir(exist_ok=True)
    rows, lesion_rows = [], []
    for index in progress(range(n), desc="synthetic mammograms", unit="image"):
        sample_id = f"mammo_{index:04d}"
        sample_rng = np.random.default_rng([config.seed, index])
        # cycle through the views so that neither side, view nor photometric tracks the label
        photometric = ("MONOCHROME2", "MONOCHROME1")[index % 2]
        laterality, view = ("L", "R")[index // 2 % 2], ("CC", "MLO")[index // 4 % 2]
        image, lesions = render_mammogram(sample_rng, config.height, config.width,
                                          laterality, view, malignant[index])
        dataset = _dicom_dataset(sample_rng, image, photometric, laterality, view,
                                 sample_id, config.seed)
        relative = f"dicom/{sample_id}.dcm"
        dataset.save_as(out_dir / relative, enforce_file_format=True)
        rows.append({"sample_id": sample_id, "path": relative, "label": labels[index],
                     "split": splits[index], "sha256": sha256_file(out_dir / relative)})
        lesion_rows += [{"sample_id": sample_id, "lesion_type": lesion.lesion_type,
                         "x": lesion.x, "y": lesion.y, "radius": lesion.radius}
                        for lesion in lesions]

    with atomic_path(out_dir / "lesions.csv") as tmp:
        pd.DataFrame(lesion_rows, columns=list(LESION_COLUMNS)).to_csv(tmp, index=False)
    return write_dataset(out_dir, rows, classes, "images")


def render_mammogram(rng: np.random.Generator, height: int, width: int, laterality: str,
                     view: str, malignant: bool) -> tuple[np.ndarray, list[Lesion]]:
    """One image in display terms (float, 0 dark .. 1 bright) and its lesions."""
    # a half-ellipse against the chest wall: column 0 for a left breast, the last for a right
    # one; MLO views reach higher, towards the axilla
    centre_y = height * rng.uniform(0.42, 0.5 if view == "MLO" else 0.56)
    depth = width * rng.uniform(0.68, 0.86)                                   # wall to nipple
    half_height = height * rng.uniform(0.36, 0.44 if view == "CC" else 0.48)  # along the wall
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    from_wall = cols if laterality == "L" else (width - 1) - cols
    radius = np.hypot(from_wall / depth, (rows - centre_y) / half_height)
    inside = radius < 1.0

    image = _tissue(rng, radius, inside, min(height, width))
    if view == "MLO":
        image = _add_pectoral(rng, image, from_wall, rows, inside, height, width)
    lesions: list[Lesion] = []
    if malignant:
        scale = min(height, width)
        centre = _lesion_centre(rng, radius, from_wall, rows, view, width, height)
        if rng.random() < 0.5:
            lesions = [_add_mass(rng, image, rows, cols, centre, scale)]
        else:
            lesions = _add_calcifications(rng, image, centre, scale)
    image[inside] += rng.normal(0.0, 0.006, int(inside.sum()))  # quantum noise
    return np.clip(image, 0.0, 1.0), lesions


def _tissue(rng: np.random.Generator, radius: np.ndarray, inside: np.ndarray,
            scale: int) -> np.ndarray:
    shape = radius.shape
    texture = (0.3 * smooth_noise(rng, shape, 0.008 * scale)
               + 0.6 * smooth_noise(rng, shape, 0.02 * scale)
               + 0.8 * smooth_noise(rng, shape, 0.07 * scale))
    density_bias = rng.uniform(-1.2, 0.4)               # fatty .. extremely dense breasts
    envelope = 1.5 * (1.0 - radius ** 2)                 # glands sit inside, away from the skin
    glandular = 1.0 / (1.0 + np.exp(-2.5 * (texture + density_bias + envelope - 1.0)))
    fat, dense = rng.uniform(0.26, 0.34), rng.uniform(0.58, 0.66)
    # compressed breasts thin out towards the skin, so the periphery darkens
    thickness = np.sqrt(np.clip((1.0 - radius) / 0.12, 0.0, 1.0))
    skin = 2.5 / (0.4 * scale)                           # about 2.5 px, in radius units
    skin_line = 0.12 * ((radius > 1.0 - skin) & inside)
    tissue = thickness * (fat + (dense - fat) * glandular) + skin_line
    background = 0.03 + 0.005 * rng.standard_normal(shape)
    return np.where(inside, tissue, background).astype(np.float32)


def _add_pectoral(rng, image, from_wall, rows, inside, height, width) -> np.ndarray:
    # the pectoral muscle: a triangle in the upper chest-wall corner, brightest at the wall
    reach, drop = width * rng.uniform(0.22, 0.32), height * rng.uniform(0.4, 0.6)
    depth = from_wall / reach + rows / drop
    muscle = inside & (depth < 1.0)
    level = rng.uniform(0.56, 0.62) + 0.06 * (1.0 - depth)
    return np.where(muscle, level, image).astype(np.float32)


def _lesion_centre(rng, radius, from_wall, rows, view, width, height) -> tuple[int, int]:
    """A pixel well inside the breast, off the chest wall and the pectoral muscle."""
    allowed = (radius < 0.65) & (from_wall > 0.15 * width)
    if view == "MLO":
        allowed &= from_wall / (0.35 * width) + rows / (0.65 * height) > 1.0
    candidates = np.argwhere(allowed)
    y, x = candidates[rng.integers(len(candidates))]
    return int(x), int(y)


def _add_mass(rng, image, rows, cols, centre, scale) -> Lesion:
    x, y = centre
    size = scale * rng.uniform(0.05, 0.08)
    angle = np.arctan2(rows - y, cols - x)
    # a few angular harmonics make the margin lobulated or spiculated
    edge = 1.0 + sum(rng.uniform(0.0, 0.12) * np.cos(k * angle + rng.uniform(0, 2 * np.pi))
                     for k in range(3, 8))
    rho = np.hypot(rows - y, cols - x) / (size * edge)
    profile = np.clip((1.0 - rho) / 0.25, 0.0, 1.0)
    # denser than any glandular tissue, so it stands out on fat and on glands alike
    level = rng.uniform(0.8, 0.88) + 0.04 * np.clip(1.0 - rho ** 2, 0.0, 1.0)
    image += (profile * np.clip(level - image, 0.0, None)).astype(np.float32)
    return Lesion("mass", x, y, round(float(size), 1))


def _add_calcifications(rng, image, centre, scale) -> list[Lesion]:
    x0, y0 = centre
    # Specks of radius 1.6-2.4% of the short side (4-6 px at 256) are 1.6-2.4 px wide once
    # the default preprocessing shrinks 320 px to 64: all detectable on the clean store,
    # where half that size averaged below detection for 58% of them. Larger than real
    # microcalcifications at this field of view, the price of a 64 px default; the gap
    # keeps specks separate store pixels.
    wanted, spread, gap = int(rng.integers(5, 11)), 0.1 * scale, 0.02 * scale
    specks: list[Lesion] = []
    for _ in range(1000):  # rejection sampling keeps the specks apart
        if len(specks) == wanted:
            break
        r = round(float(rng.uniform(0.016, 0.024) * scale), 1)
        angle, dist = rng.uniform(0, 2 * np.pi), spread * np.sqrt(rng.random())
        x, y = round(x0 + dist * np.cos(angle)), round(y0 + dist * np.sin(angle))
        if all(np.hypot(x - s.x, y - s.y) > r + s.radius + gap for s in specks):
            specks.append(Lesion("calcification", x, y, r))
    height, width = image.shape
    for speck in specks:
        span = int(np.ceil(speck.radius))
        ys = slice(max(speck.y - span, 0), min(speck.y + span + 1, height))
        xs = slice(max(speck.x - span, 0), min(speck.x + span + 1, width))
        dy, dx = np.ogrid[ys, xs]
        disc = np.hypot(dy - speck.y, dx - speck.x) <= speck.radius
        image[ys, xs][disc] = rng.uniform(0.92, 0.98)
    return specks


def _dicom_dataset(rng: np.random.Generator, image: np.ndarray, photometric: str,
                   laterality: str, view: str, sample_id: str, seed: int) -> Dataset:
    """A DICOM dataset for a processed (For Presentation) digital mammogram."""
    stored = np.round(image * MAX_STORED).astype(np.uint16)
    # the VOI window spans the breast from its faintest tissue up to a fixed top, not the
    # brightest pixel: that would be a lesion's, and darken the tissue of malignant images
    low, high = float(np.percentile(stored[image > 0.1], 1)), WINDOW_TOP * MAX_STORED
    centre, width = round((low + high) / 2), max(round(high - low), 1)
    if photometric == "MONOCHROME1":  # stored inverted: high values display dark
        stored, centre = MAX_STORED - stored, MAX_STORED - centre

    def uid(part: str) -> str:  # a UID that depends only on the seed and the sample
        return generate_uid(entropy_srcs=["medrobust synthetic mammography", str(seed),
                                          sample_id, part])

    study_date = datetime.date(2020, 1, 1) + datetime.timedelta(days=int(rng.integers(0, 1461)))
    birth_date = study_date.replace(year=study_date.year - int(rng.integers(40, 75)), day=1)
    study_time = f"{int(rng.integers(8, 18)):02d}{int(rng.integers(0, 60)):02d}00"
    spacing = f"{FIELD_OF_VIEW_MM / image.shape[0]:.4f}"

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalMammographyXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = uid("instance")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = uid("study")
    ds.SeriesInstanceUID = uid("series")
    ds.FrameOfReferenceUID = uid("frame")
    ds.PatientName = f"Synthetic^{sample_id}"
    ds.PatientID = f"MR{seed:04d}-{sample_id}"
    ds.PatientBirthDate = birth_date.strftime("%Y%m%d")
    ds.PatientSex = "F"
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = (
        study_date.strftime("%Y%m%d"))
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = study_time
    ds.AccessionNumber = f"A{seed:04d}{sample_id[-4:]}"
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.ReferringPhysicianName = ""
    ds.Modality = "MG"
    ds.Manufacturer = "medrobust"
    ds.ManufacturerModelName = "synthetic mammography"
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.BodyPartExamined = "BREAST"
    ds.ImageLaterality = laterality
    ds.ViewPosition = view
    # rows run from the chest wall to the nipple (A) for a left breast, the other way
    # (P) for a right one; columns run from the lateral side (and, on MLO, the axilla)
    ds.PatientOrientation = {("L", "CC"): ["A", "R"], ("R", "CC"): ["P", "L"],
                             ("L", "MLO"): ["A", "FR"], ("R", "MLO"): ["P", "FL"]}[
                                 (laterality, view)]
    ds.BreastImplantPresent = "NO"
    ds.BurnedInAnnotation = "NO"
    ds.PixelSpacing = ds.ImagerPixelSpacing = [spacing, spacing]
    ds.PixelIntensityRelationship = "LOG"
    # -1: higher stored values mean less X-ray reaching the detector (denser tissue)
    ds.PixelIntensityRelationshipSign = -1 if photometric == "MONOCHROME2" else 1
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"
    ds.WindowCenter = str(centre)
    ds.WindowWidth = str(width)
    ds.VOILUTFunction = "LINEAR"
    ds.set_pixel_data(stored, photometric, 12, generate_instance_uid=False)
    return ds
