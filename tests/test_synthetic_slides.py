import imagecodecs
import numpy as np
import openslide
import pandas as pd
import pytest

from medrobust.data.manifest import read_manifest
from medrobust.data.synthetic import fetch_synthetic
from medrobust.data.synthetic import slides
from medrobust.data.synthetic.slides import (
    MASK_DOWNSAMPLE, SUBTLE_GRADE, draw_layout, draw_nuclei)
from medrobust.errors import ConfigError

WIDTH, HEIGHT, MPP = 768, 512, 0.5


def _config(**source):
    return {"kind": "slides", "classes": ["normal", "tumor"],
            "source": {"type": "synthetic", "modality": "slides", "n_samples": 4,
                       "width": WIDTH, "height": HEIGHT, "mpp": MPP, "tumor_fraction": 0.5,
                       "splits": {"train": 0.5, "test": 0.5}, **source}}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("slides")
    manifest = read_manifest(fetch_synthetic(_config(), out))
    return manifest, pd.read_csv(out / "annotations.csv")


def _mask(manifest, annotations, sample_id) -> np.ndarray:
    row = annotations.set_index("sample_id").loc[sample_id]
    return imagecodecs.png_decode((manifest.root / row["mask_path"]).read_bytes())


def test_manifest(dataset):
    manifest, _ = dataset
    assert manifest.kind == "slides" and manifest.classes == ["normal", "tumor"]
    assert manifest.table["label"].value_counts().to_dict() == {"normal": 2, "tumor": 2}
    assert sorted(manifest.table["split"]) == ["test", "test", "train", "train"]
    assert all(path.startswith("slides/") and path.endswith(".tiff")
               for path in manifest.table["path"])


