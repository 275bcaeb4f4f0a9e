"""MedMNIST 2D (v3 / MedMNIST+): one npz per flag and size, split into PNG files.

URLs, md5 sums, class names and licences are those of `medmnist` 3.0.2's
`medmnist/info.py` (docs/datasets.md). The npz holds `{split}_images` (uint8,
`(N, H, W)` or `(N, H, W, 3)`) and `{split}_labels` (`(N, 1)`, or `(N, 14)`
for the multi-label chestmnist); each image becomes one PNG so that the
manifest has a file per sample. Images are read from the npz in chunks,
so the 224-px files (up to 12 GB) never sit in memory whole.
"""

from __future__ import annotations

import hashlib
import io
import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
from PIL import Image

from medrobust.data.download import Checksum, ChecksumMismatch, RetryPolicy, download_file
from medrobust.data.assemble import Sample, recipe_classes, source_section, write_samples
from medrobust.data.http import mirror_advice, staging_dir, warn_if_splits_differ
from medrobust.data.manifest import SPLITS, begin_dataset
from medrobust.config import config_from_mapping
from medrobust.data.sources import register_source
from medrobust.errors import ConfigError, InputError, check_choice, unknown_name
from medrobust.io.checksums import file_digest
from medrobust.progress import progress

RECORD = "https://zenodo.org/records/10519652/files"
SIZES = (28, 64, 128, 224)
ORGANS = ("bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right",
          "liver", "lung-left", "lung-right", "pancreas", "spleen")


@dataclass(frozen=True)
class Flag:
    classes: tuple[str, ...]          # index = label value in the npz
    md5: Mapping[int, str]            # size -> md5 of `<flag>[_<size>].npz`
    licence: str
    multi_label: bool = False


FLAGS: dict[str, Flag] = {
    "pathmnist": Flag(
        ("adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
         "normal colon mucosa", "cancer-associated stroma",
         "colorectal adenocarcinoma epithelium"),
        {28: "a8b06965200029087d5bd730944a56c1", 64: "55aa9c1e0525abe5a6b9d8343a507616",
         128: "ac42d08fb904d92c244187169d1fd1d9", 224: "2c51a510bcdc9cf8ddb2af93af1eadec"},
        "CC BY 4.0"),
    "chestmnist": Flag(
        ("atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule",
         "pneumonia", "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis",
         "pleural", "hernia"),
        {28: "02c8a6516a18b556561a56cbdd36c4a8", 64: "9de6cd0b934ebb5b7426cfba5efbae16",
         128: "db107e5590b27930b62dbaf558aebee3", 224: "45bd33e6f06c3e8cdb481c74a89152aa"},
        "CC BY 4.0", multi_label=True),
    "dermamnist": Flag(
        ("actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
         "benign keratosis-like lesions", "dermatofibroma", "melanoma", "melanocytic nevi",
         "vascular lesions"),
        {28: "0744692d530f8e62ec473284d019b0c7", 64: "b70a2f5635c6199aeaa28c31d7202e1f",
         128: "2defd784463fa5243564e855ed717de1", 224: "8974907d8e169bef5f5b96bc506ae45d"},
        "CC BY-NC 4.0"),
    "octmnist": Flag(
        ("choroidal neovascularization", "diabetic macular edema", "drusen", "normal"),
        {28: "c68d92d5b585d8d81f7112f81e2d0842", 64: "e229e9440236b774d9f0dfef9d07bdaf",
         128: "0a97e76651ace45c5d943ee3f65b63ae", 224: "abc493b6d529d5de7569faaef2773ba3"},
        "CC BY 4.0"),
    "pneumoniamnist": Flag(
        ("normal", "pneumonia"),
        {28: "28209eda62fecd6e6a2d98b1501bb15f", 64: "8f4eceb4ccffa70c672198ea285246c6",
         128: "05b46931834c231683c68f40c47b2971", 224: "d6a3c71de1b945ea11211b03746c1fe1"},
        "CC BY 4.0"),
    "retinamnist": Flag(
        ("0", "1", "2", "3", "4"),
        {28: "bd4c0672f1bba3e3a89f0e4e876791e4", 64: "afda852cc34dcda56f86ad2b2457dbcc",
         128: "e48e916a24454daf90583d4e6efb1a18", 224: "eae7e3b6f3fcbda4ae613ebdcbe35348"},
        "CC BY 4.0"),
    "breastmnist": Flag(
        ("malignant", "normal, benign"),
        {28: "750601b1f35ba3300ea97c75c52ff8f6", 64: "742edef2a1fd1524b2efff4bd7ba9364",
         128: "363e4b3f8d712e9b5de15470a2aaadf1", 224: "b56378a6eefa9fed602bb16d192d4c8b"},
        "CC BY 4.0"),
    "bloodmnist": Flag(
        ("basophil", "eosinophil", "erythroblast",
         "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)", "lymphocyte",
         "monocyte", "neutrophil", "platelet"),
        {28: "7053d0359d879ad8a5505303e11de1dc", 64: "2b94928a2ae4916078ca51e05b6b800b",
         128: "adace1e0ed228fccda1f39692059dd4c", 224: "b718ff6835fcbdb22ba9eacccd7b2601"},
        "CC BY 4.0"),
    "tissuemnist": Flag(
        ("Collecting Duct, Connecting Tubule", "Distal Convoluted Tubule",
         "Glomerular endothelial cells", "Interstitial endothelial cells", "Leukocytes",
         "Podocytes", "Proximal Tubule Segments", "Thick Ascending Limb"),
        {28: "ebe78ee8b05294063de985d821c1c34b", 64: "123ece2eba09d0aa5d698fda57103344",
         128: "61b955355d7425a89687b06cca3ce0c2", 224: "b077128c4a949f0a4eb01517f9037b9c"},
        "CC BY 4.0"),
    "organamnist": Flag(
        ORGANS,
        {28: "68e3f8846a6bd62f0c9bf841c0d9eacc", 64: "2dcccc29b88e6da5a01161ef20cda288",
         128: "eeae80d0a227a8d099027e1b3cfd3b60", 224: "50747347e05c87dd3aaf92c49f9f3170"},
        "CC BY 4.0"),
    "organcmnist": Flag(
        ORGANS,
        {28: "b9ceb9546e10131b32923c5bbeaea2b1", 64: "3ce34a8724ea6f548e6db4744d03b6a9",
         128: "773c1f009daa3fe5d9a2a201b2a7ed94", 224: "050f5e875dc056f6768abf94ec9995d1"},
        "CC BY 4.0"),
    "organsmnist": Flag(
        ORGANS,
        {28: "9ab87b696fb54e2a387ebe992d6ed5f1", 64: "53a6d115339d874c25e309a994ff46d3",
         128: "ded0c5fa01a95dc4978b956f613e9b8e", 224: "b354719e553fbbb2513d5533f52a4cb1"},
        "CC BY 4.0"),
}


