"""Opening and reading whole-slide images through OpenSlide."""

import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image

import medrobust.io.slides as slides
import medrobust.io.file_reads as file_reads
from medrobust.errors import InputError
from medrobust.io.slides import open_slide
from medrobust.io.tiff_tiles import TiffTileLevel

DATA = Path(__file__).parent / "data"
CMU = DATA / "CMU-1-Small-Region.svs"
BOXES = DATA / "boxes.tiff"
# boxes.tiff states 72 dpi (352.8 µm/px), which no slide has: tests set a resolution
BOXES_MPP = 0.5


def test_real_slides_open_with_their_resolution():
    with open_slide(CMU) as slide:
        assert slide.mpp == pytest.approx(0.499)
        assert slide.dimensions == (2220, 2967)
    with open_slide(DATA / "small.svs") as slide:
        assert slide.dimensions == (16, 16)
    with open_slide(BOXES, BOXES_MPP) as slide:
        assert slide.level_downsamples[:2] == (1.0, 2.0)


def test_best_level_never_upsamples_but_tolerates_float_noise():
    with open_slide(BOXES, BOXES_MPP) as slide:  # downsamples 1, 2, 4.016, 8.086
        assert slide.best_level(1.5) == 0
        assert slide.best_level(2.0) == 1
        assert slide.best_level(2.0 * (1 - 1e-6)) == 1
        assert slide.best_level(4.0) == 1
        assert slide.best_level(100.0) == 3


def test_read_rgb_matches_openslide_and_fills_outside_with_background():
    with open_slide(CMU) as slide:
        tile = slide.read_rgb((1000, 1200), 0, (64, 48))
        x_outside = slide.dimensions[0] - 10
        edge = slide.read_rgb((x_outside, 0), 0, (20, 20))
    reference = openslide.OpenSlide(CMU)
    expected = np.asarray(reference.read_region((1000, 1200), 0, (64, 48)).convert("RGB"))
    inside = np.asarray(reference.read_region((x_outside, 0), 0, (10, 20)).convert("RGB"))
    assert tile.shape == (48, 64, 3) and tile.dtype == np.uint8
    np.testing.assert_array_equal(tile, expected)
    np.testing.assert_array_equal(edge[:, :10], inside)
    assert (edge[:, 10:] == 255).all()  # beyond the slide: white, not black


def test_read_rgb_composites_partly_transparent_edges_as_pil_does():
    # a downsampled level's last column is partly covered: alpha between 0 and 255
    reference = openslide.OpenSlide(BOXES)
    width, height = reference.dimensions
    for location in [(width - 37, 5), (width - 37, height - 41), (-13, -7)]:
        rgba = reference.read_region(location, 2, (40, 40))
        alpha = np.asarray(rgba)[..., 3]
        expected = Image.new("RGB", rgba.size, "#ffffff")
        expected.paste(rgba, mask=rgba)
        with open_slide(BOXES, BOXES_MPP) as slide:
            ours = slide.read_rgb(location, 2, (40, 40))
        if location[0] > 0:
            assert ((alpha > 0) & (alpha < 255)).any()
        # OpenSlide's public read un-premultiplies before PIL blends: a rounding apart
        difference = np.abs(ours.astype(int) - np.asarray(expected).astype(int))
        assert difference.max() <= 1
        np.testing.assert_array_equal(ours[alpha == 255], np.asarray(expected)[alpha == 255])
        assert (ours[alpha == 0] == 255).all()


def test_read_rgb_reuses_a_buffer_per_thread_but_returns_fresh_arrays():
    with open_slide(CMU) as slide:
        first = slide.read_rgb((0, 0), 0, (32, 32))
        kept = first.copy()
        second = slide.read_rgb((1000, 1000), 0, (32, 32))
        big = slide.read_rgb((0, 0), 0, (2220, 1900))  # over _REUSED_PIXELS: its own buffer
    np.testing.assert_array_equal(first, kept)  # not overwritten by the second read
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(big[:32, :32], first)


