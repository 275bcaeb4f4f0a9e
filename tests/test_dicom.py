"""DICOM reading: display transforms on real files, clear errors on bad ones."""

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import get_decoder
from pydicom.uid import JPEGLSNearLossless

from medrobust.errors import InputError
from medrobust.io.dicom import read_dicom_image

DATA = Path(__file__).parent / "data"
CR_JPEG2000 = DATA / "RG1_J2KI.dcm"


def _linear_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 'LINEAR' window, mapped onto [0, 1]."""
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def _ct_copy(tmp_path: Path, name: str = "ct.dcm", **elements) -> Path:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    path = tmp_path / name
    ds.save_as(path)
    return path


def test_jpeg2000_monochrome1_radiograph_is_windowed_and_inverted():
    image = read_dicom_image(CR_JPEG2000)
    ds = pydicom.dcmread(CR_JPEG2000)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    assert image.shape == (1955, 1841) and image.dtype == np.float32
    # MONOCHROME1 shows the smallest value as white: inverting makes bone bright
    expected = 1.0 - _linear_window(ds.pixel_array.astype(np.float64),
                                    float(ds.WindowCenter), float(ds.WindowWidth))
    np.testing.assert_allclose(image, expected, atol=1e-5)


def test_window_applies_after_rescale(tmp_path):
    path = _ct_copy(tmp_path, WindowCenter=40, WindowWidth=400)
    ds = pydicom.dcmread(path)
    hounsfield = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    image = read_dicom_image(path)
    np.testing.assert_allclose(image, _linear_window(hounsfield, 40, 400), atol=1e-5)
    assert image.min() == 0.0 and image.max() == 1.0  # the window clips both ends


def test_without_window_values_are_stretched_to_unit_range(tmp_path):
    path = _ct_copy(tmp_path)
    ds = pydicom.dcmread(path)
    assert "WindowCenter" not in ds
    values = ds.pixel_array.astype(np.float64)
    image = read_dicom_image(path)
    np.testing.assert_allclose(image, (values - values.min()) / np.ptp(values), atol=1e-6)


def test_monochrome1_is_the_inverse_of_monochrome2(tmp_path):
    plain = read_dicom_image(_ct_copy(tmp_path))
    inverted = read_dicom_image(_ct_copy(tmp_path, "mono1.dcm",
                                         PhotometricInterpretation="MONOCHROME1"))
    np.testing.assert_allclose(inverted, 1.0 - plain, atol=1e-6)


def _truncated(tmp_path: Path, n_bytes: int) -> Path:
    path = tmp_path / f"cut{n_bytes}.dcm"
    path.write_bytes(CR_JPEG2000.read_bytes()[:n_bytes])
    return path


def _text(tmp_path: Path) -> Path:
    path = tmp_path / "notes.dcm"
    path.write_text("this is not a DICOM file\n")
    return path


@pytest.mark.parametrize("make_path, message", [
    (_text, "not a DICOM file"),
    (lambda tmp: tmp / "missing.dcm", "cannot read file"),
    (lambda tmp: _truncated(tmp, 1000), "truncated or corrupt"),
    (lambda tmp: _truncated(tmp, 300_000), "no pixel data"),
    (lambda tmp: Path(get_testdata_file("MR_truncated.dcm")), "cannot decode pixel data"),
    (lambda tmp: Path(get_testdata_file("rtplan.dcm")), "no pixel data"),
    (lambda tmp: Path(get_testdata_file("rtdose.dcm")), "multi-frame"),
    (lambda tmp: Path(get_testdata_file("SC_rgb_rle.dcm")), "not a grayscale image"),
])
def test_bad_files_raise_input_errors_naming_them(tmp_path, make_path, message):
    path = make_path(tmp_path)
    with pytest.raises(InputError, match=message) as caught:
        read_dicom_image(path)
    assert str(path) in str(caught.value)


def _edited(tmp_path: Path, edit) -> Path:
    """CT_small.dcm with `edit` applied to its dataset, saved without pydicom's checks."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    edit(ds)
    path = tmp_path / "edited.dcm"
    with pydicom.config.disable_value_validation():
        ds.save_as(path, enforce_file_format=False)
    return path


def _float_pixels(ds, value: float) -> None:
    pixels = np.linspace(0, 1, ds.Rows * ds.Columns, dtype=np.float32)
    pixels[7] = value
    del ds.PixelData
    ds.FloatPixelData, ds.BitsAllocated = pixels.tobytes(), 32


def _window(ds, center, width) -> None:
    ds.WindowCenter, ds.WindowWidth = center, width


def _raw(ds, keyword: str, vr: str, value: bytes) -> None:
    """An element stored as the bytes given, as a damaged file would have it."""
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    ds[Tag(keyword)] = RawDataElement(Tag(keyword), vr, len(value), value, 0, False, True)


@pytest.mark.parametrize("edit, message", [
    (lambda ds: _window(ds, 40, 0), "Window Width"),
    (lambda ds: (_window(ds, 40, 400), setattr(ds, "VOILUTFunction", "BOGUS")), "BOGUS"),
    (lambda ds: delattr(ds, "Rows"), "Rows"),
    (lambda ds: delattr(ds, "PixelRepresentation"), "Pixel Representation"),
    (lambda ds: setattr(ds, "PixelData", b""), "malformed DICOM image"),
    (lambda ds: _raw(ds, "NumberOfFrames", "IS", b"abc "), "malformed DICOM image"),
    (lambda ds: _raw(ds, "RescaleSlope", "DS", b"NaN "), "not finite"),
    (lambda ds: _float_pixels(ds, np.nan), "not finite"),
    (lambda ds: _float_pixels(ds, np.inf), "not finite"),
    (lambda ds: setattr(ds, "PhotometricInterpretation", "monochrome2"), "'monochrome2'"),
])
def test_malformed_elements_raise_input_errors_naming_the_file(tmp_path, edit, message):
    """pydicom raises its own kinds (ValueError, TypeError, AttributeError, ...) on elements
    that are missing or malformed; each is this file's InputError, which `skip` leaves out,
    not a crash of the whole store."""
    path = _edited(tmp_path, edit)
    with pytest.raises(InputError, match=message) as caught:
        read_dicom_image(path)
    assert str(path) in str(caught.value)


def test_missing_decoder_names_the_plugins_to_install():
    if get_decoder(JPEGLSNearLossless).is_available:
        pytest.skip("a JPEG-LS decoder is installed here")
    path = get_testdata_file("JPEGLSNearLossless_08.dcm")
    with pytest.raises(InputError, match="no decoder installed for JPEG-LS") as caught:
        read_dicom_image(path)
    assert str(path) in str(caught.value)
    assert "pylibjpeg-libjpeg" in str(caught.value) or "pyjpegls" in str(caught.value)
