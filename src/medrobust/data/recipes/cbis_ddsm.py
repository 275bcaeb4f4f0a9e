"""CBIS-DDSM (TCIA): full mammograms labelled benign/malignant, with ROI masks.

Four description CSVs (mass/calc x train/test) list one row per abnormality:
`patient_id`, `abnormality id`, `pathology` (BENIGN, BENIGN_WITHOUT_CALLBACK or
MALIGNANT), and the DICOM paths `image file path`, `cropped image file path`
and `ROI mask file path`, each `<case>/<StudyInstanceUID>/<SeriesInstanceUID>/
<n>.dcm`. An image is malignant when any of its abnormalities is. The ROI
masks go to `rois.csv` (`sample_id, abnormality_id, lesion_type, pathology,
mask_path`) for the mammography study.

The DICOMs come from a local copy (as the NBIA Data Retriever saves them, found
through its `metadata.csv`, or laid out as the CSV paths say) or from the TCIA
REST API, one series at a time, each checked against the md5 list TCIA sends
with it. The CSVs' crop and mask columns are swapped in places (noted in
TensorFlow Datasets' CBIS-DDSM builder), so the mask is the file of the ROI
series whose size equals the full image's.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

import pydicom

from medrobust.data.archives import extract_archive
from medrobust.data.download import ChecksumMismatch, RetryPolicy, download_file
from medrobust.data.http import (
    RemoteFile,
    checksum_for,
    fetch_files,
    mirror_advice,
    staging_dir,
)
from medrobust.data.assemble import (
    Sample,
    find_one,
    link_folder,
    read_table,
    recipe_classes,
    source_section,
    write_samples,
    write_table,
)
from medrobust.data.manifest import begin_dataset, stratified_split
from medrobust.config import config_from_mapping
from medrobust.data.sources import register_source
from medrobust.errors import ConfigError, InputError, check_choice
from medrobust.io.checksums import file_digest
from medrobust.logs import get_logger
from medrobust.progress import progress

log = get_logger(__name__)

WIKI = "https://wiki.cancerimagingarchive.net/download/attachments/22516629"
DESCRIPTIONS = {  # (lesion type, official split) -> (file name, URL) from the TCIA page
    ("mass", "train"): ("mass_case_description_train_set.csv",
                        "version=1&modificationDate=1506796355038&api=v2"),
    ("mass", "test"): ("mass_case_description_test_set.csv",
                       "version=1&modificationDate=1506796343175&api=v2"),
    ("calcification", "train"): ("calc_case_description_train_set.csv",
                                 "version=1&modificationDate=1506796349666&api=v2"),
    ("calcification", "test"): ("calc_case_description_test_set.csv",
                                "version=1&modificationDate=1506796343686&api=v2"),
}
TCIA_API = "https://services.cancerimagingarchive.net/nbia-api/services/v4"
COLLECTION_HINT = ("the description CSVs are on the collection's page, "
                   "https://www.cancerimagingarchive.net/collection/cbis-ddsm/")
CLASSES = ("benign", "malignant")
PATHOLOGY = {"BENIGN": "benign", "BENIGN_WITHOUT_CALLBACK": "benign", "MALIGNANT": "malignant"}
PATH_COLUMNS = ("image file path", "ROI mask file path", "cropped image file path")
ABNORMALITIES = ("mass", "calcification", "both")
ROI_COLUMNS = ("sample_id", "abnormality_id", "lesion_type", "pathology", "mask_path")
_MD5 = re.compile(r"^[0-9a-fA-F]{32}$")


@dataclass(frozen=True)
class CBISDDSMSource:
    root: str | None = None           # a local copy: the CSVs and the DICOM folders
    tcia_manifest: str | None = None  # download only the series this .tcia file lists
    abnormality: str = "both"         # mass | calcification | both
    val_fraction: float = 0.1         # of the official training patients, held out as val
    seed: int = 0
    tcia_api: str = TCIA_API
    tables_url: str = WIKI            # where the description CSVs are (the TCIA wiki)
    checksums: Mapping[str, Any] = field(default_factory=dict)   # for the CSVs
    allow_unverified: bool = False
    download: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> "CBISDDSMSource":
        options = config_from_mapping(cls, mapping, "source (cbis_ddsm)")
        check_choice("source (cbis_ddsm): abnormality", options.abnormality, ABNORMALITIES)
        if not 0 <= options.val_fraction < 1:
            raise ConfigError(f"source (cbis_ddsm): val_fraction must be in [0, 1), not "
                              f"{options.val_fraction!r}")
        if options.root is not None and options.tcia_manifest is not None:
            raise ConfigError("source (cbis_ddsm): `tcia_manifest` selects what to download; "
                              "it does not apply to a local copy (`root`)")
        return options

    @property
    def tables(self) -> list[tuple[str, str]]:
        return [key for key in DESCRIPTIONS if self.abnormality in (key[0], "both")]


@dataclass(frozen=True)
class Abnormality:
    """One row of a description CSV."""

    sample_id: str        # the case folder of `image file path`, one per mammogram
    patient: str
    split: str            # the official split: train or test
    lesion_type: str
    abnormality_id: str
    pathology: str        # benign or malignant
    paths: Mapping[str, str]   # PATH_COLUMNS -> cell
    where: str


@register_source("cbis_ddsm", CBISDDSMSource)
def fetch_cbis_ddsm(dataset_config: Mapping[str, Any], out_dir: Path) -> Path:
    options = CBISDDSMSource.from_mapping(source_section(dataset_config))
    classes = recipe_classes(dataset_config, CLASSES, "cbis_ddsm")
    out_dir = begin_dataset(out_dir)
    if options.root is not None:
        data = link_folder(options.root, out_dir / "data")
        tables = {key: find_one(data, DESCRIPTIONS[key][0], COLLECTION_HINT)
                  for key in options.tables}
    else:
        data = out_dir
        tables = _download_tables(options, out_dir)
    rows = [row for key, table in tables.items() for row in read_description(table, *key)]
    if options.root is None:
        rows = _download_series(rows, options, out_dir)
    locator = DicomLocator(data)
    samples, rois = images_and_rois(rows, locator, out_dir)
    samples = hold_out_val(samples, options.val_fraction, options.seed)
    write_table(out_dir / "rois.csv", ROI_COLUMNS, rois)
    return write_samples(out_dir, samples, classes, "images")


def read_description(table: Path, lesion_type: str, split: str) -> list[Abnormality]:
    rows = read_table(table, ("patient_id", "abnormality id", "pathology", *PATH_COLUMNS))
    out = []
    for line, row in rows:
        where = f"{table}: line {line} (patient_id {row['patient_id']!r})"
        if row["pathology"] not in PATHOLOGY:
            raise InputError(f"{where}: pathology {row['pathology']!r} is not one of "
                             f"{', '.join(PATHOLOGY)}")
        paths = {column: row[column] for column in PATH_COLUMNS}
        for column, cell in paths.items():
            if len(cell.split("/")) < 3:
                raise InputError(f"{where}: {column} {cell!r} is not <case>/<study>/"
                                 f"<series>/<file>.dcm")
        out.append(Abnormality(paths["image file path"].split("/")[0], row["patient_id"], split,
                               lesion_type, row["abnormality id"], PATHOLOGY[row["pathology"]],
                               paths, where))
    return out


def series_uid(csv_path: str) -> str:
    return csv_path.split("/")[-2]


class DicomLocator:
    """Finds the DICOM files of a CSV path in a local copy or the TCIA download.

    Three layouts: the CSV path itself under the data folder; an NBIA Data
    Retriever download, whose `metadata.csv` maps `Series UID` to `File
    Location`; or `series/<SeriesInstanceUID>/` as the TCIA download writes it.
    """

    def __init__(self, data: Path):
        self.data = data
        self.folders: dict[str, Path] = {}
        for metadata in data.rglob("metadata.csv"):
            for _, row in read_table(metadata):
                if row.get("Series UID") and row.get("File Location"):
                    location = metadata.parent / row["File Location"]
                    self.folders[row["Series UID"]] = (
                        location if location.is_dir() else data / row["File Location"])
        if (data / "series").is_dir():
            self.folders.update({folder.name: folder for folder in (data / "series").iterdir()})
        self._sizes: dict[Path, tuple[int, int]] = {}

    def files(self, csv_path: str) -> list[Path]:
        direct = self.data / csv_path
        if direct.is_file():
            return [direct]
        folder = self.folders.get(series_uid(csv_path))
        return sorted(folder.glob("*.dcm")) if folder is not None and folder.is_dir() else []

    def size(self, path: Path) -> tuple[int, int]:
        if path not in self._sizes:
            try:
                header = pydicom.dcmread(path, stop_before_pixels=True,
                                         specific_tags=["Rows", "Columns"])
                self._sizes[path] = (int(header.Rows), int(header.Columns))
            except Exception as error:  # pydicom raises many kinds on a broken file
                raise InputError(f"{path}: not a readable DICOM ({error})") from error
        return self._sizes[path]


def images_and_rois(rows: Iterable[Abnormality], locator: DicomLocator, out_dir: Path
                    ) -> tuple[list[Sample], list[dict[str, str]]]:
    """One sample per mammogram (malignant if any abnormality is) and one ROI row each."""
    by_image: dict[str, list[Abnormality]] = {}
    for row in rows:
        by_image.setdefault(row.sample_id, []).append(row)
    samples, rois, unmatched = [], [], 0
    for sample_id, group in progress(sorted(by_image.items()), desc="mammograms",
                                     unit="image"):
        first = group[0]
        images = locator.files(first.paths["image file path"])
        if len(images) != 1:
            raise InputError(f"{first.where}: expected one DICOM for "
                             f"{first.paths['image file path']!r} under {locator.data}, "
                             f"found {len(images)}")
        size = locator.size(images[0])
        label = "malignant" if any(row.pathology == "malignant" for row in group) else "benign"
        # the patient: her views are not independent samples (manifest column `group`)
        samples.append(Sample(sample_id, images[0], label, first.split, group=first.patient))
        for row in group:
            mask = _mask(row, locator, size)
            unmatched += mask is None
            rois.append({"sample_id": sample_id, "abnormality_id": row.abnormality_id,
                         "lesion_type": row.lesion_type, "pathology": row.pathology,
                         "mask_path": mask.relative_to(out_dir).as_posix() if mask else ""})
    if unmatched:
        log.warning("%d ROI(s) have no mask file the size of their mammogram; their "
                    "mask_path in rois.csv is empty", unmatched)
    return samples, rois


def _mask(row: Abnormality, locator: DicomLocator, size: tuple[int, int]) -> Path | None:
    candidates = dict.fromkeys(locator.files(row.paths["ROI mask file path"])
                               + locator.files(row.paths["cropped image file path"]))
    return next((path for path in candidates if locator.size(path) == size), None)


def hold_out_val(samples: list[Sample], fraction: float, seed: int) -> list[Sample]:
    """Move a stratified `fraction` of the official training patients to `val`.

    By patient (each sample's `group`), so the views of one woman never
    straddle train and val; a patient counts as malignant when any of her
    images is.
    """
    if fraction == 0:
        return samples
    label_of: dict[str, str] = {}
    for sample in samples:
        if sample.split == "train":
            if sample.label == "malignant" or sample.group not in label_of:
                label_of[sample.group] = sample.label
    names = sorted(label_of)
    splits = stratified_split([label_of[name] for name in names],
                              {"train": 1 - fraction, "val": fraction}, seed)
    val = {name for name, split in zip(names, splits, strict=True) if split == "val"}
    return [replace(s, split="val") if s.split == "train" and s.group in val
            else s for s in samples]


def _download_tables(options: CBISDDSMSource, out_dir: Path) -> dict[tuple[str, str], Path]:
    files = []
    for key in options.tables:
        name, query = DESCRIPTIONS[key]
        checksum = checksum_for(name, None, options.checksums, options.allow_unverified,
                                "source (cbis_ddsm)")
        files.append(RemoteFile.of(f"{options.tables_url.rstrip('/')}/{name}?{query}", checksum,
                                   name=name))
    with mirror_advice("tables_url", options.tables_url, WIKI):
        placed = fetch_files(files, out_dir, RetryPolicy.from_mapping(options.download))
    return {key: placed[DESCRIPTIONS[key][0]].path for key in options.tables}


def _download_series(rows: list[Abnormality], options: CBISDDSMSource, out_dir: Path
                     ) -> list[Abnormality]:
    """Fetch every series the rows name (or the manifest's share); return the rows kept."""
    needed = {series_uid(cell) for row in rows for cell in row.paths.values()}
    if options.tcia_manifest is not None:
        listed = read_tcia_manifest(Path(options.tcia_manifest).expanduser())
        needed &= listed
        kept = [row for row in rows if series_uid(row.paths["image file path"]) in needed]
        if not kept:
            raise InputError(f"{options.tcia_manifest}: lists none of the series that the "
                             f"description tables name")
        log.info("%s: %d of %d abnormalities have their mammogram in the manifest",
                 options.tcia_manifest, len(kept), len(rows))
        rows = kept
    policy = RetryPolicy.from_mapping(options.download)
    for uid in progress(sorted(needed), desc="TCIA series", unit="series"):
        dest = out_dir / "series" / uid
        if dest.is_dir():
            continue  # extraction is atomic: a folder that exists is complete and verified
        archive = staging_dir(out_dir) / f"{uid}.zip"
        download_file(f"{options.tcia_api}/getImageWithMD5Hash?SeriesInstanceUID={uid}",
                      archive, None, policy=policy)
        try:
            extract_archive(archive, dest, verify=verify_md5_list, limits=policy.archive_limits)
        finally:
            archive.unlink()
    return rows


def verify_md5_list(folder: Path) -> None:
    """Check each file against the `md5hashes.csv` TCIA puts in a series zip."""
    listing = folder / "md5hashes.csv"
    if not listing.is_file():
        raise InputError(f"{folder.name}: the series archive has no md5hashes.csv to verify "
                         f"it against")
    checked = 0
    with open(listing, newline="") as handle:
        for row in csv.reader(handle):
            if len(row) < 2 or not _MD5.match(row[1].strip()):
                continue  # the header
            path = folder / row[0].strip()
            expected = row[1].strip().lower()
            if not path.is_file() or file_digest(path, "md5") != expected:
                raise ChecksumMismatch(f"series {folder.name}: {row[0]} is missing or does "
                                       f"not match its md5 {expected}; nothing was kept")
            checked += 1
    if not checked:
        raise InputError(f"series {folder.name}: md5hashes.csv lists no files")


def read_tcia_manifest(path: Path) -> set[str]:
    """The series UIDs after `ListOfSeriesToDownload=` in a .tcia manifest."""
    if not path.is_file():
        raise InputError(f"TCIA manifest {path} does not exist")
    lines = [line.strip() for line in path.read_text().splitlines()]
    for index, line in enumerate(lines):
        if line.startswith("ListOfSeriesToDownload="):
            first = line.partition("=")[2]
            uids = {uid for uid in [first, *lines[index + 1:]] if uid}
            if uids:
                return uids
    raise InputError(f"{path}: no series after ListOfSeriesToDownload= (is it a .tcia "
                     f"manifest?)")