def _jpeg_pyramid(tmp_path: Path) -> Path:
    """The CMU slide's pixels as a two-level TIFF of YCbCr JPEG tiles, as the synthetic
    slides and bench_tiling's large slide are written."""
    with open_slide(CMU) as slide:
        pixels = slide.read_rgb((0, 0), 0, slide.dimensions)
    path = tmp_path / "jpeg_pyramid.tiff"
    with tifffile.TiffWriter(path) as tiff:
        for downsample in (1, 2):
            tiff.write(np.asarray(Image.fromarray(pixels).reduce(downsample)), tile=(256, 256),
                       photometric="rgb", compression="jpeg", subfiletype=int(downsample > 1),
                       resolution=(1e4 / 0.5 / downsample,) * 2, resolutionunit="CENTIMETER")
    return path


def _openslide_rgb(path: Path, location, level: int, size) -> np.ndarray:
    with openslide.OpenSlide(path) as reference:
        return np.asarray(reference.read_region(location, level, size).convert("RGB"))


@pytest.mark.parametrize("name", ["aperio JPEG (RGB)", "generic TIFF, JPEG (YCbCr)",
                                  "generic TIFF, deflate"])
def test_tiff_mosaic_levels_are_decoded_directly_with_openslides_pixels(tmp_path, name):
    path, mpp = {"aperio JPEG (RGB)": (CMU, None), "generic TIFF, deflate": (BOXES, BOXES_MPP),
                 "generic TIFF, JPEG (YCbCr)": (_jpeg_pyramid(tmp_path), None)}[name]
    rng = np.random.default_rng(0)
    with open_slide(path, mpp) as slide:
        assert slide.reads_tiff_tiles(0)
        width, height = slide.level_dimensions[0]
        regions = [((0, 0), (width, height)),                  # the whole level
                   ((width - 70, height - 50), (70, 50))]      # up to its corner
        regions += [((int(rng.integers(0, width - 100)), int(rng.integers(0, height - 100))),
                     (int(rng.integers(1, 100)), int(rng.integers(1, 100)))) for _ in range(30)]
        for location, size in regions:
            np.testing.assert_array_equal(slide.read_rgb(location, 0, size),
                                          _openslide_rgb(path, location, 0, size))
        # from four threads at once, each reading its tiles at their own offsets (pread)
        with ThreadPoolExecutor(4) as pool:
            reads = list(pool.map(lambda region: slide.read_rgb(region[0], 0, region[1]),
                                  regions))
    for (location, size), read in zip(regions, reads):
        np.testing.assert_array_equal(read, _openslide_rgb(path, location, 0, size))


def test_regions_tiff_tiles_cannot_give_are_read_through_openslide(monkeypatch):
    with open_slide(DATA / "boxes_0.dcm") as slide:
        assert not slide.reads_tiff_tiles(0)  # DICOM: not a TIFF
    with open_slide(BOXES, BOXES_MPP) as slide:
        # downsample 4.016: whole pixels of level 2 are fractions of level 0's
        assert not slide.reads_tiff_tiles(2)
        assert slide.reads_tiff_tiles(0) and slide.reads_tiff_tiles(1)  # checked, so not below

        def no_decoding(*args):
            raise AssertionError("decoded directly")

        monkeypatch.setattr(TiffTileLevel, "read", no_decoding)
        # beyond the level, between two of its pixels: OpenSlide's background and resampling
        for location, level in [((280, 240), 0), ((-4, 0), 0), ((3, 4), 1)]:
            np.testing.assert_array_equal(slide.read_rgb(location, level, (30, 20)),
                                          slides.Slide._read_openslide(slide, location, level,
                                                                       30, 20))