# samples per split (train, val, test): `n_samples` of medmnist 3.0.2's INFO, the same
# at every size
OFFICIAL_SPLITS: dict[str, tuple[int, int, int]] = {
    "pathmnist": (89996, 10004, 7180), "chestmnist": (78468, 11219, 22433),
    "dermamnist": (7007, 1003, 2005), "octmnist": (97477, 10832, 1000),
    "pneumoniamnist": (4708, 524, 624), "retinamnist": (1080, 120, 400),
    "breastmnist": (546, 78, 156), "bloodmnist": (11959, 1712, 3421),
    "tissuemnist": (165466, 23640, 47280), "organamnist": (34561, 6491, 17778),
    "organcmnist": (12975, 2392, 8216), "organsmnist": (13932, 2452, 8827),
}


def file_name(flag: str, size: int) -> str:
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def official_url(flag: str, size: int) -> str:
    return f"{RECORD}/{file_name(flag, size)}?download=1"


@dataclass(frozen=True)
class MedMNISTSource:
    flag: str
    size: int = 28
    url: str | None = None       # a mirror; the official md5 still applies
    path: str | None = None      # an npz already on disk, verified the same way
    md5: str | None = None       # with `url` or `path`: the file differs from the official one
    sha256: str | None = None
    finding: str | None = None   # chestmnist only: positive class = this finding present
    download: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0                # unused (official splits, nothing drawn); the workflow passes every source its seed

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> "MedMNISTSource":
        options = config_from_mapping(cls, mapping, "source (medmnist)")
        if options.flag not in FLAGS:
            raise unknown_name("MedMNIST 2D flag", options.flag, FLAGS)
        check_choice("source (medmnist): size", options.size, SIZES)
        if options.url and options.path:
            raise ConfigError("source (medmnist): give `url` or `path`, not both")
        flag = FLAGS[options.flag]
        if flag.multi_label != (options.finding is not None):
            raise ConfigError(
                f"source (medmnist): {options.flag} is multi-label: name the `finding` that "
                f"makes the positive class ({', '.join(flag.classes)})" if flag.multi_label
                else "source (medmnist): `finding` applies to chestmnist only")
        if options.finding is not None and options.finding not in flag.classes:
            raise unknown_name("chestmnist finding", options.finding, flag.classes)
        return options

    @property
    def checksum(self) -> Checksum:
        given = Checksum.from_entry({"md5": self.md5, "sha256": self.sha256}, "source (medmnist)")
        return given or Checksum("md5", FLAGS[self.flag].md5[self.size])

    @property
    def classes(self) -> list[str]:
        if self.finding is not None:
            return [f"no {self.finding}", self.finding]
        return list(FLAGS[self.flag].classes)


