"""RSNA Pneumonia Detection Challenge (Kaggle, 2018): three classes of chest X-ray.

The labels come from `stage_2_detailed_class_info.csv` (`patientId,class`, one
row per bounding box, so a patient may repeat); the images are
`stage_2_train_images/<patientId>.dcm`. The data is downloaded from the Kaggle
API, which needs the user's API token (`~/.kaggle/kaggle.json`, or
KAGGLE_USERNAME and KAGGLE_KEY) and the competition's rules accepted; or the
user points `root` at a copy they have. The token is sent to Kaggle only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from medrobust.data.download import DownloadError
from medrobust.data.http import RemoteFile, checksum_for, mirror_advice, obtain_data
from medrobust.data.assemble import (
    DEFAULT_SPLITS,
    Sample,
    assign_splits,
    find_one,
    map_label,
    read_table,
    recipe_classes,
    source_section,
    write_samples,
)
from medrobust.data.manifest import begin_dataset
from medrobust.config import config_from_mapping
from medrobust.data.sources import register_source
from medrobust.errors import InputError, MedrobustError

COMPETITION = "rsna-pneumonia-detection-challenge"
KAGGLE_API = "https://www.kaggle.com/api/v1"
COMPETITION_URL = f"https://www.kaggle.com/competitions/{COMPETITION}"
RULES_URL = f"{COMPETITION_URL}/rules"
ARCHIVE = f"{COMPETITION}.zip"
TABLE = "stage_2_detailed_class_info.csv"
IMAGE_DIR = "stage_2_train_images"
CLASSES = ("Normal", "No Lung Opacity / Not Normal", "Lung Opacity")


class CredentialsMissing(MedrobustError):
    """A download needs credentials that are not configured."""


@dataclass(frozen=True)
class RSNAPneumoniaSource:
    root: str | None = None           # a local copy: folder with the CSV and the DICOM folder
    kaggle_config: str | None = None  # default: $KAGGLE_CONFIG_DIR or ~/.kaggle, kaggle.json
    kaggle_api: str = KAGGLE_API
    splits: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_SPLITS))
    seed: int = 0
    checksums: Mapping[str, Any] = field(default_factory=dict)
    allow_unverified: bool = False
    download: Mapping[str, Any] = field(default_factory=dict)


@register_source("rsna_pneumonia", RSNAPneumoniaSource)
def fetch_rsna_pneumonia(dataset_config: Mapping[str, Any], out_dir: Path) -> Path:
    options = config_from_mapping(RSNAPneumoniaSource, source_section(dataset_config),
                             "source (rsna_pneumonia)")
    classes = recipe_classes(dataset_config, CLASSES, "rsna_pneumonia")
    files, auth = [], None
    if options.root is None:
        checksum = checksum_for(ARCHIVE, None, options.checksums, options.allow_unverified,
                                "source (rsna_pneumonia)")
        url = f"{options.kaggle_api.rstrip('/')}/competitions/data/download-all/{COMPETITION}"
        files = [RemoteFile.of(url, checksum, name=ARCHIVE, extract=True)]
        auth = kaggle_credentials(options.kaggle_config)
    out_dir = begin_dataset(out_dir)
    try:
        with mirror_advice("kaggle_api", options.kaggle_api, KAGGLE_API):
            data = obtain_data(options.root, files, out_dir, options.download, auth=auth)
    except DownloadError as error:
        raise _explained(error) from None
    table = find_one(data, TABLE, f"it is part of the competition data, {COMPETITION_URL}/data")
    samples = read_class_info(table, data, classes)
    samples = assign_splits(samples, options.splits, options.seed)
    return write_samples(out_dir, samples, classes, "images")


def kaggle_credentials(config_file: str | None) -> tuple[str, str]:
    """(username, key) the way the Kaggle client finds them: environment, then kaggle.json."""
    user, key = os.environ.get("KAGGLE_USERNAME"), os.environ.get("KAGGLE_KEY")
    if user and key:
        return user, key
    default = Path(os.environ.get("KAGGLE_CONFIG_DIR") or "~/.kaggle") / "kaggle.json"
    path = Path(config_file or default).expanduser()
    if not path.is_file():
        raise CredentialsMissing(
            f"RSNA Pneumonia is downloaded from Kaggle, which needs your API token, and "
            f"there is none at {path} and no KAGGLE_USERNAME/KAGGLE_KEY in the environment. "
            f"Create one at https://www.kaggle.com/settings (API: Create New Token), save it "
            f"as {path} (chmod 600) or export KAGGLE_USERNAME and KAGGLE_KEY, and accept the "
            f"competition rules at {RULES_URL}. Or set `root` to a copy you already have.")
    try:
        token = json.loads(path.read_text())
        return str(token["username"]), str(token["key"])
    except (ValueError, KeyError, TypeError):
        # never quote the file: it holds the key
        raise InputError(f"{path}: not a Kaggle API token (a JSON object with `username` "
                         f"and `key`); download a new one at https://www.kaggle.com/settings"
                         ) from None


def _explained(error: DownloadError) -> DownloadError:
    hint = {401: "Kaggle rejected the API token; create a new one at "
                 "https://www.kaggle.com/settings",
            403: f"Kaggle refuses the data until you accept the competition rules at "
                 f"{RULES_URL} (signed in as the token's user)"}.get(error.status)
    return DownloadError(f"{error} -- {hint}", error.status) if hint else error


def read_class_info(table: Path, data: Path, classes: list[str]) -> list[Sample]:
    """One sample per patient; InputError names a row with an unknown or conflicting class."""
    rows = read_table(table, ("patientId", "class"))
    images = {path.stem: path for path in find_dir(data, IMAGE_DIR).glob("*.dcm")}
    first: dict[str, tuple[str, int]] = {}
    samples = []
    for line, row in rows:
        patient = row["patientId"]
        where = f"{table}: line {line} (patientId {patient!r})"
        label = map_label(row["class"], {}, classes, where)
        if patient in first:
            if first[patient][0] != label:
                raise InputError(f"{where}: class {label!r} contradicts {first[patient][0]!r} "
                                 f"on line {first[patient][1]}")
            continue
        first[patient] = (label, line)
        if patient not in images:
            raise InputError(f"{where}: no image {IMAGE_DIR}/{patient}.dcm under {data}")
        samples.append(Sample(patient, images[patient], label))
    return samples


def find_dir(root: Path, name: str) -> Path:
    found = sorted(path for path in root.rglob(name) if path.is_dir())
    if len(found) != 1:
        raise InputError(f"{root}: expected one folder {name}, found {len(found)}")
    return found[0]