def test_a_level_whose_decoded_tiles_differ_from_openslide_is_read_through_it(monkeypatch):
    decode = TiffTileLevel.read
    monkeypatch.setattr(TiffTileLevel, "read", lambda *args: 255 - decode(*args))
    with open_slide(CMU) as slide:
        assert not slide.reads_tiff_tiles(0)
        np.testing.assert_array_equal(slide.read_rgb((100, 200), 0, (300, 300)),
                                      _openslide_rgb(CMU, (100, 200), 0, (300, 300)))


def _patched(source: Path, tmp_path: Path, patch) -> Path:
    """A copy of a slide whose bytes `patch(data, tiff)` has changed in place."""
    data = bytearray(source.read_bytes())
    with tifffile.TiffFile(source) as tiff:
        patch(data, tiff)
    path = tmp_path / f"patched{source.suffix}"
    path.write_bytes(bytes(data))
    return path


def _smallest_tile(tiff: tifffile.TiffFile) -> tuple[int, int, int]:
    """(index, offset, byte count) of level 0's smallest tile: not the one the level is
    checked on, the largest."""
    page = tiff.pages[0]
    index = int(np.argmin(page.databytecounts))
    return index, page.dataoffsets[index], page.databytecounts[index]


def _end_marker_in_the_scan(data, tiff):
    _, offset, count = _smallest_tile(tiff)
    data[offset + count // 2:offset + count // 2 + 2] = b"\xff\xd9"


def _second_half_zeroed(data, tiff):
    _, offset, count = _smallest_tile(tiff)
    data[offset + count // 2:offset + count] = bytes(count - count // 2)


def _no_jpeg_markers(data, tiff):
    _, offset, count = _smallest_tile(tiff)
    data[offset:offset + count] = b"\xff" * count


def _file_ends_inside_the_tile(data, tiff):
    # the tile's first half moved to the end of the file, its byte count left whole
    index, offset, count = _smallest_tile(tiff)
    entry = tiff.pages[0].tags["TileOffsets"].valueoffset + 4 * index
    data[entry:entry + 4] = len(data).to_bytes(4, "little")
    data += data[offset:offset + count // 2]


def _replacing_the_smallest_tile(new_tile):
    """A patch storing `new_tile(the tile's bytes)` at the file's end as level 0's smallest tile."""
    def patch(data, tiff):
        index, offset, count = _smallest_tile(tiff)
        tile = new_tile(bytes(data[offset:offset + count]))
        for name, value in (("TileOffsets", len(data)), ("TileByteCounts", len(tile))):
            entry = tiff.pages[0].tags[name].valueoffset + 4 * index
            data[entry:entry + 4] = value.to_bytes(4, "little")
        data += tile
    return patch


def _grey_jpeg(tile: bytes) -> bytes:
    encoded = io.BytesIO()
    Image.new("L", (240, 240), 128).save(encoded, "JPEG")
    return encoded.getvalue()


_a_grey_tile = _replacing_the_smallest_tile(_grey_jpeg)
# a JFIF segment would make libjpeg read the Aperio page's RGB tile as YCbCr
_a_jfif_segment = _replacing_the_smallest_tile(
    lambda tile: tile[:2] + b"\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    + tile[2:])
# libjpeg's last step, which OpenSlide never runs, warns about bytes before the end marker
_bytes_before_the_end_marker = _replacing_the_smallest_tile(
    lambda tile: tile[:-2] + bytes(16) + tile[-2:])


def _smallest_tile_location(source: Path) -> tuple[int, int]:
    with tifffile.TiffFile(source) as tiff:
        index, _, _ = _smallest_tile(tiff)
        page = tiff.pages[0]
        row, column = divmod(index, -(-page.imagewidth // page.tilewidth))
        return column * page.tilewidth, row * page.tilelength


# OpenSlide reads every tile of a one-level slide when it opens it: the pyramid for the short one
@pytest.mark.parametrize("source, patch", [
    ("cmu", _end_marker_in_the_scan), ("cmu", _second_half_zeroed), ("cmu", _no_jpeg_markers),
    ("cmu", _a_grey_tile), ("pyramid", _file_ends_inside_the_tile)],
    ids=["end marker in the scan", "second half zeroed", "no JPEG markers", "grey tile",
         "file ends inside the tile"])
def test_a_corrupt_tile_raises_an_input_error_naming_the_file_as_openslide_does(tmp_path, source,
                                                                                patch):
    source = CMU if source == "cmu" else _jpeg_pyramid(tmp_path)
    path = _patched(source, tmp_path, patch)
    location = _smallest_tile_location(source)
    # libjpeg only warns about most of these; OpenSlide, as medrobust, takes a warning as an error
    with pytest.raises(openslide.OpenSlideError), openslide.OpenSlide(path) as reference:
        reference.read_region(location, 0, (16, 16))
    with open_slide(path) as slide, pytest.raises(InputError, match="corrupt") as caught:
        assert slide.reads_tiff_tiles(0)
        slide.read_rgb(location, 0, (16, 16))
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("patch", [_a_jfif_segment, _bytes_before_the_end_marker],
                         ids=["JFIF segment", "bytes before the end marker"])
def test_tiles_decoded_directly_have_openslides_colours_and_leniency(tmp_path, patch):
    path = _patched(CMU, tmp_path, patch)
    location = _smallest_tile_location(CMU)
    with open_slide(path) as slide:
        assert slide.reads_tiff_tiles(0)
        np.testing.assert_array_equal(slide.read_rgb(location, 0, (240, 240)),
                                      _openslide_rgb(path, location, 0, (240, 240)))


def _tile_counts_cut(data, tiff):
    for name in ("TileOffsets", "TileByteCounts"):  # each tag entry's count field
        entry = tiff.pages[0].tags[name].offset + 4
        data[entry:entry + 4] = (130 - 2).to_bytes(4, "little")


def _a_tag_of_the_wrong_type(data, tiff):
    entry = tiff.pages[1].tags["ImageLength"].offset + 2  # the thumbnail's; its type field
    data[entry:entry + 2] = (2).to_bytes(2, "little")  # ASCII


@pytest.mark.parametrize("patch", [_tile_counts_cut, _a_tag_of_the_wrong_type],
                         ids=["tile counts cut", "a tag of the wrong type"])
def test_tags_tifffile_cannot_use_leave_the_slide_to_openslide(tmp_path, patch):
    path = _patched(CMU, tmp_path, patch)
    with open_slide(path) as slide:
        assert not slide.reads_tiff_tiles(0)
        np.testing.assert_array_equal(slide.read_rgb((100, 200), 0, (300, 300)),
                                      _openslide_rgb(path, (100, 200), 0, (300, 300)))


def test_aperio_levels_coarser_than_a_missing_tile_are_read_through_openslide(tmp_path):
    # OpenSlide draws such a level's tile from the finer level, not from the stored tile
    rng = np.random.default_rng(0)
    path = tmp_path / "missing.svs"
    description = ("Aperio Image Library v12.0.0\r\n1024x1024 [0,0 1024x1024] (256x256) "
                   "JPEG/RGB Q=90|AppMag = 20|MPP = 0.5")
    with tifffile.TiffWriter(path) as tiff:
        for size in (1024, 512):
            pixels = rng.integers(0, 255, (size, size, 3), np.uint8)
            pixels[:256, :256] = 128  # level 1's tile 0 is not the one the level is checked on
            tiff.write(pixels, tile=(256, 256), photometric="rgb", compression="jpeg",
                       description=description, subfiletype=int(size < 1024), metadata=None)
    data = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tiff:
        counts = tiff.pages[0].tags["TileByteCounts"].valueoffset
    data[counts:counts + 4] = bytes(4)  # level 0's first tile: stored as missing
    path.write_bytes(bytes(data))
    with open_slide(path) as slide:
        assert slide.reads_tiff_tiles(0) and not slide.reads_tiff_tiles(1)
        np.testing.assert_array_equal(slide.read_rgb((0, 0), 1, (256, 256)),
                                      slides.Slide._read_openslide(slide, (0, 0), 1, 256, 256))


def _noise_tiff(tmp_path: Path) -> Path:
    path = tmp_path / "noise.tiff"
    tifffile.imwrite(path, np.random.default_rng(0).integers(0, 255, (512, 512, 3), np.uint8),
                     tile=(256, 256), photometric="rgb", compression="jpeg", metadata=None)
    return path


def test_a_level_with_a_missing_tile_does_not_cover_it(tmp_path):
    path = _noise_tiff(tmp_path)
    data = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tiff:
        counts = tiff.pages[0].tags["TileByteCounts"].valueoffset
    data[counts:counts + 4] = bytes(4)  # tile 0 stored as missing
    path.write_bytes(bytes(data))
    level = TiffTileLevel.open(path, "generic-tiff", (512, 512))
    try:
        assert not level.covers(0, 0, 16, 16) and not level.covers(200, 0, 100, 16)
        assert level.covers(256, 0, 256, 256) and level.covers(0, 256, 512, 256)
    finally:
        level.close()


def test_tiles_read_in_pieces_are_read_whole(tmp_path, monkeypatch):
    # one pread may return part of what it is asked on a network file system
    path = _noise_tiff(tmp_path)
    pread = file_reads.os.pread
    monkeypatch.setattr(file_reads.os, "pread",
                        lambda fd, count, offset: pread(fd, min(count, 1000), offset))
    with open_slide(path, BOXES_MPP) as slide:
        assert slide.reads_tiff_tiles(0)
        np.testing.assert_array_equal(slide.read_rgb((0, 0), 0, (512, 512)),
                                      _openslide_rgb(path, (0, 0), 0, (512, 512)))


def test_a_closed_level_reads_nothing_and_closes_its_file_once(tmp_path):
    path = _noise_tiff(tmp_path)
    level = TiffTileLevel.open(path, "generic-tiff", (512, 512))
    level.close()
    with open(path, "rb") as other:  # may take the closed file's descriptor number
        level.close()
        with pytest.raises(OSError):
            level.read(0, 0, 16, 16)
        assert other.read(2) == b"II"  # still open


def test_thumbnail_is_a_block_average_whatever_the_strip_height(monkeypatch, write_tiff):
    # the CMU slide's pixels in a TIFF without the SVS file's own thumbnail: level 0 is decoded
    with open_slide(CMU) as slide:
        pixels = slide.read_rgb((0, 0), 0, slide.dimensions)
    with open_slide(write_tiff("cmu.tiff", pixels, mpp=0.499)) as slide:
        thumbnail, downsample = slide.thumbnail(8)
        monkeypatch.setattr(slides, "_STRIP_PIXELS", 2220 * 50)  # many strips
        stripped, _ = slide.thumbnail(8)
    block = pixels[800:808, 160:168].reshape(-1, 3).mean(axis=0)
    assert downsample == 8.0
    assert thumbnail.shape == (371, 278, 3)  # ceil(2967 / 8), ceil(2220 / 8)
    np.testing.assert_array_equal(stripped, thumbnail)
    np.testing.assert_allclose(thumbnail[100, 20], block, atol=1.0)


def test_thumbnail_of_a_single_level_slide_is_the_files_own_when_fine_enough(monkeypatch):
    with open_slide(CMU) as slide:
        pixels = slide.read_rgb((0, 0), 0, slide.dimensions)
        decoded = np.asarray(Image.fromarray(pixels).reduce(8)).astype(int)

        def no_decoding(*args):
            raise AssertionError("level 0 decoded")

        monkeypatch.setattr(slide, "read_rgb", no_decoding)
        # the SVS file's thumbnail is 574 x 768, 3.87 times smaller than level 0
        thumbnail, downsample = slide.thumbnail(8)
        assert thumbnail.shape == (371, 278, 3) and downsample == pytest.approx(2220 / 278)
        assert np.abs(thumbnail - decoded).mean() < 8     # the same picture, scanner-scaled
        coarse, coarse_downsample = slide.thumbnail(2, coarsest=4)  # the file's as it is
        assert coarse.shape == (768, 574, 3) and coarse_downsample == pytest.approx(2220 / 574)
        monkeypatch.undo()
        # wanted finer than the file's thumbnail, no coarser source allowed: level 0 decoded
        fine, fine_downsample = slide.thumbnail(3)
        assert fine_downsample == 3 and fine.shape == (989, 740, 3)


def test_thumbnail_reads_a_coarser_pyramid_level():
    with open_slide(BOXES, BOXES_MPP) as slide:
        thumbnail, downsample = slide.thumbnail(8.5)
        assert downsample == pytest.approx(slide.level_downsamples[3])
        assert thumbnail.shape[:2] == slide.level_dimensions[3][::-1]
        # content with a coarser source: that level, not a finer one block-averaged
        thumbnail, downsample = slide.thumbnail(2.5, coarsest=4.5)
        assert downsample == pytest.approx(slide.level_downsamples[2])
        assert thumbnail.shape[:2] == slide.level_dimensions[2][::-1]


def test_missing_mpp_needs_a_fallback(write_tiff):
    path = write_tiff("nores.tiff", np.full((64, 64, 3), 200, np.uint8), mpp=None)
    with pytest.raises(InputError, match="fallback_mpp") as caught:
        open_slide(path)
    assert str(path) in str(caught.value)
    with open_slide(path, fallback_mpp=0.25) as slide:
        assert slide.mpp == 0.25
    with open_slide(CMU, fallback_mpp=0.25) as slide:
        assert slide.mpp == pytest.approx(0.499)  # a stated mpp wins


def test_a_resolution_no_slide_has_needs_a_fallback():
    with pytest.raises(InputError, match="352.778 µm/px.*fallback_mpp") as caught:
        open_slide(BOXES)
    assert str(BOXES) in str(caught.value)
    with open_slide(BOXES, fallback_mpp=0.25) as slide:
        assert slide.mpp == 0.25


def test_a_dicom_whole_slide_image_opens_from_one_file_of_its_series():
    assert openslide.__library_version__.split(".")[0] >= "4"  # DICOM support came in 4.0
    with open_slide(DATA / "boxes_0.dcm") as slide:
        assert slide.dimensions == (16, 16) and slide.mpp == pytest.approx(0.499)
        tile = slide.read_rgb((0, 0), 0, (16, 16))
    reference = openslide.OpenSlide(DATA / "boxes_0.dcm")
    np.testing.assert_array_equal(
        tile, np.asarray(reference.read_region((0, 0), 0, (16, 16)).convert("RGB")))


def _text_as_svs(tmp_path: Path) -> Path:
    path = tmp_path / "fake.svs"
    path.write_text("not a slide\n")
    return path


def _truncated_tiff(tmp_path: Path) -> Path:
    path = tmp_path / "cut.tiff"
    path.write_bytes(BOXES.read_bytes()[:3000])
    return path


@pytest.mark.parametrize("make_path, message", [
    (_text_as_svs, "OpenSlide cannot open it"),
    (_truncated_tiff, "OpenSlide cannot open it"),
    (lambda tmp: tmp / "missing.svs", "not found"),
])
def test_unopenable_slides_raise_input_errors_naming_them(tmp_path, make_path, message):
    path = make_path(tmp_path)
    with pytest.raises(InputError, match=message) as caught:
        open_slide(path)
    assert str(path) in str(caught.value)


def test_corrupt_tile_data_raises_input_error_on_read(corrupt_tiff):
    with open_slide(corrupt_tiff, BOXES_MPP) as slide, pytest.raises(InputError, match="corrupt") as caught:
        slide.read_rgb((0, 0), 0, (32, 32))
    assert str(corrupt_tiff) in str(caught.value)