@register_source("medmnist", MedMNISTSource)
def fetch_medmnist(dataset_config: Mapping[str, Any], out_dir: Path) -> Path:
    options = MedMNISTSource.from_mapping(source_section(dataset_config))
    classes = recipe_classes(dataset_config, options.classes, "medmnist")
    out_dir = begin_dataset(out_dir)
    npz = _obtain(options, out_dir)
    samples = []
    for split in SPLITS:
        labels = _labels(npz, split, options)
        folder = out_dir / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        rows = progress(_rows(npz, f"{split}_images", len(labels)), total=len(labels),
                        desc=f"{split} images", unit="image")
        for index, (image, label) in enumerate(zip(rows, labels, strict=True)):
            sample_id = f"{split}_{index:06d}"
            png = _png_bytes(image)
            path = folder / f"{sample_id}.png"
            path.write_bytes(png)
            samples.append(Sample(sample_id, path, classes[label], split,
                                  hashlib.sha256(png).hexdigest()))
    warn_if_splits_differ(f"{options.flag} ({options.size} px)",
                          {split: sum(s.split == split for s in samples) for split in SPLITS},
                          dict(zip(SPLITS, OFFICIAL_SPLITS[options.flag])),
                          "n_samples in medmnist 3.0.2")
    return write_samples(out_dir, samples, classes, "images")


def _obtain(options: MedMNISTSource, out_dir: Path) -> Path:
    name = file_name(options.flag, options.size)
    if options.path is None:
        with mirror_advice("url", options.url, official_url(options.flag, options.size),
                           pin="source"):
            return download_file(options.url or official_url(options.flag, options.size),
                                 staging_dir(out_dir) / name, options.checksum,
                                 policy=RetryPolicy.from_mapping(options.download)).path
    path, checksum = Path(options.path).expanduser(), options.checksum
    if not path.is_file():
        raise InputError(f"source (medmnist): path {path} does not exist")
    actual = file_digest(path, checksum.algorithm)
    if actual != checksum.hexdigest:
        raise ChecksumMismatch(f"{path}: {checksum.algorithm} is {actual}, but {name} should "
                               f"have {checksum.hexdigest}; set `md5`/`sha256` if this is a "
                               f"different file on purpose")
    return path


def _labels(npz: Path, split: str, options: MedMNISTSource) -> np.ndarray:
    """Class indices of one split; InputError names a row whose value is no class."""
    key = f"{split}_labels"
    with np.load(npz, allow_pickle=False) as arrays:
        if key not in arrays:
            raise InputError(f"{npz}: no array {key!r}; it has {', '.join(arrays.files)}")
        raw = np.asarray(arrays[key])
    flag = FLAGS[options.flag]
    if options.finding is not None:
        column = flag.classes.index(options.finding)
        if raw.ndim != 2 or raw.shape[1] != len(flag.classes):
            raise InputError(f"{npz}: {key} has shape {raw.shape}, expected "
                             f"(N, {len(flag.classes)}) for {options.flag}")
        values = raw[:, column].astype(np.int64)
        allowed = 2
    else:
        values = raw.reshape(len(raw), -1)
        if values.shape[1] != 1:
            raise InputError(f"{npz}: {key} has shape {raw.shape}, expected (N, 1)")
        values = values[:, 0].astype(np.int64)
        allowed = len(flag.classes)
    bad = np.flatnonzero((values < 0) | (values >= allowed))
    if bad.size:
        raise InputError(f"{npz}: {key}[{bad[0]}] is {values[bad[0]]}, not a class index "
                         f"0..{allowed - 1} of {options.flag}")
    return values


def _rows(npz: Path, key: str, expected: int, chunk: int = 512) -> Iterator[np.ndarray]:
    """The rows of one npz array, read `chunk` rows at a time."""
    with zipfile.ZipFile(npz) as archive:
        if f"{key}.npy" not in archive.namelist():
            raise InputError(f"{npz}: no array {key!r}")
        with archive.open(f"{key}.npy") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(handle)
            if fortran or dtype.hasobject or len(shape) not in (3, 4):
                raise InputError(f"{npz}: {key} is not a C-ordered image array "
                                 f"(shape {shape}, dtype {dtype})")
            if shape[0] != expected:
                raise InputError(f"{npz}: {key} has {shape[0]} images but "
                                 f"{expected} labels")
            row_bytes = dtype.itemsize * math.prod(shape[1:])
            for start in range(0, shape[0], chunk):
                count = min(chunk, shape[0] - start)
                block = handle.read(count * row_bytes)
                if len(block) != count * row_bytes:
                    raise InputError(f"{npz}: {key} ends early (truncated file)")
                yield from np.frombuffer(block, dtype).reshape((count, *shape[1:]))


def _png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()
