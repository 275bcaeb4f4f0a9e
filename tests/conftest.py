"""Fixtures shared by several test modules."""

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from fixtures_http import http_server  # noqa: F401 (the local HTTP server fixture)

DATA = Path(__file__).parent / "data"


@pytest.fixture
def one_thread():
    """Torch on one thread from seed 0: the same kernels and sums from run to run (and as
    in a killed job that is resumed); modules opt in with `pytestmark`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def write_tiff(tmp_path):
    """Write a one-level tiled RGB TIFF (OpenSlide's generic-tiff) under tmp_path.

    `mpp=None` leaves out the resolution, so OpenSlide states no mpp.
    """
    def write(name: str, image: np.ndarray, mpp: float | None) -> Path:
        resolution = {} if mpp is None else {
            "resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
        path = tmp_path / name
        tifffile.imwrite(path, image, tile=(64, 64), photometric="rgb", **resolution)
        return path

    return write


@pytest.fixture
def corrupt_tiff(tmp_path) -> Path:
    """tests/data/boxes.tiff with the compressed bytes of its first level-0 tile overwritten:
    OpenSlide opens it, reading that tile fails."""
    source = DATA / "boxes.tiff"
    data = bytearray(source.read_bytes())
    with tifffile.TiffFile(source) as tiff:
        offset, count = tiff.pages[0].dataoffsets[0], tiff.pages[0].databytecounts[0]
    data[offset:offset + count] = b"\xff" * count
    path = tmp_path / "corrupt.tiff"
    path.write_bytes(bytes(data))
    return path