def test_openslide_reads_a_pyramid_with_mpp(dataset):
    manifest, _ = dataset
    for _, row in manifest.table.iterrows():
        with openslide.OpenSlide(manifest.absolute_path(row)) as slide:
            assert slide.level_count >= 3
            assert slide.dimensions == (WIDTH, HEIGHT)
            assert slide.level_downsamples == pytest.approx((1.0, 4.0, 16.0))
            assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(MPP)
            assert float(slide.properties[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(MPP)
            # levels agree: a level-1 region is the level-0 region downsampled
            level0 = np.asarray(slide.read_region((256, 256), 0, (256, 256)).convert("RGB"), float)
            level1 = np.asarray(slide.read_region((256, 256), 1, (64, 64)).convert("RGB"), float)
            block_mean = level0.reshape(64, 4, 64, 4, 3).mean(axis=(1, 3))
            assert np.abs(block_mean - level1).mean() < 6


def test_masks_are_non_empty_exactly_for_tumor_slides(dataset):
    manifest, annotations = dataset
    assert set(annotations["sample_id"]) == set(manifest.table["sample_id"])
    assert (annotations["mask_downsample"] == 16).all()
    for _, row in manifest.table.iterrows():
        mask = _mask(manifest, annotations, row["sample_id"])
        assert mask.shape == (HEIGHT // 16, WIDTH // 16) and mask.dtype == np.uint8
        assert mask.any() == (row["label"] == "tumor")


def test_he_colours_and_denser_darker_nuclei_in_tumour(dataset):
    manifest, annotations = dataset
    for _, row in manifest.table.iterrows():
        with openslide.OpenSlide(manifest.absolute_path(row)) as slide:
            # level 2 has one pixel per mask cell
            region = slide.read_region((0, 0), 2, slide.level_dimensions[2])
        rgb = np.asarray(region.convert("RGB"), float)
        mask = _mask(manifest, annotations, row["sample_id"]) > 0
        glass = rgb.min(axis=2) > 225
        tissue = ~glass & ~mask
        assert glass.mean() > 0.2 and tissue.sum() > 20     # white glass and some tissue
        red, green, blue = rgb[tissue].mean(axis=0)
        assert red > blue > green                             # pink-purple, eosin-dominated
        if mask.any():
            tumour_brightness = rgb[mask & ~glass].mean()
            assert tumour_brightness < rgb[tissue].mean() - 20  # crowded dark nuclei


def test_tumour_nuclei_are_denser_larger_and_darker():
    rng = np.random.default_rng(0)
    layout = draw_layout(rng, 1024, 1024, tumour=True)
    nuclei = draw_nuclei(rng, layout, mpp=0.5)
    cells = (nuclei.y // MASK_DOWNSAMPLE).astype(int), (nuclei.x // MASK_DOWNSAMPLE).astype(int)
    assert (layout.tissue[cells] > 0).all()                 # no nuclei on bare glass
    tumour = layout.tumour[cells]
    per_cell_tumour = tumour.sum() / layout.tumour.sum()
    per_cell_normal = (~tumour).sum() / ((layout.tissue > 0) & ~layout.tumour).sum()
    assert per_cell_tumour > 1.5 * per_cell_normal
    assert nuclei.long_radius[tumour].min() > nuclei.long_radius[~tumour].max()
    assert nuclei.stain[tumour].min() > nuclei.stain[~tumour].max()


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    small = {"n_samples": 2, "width": 512, "height": 512}
    digests = {}
    for name, seed in (("first", 5), ("again", 5), ("other", 6)):
        manifest = read_manifest(fetch_synthetic(_config(seed=seed, **small), tmp_path / name))
        digests[name] = manifest.table["sha256"].tolist()
    assert digests["first"] == digests["again"]
    assert not set(digests["first"]) & set(digests["other"])
    for mask in ("slide_000.png", "slide_001.png"):
        assert (tmp_path / "first" / "masks" / mask).read_bytes() == (
            tmp_path / "again" / "masks" / mask).read_bytes()


def test_hard_instances_salient_and_subtle_regions():
    """Mixed: a small salient region beside larger subtle ones; subtle: no salient region."""
    mixed = draw_layout(np.random.default_rng(1), 1024, 1024, tumour=True, regions="mixed")
    salient, subtle = (mixed.grade == 1).sum(), (mixed.grade == SUBTLE_GRADE).sum()
    assert 0 < salient < subtle
    assert np.array_equal(mixed.tumour, mixed.grade > 0)
    hard = draw_layout(np.random.default_rng(1), 1024, 1024, tumour=True, regions="subtle")
    assert hard.tumour.any() and set(np.unique(hard.grade)) == {0, np.float32(SUBTLE_GRADE)}
    nuclei = draw_nuclei(np.random.default_rng(2), mixed, mpp=0.5)
    cells = (nuclei.y // MASK_DOWNSAMPLE).astype(int), (nuclei.x // MASK_DOWNSAMPLE).astype(int)
    grade = mixed.grade[cells]
    means = [nuclei.long_radius[grade == level].mean() for level in (0, SUBTLE_GRADE, 1)]
    assert means == sorted(means) and means[1] - means[0] < means[2] - means[1]


def test_hard_instances_put_subtle_only_tumours_in_the_test_split(tmp_path, monkeypatch):
    seen = []

    def record(rng, height, width, tumour, regions="salient"):
        seen.append((tumour, regions))
        return draw_layout(rng, height, width, tumour, regions)

    monkeypatch.setattr(slides, "draw_layout", record)
    monkeypatch.setattr(slides, "write_slide", lambda path, *args: path.write_bytes(b"x"))
    manifest = read_manifest(fetch_synthetic(_config(hard_instances=True, n_samples=8),
                                             tmp_path))
    regions = [regions for tumour, regions in seen]
    expected = ["subtle" if split == "test" else "mixed" for split in manifest.table["split"]]
    assert regions == expected  # tumour or not: only tumour slides draw regions


@pytest.mark.parametrize("change, expected", [
    ({"hard_instances": "yes"}, "hard_instances must be true or false"),
    ({"width": 100}, "width must be an integer >= 512"),
    ({"mpp": -1}, r"mpp must be a number in"),
    ({"levels": 3}, r"unknown key\(s\) levels"),
])
def test_config_errors(tmp_path, change, expected):
    with pytest.raises(ConfigError, match=expected):
        fetch_synthetic(_config(**change), tmp_path)
