"""Input pipeline: listing, decoding, augmentation, prompts, sharding, skipping, exact resume."""
import json
import logging

import numpy as np
import pytest
from PIL import Image
from skimage import data as photos

from e4t_jax.training import data

SIZE = 32


def _photo(name, side=96):
    """A real photo from scikit-image, RGB uint8, shortest side ``side``."""
    image = Image.fromarray(getattr(photos, name)()).convert("RGB")
    scale = side / min(image.size)
    return image.resize((round(image.width * scale), round(image.height * scale)))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Six real photos (one in a subfolder, one grayscale) and one corrupt file."""
    root = tmp_path_factory.mktemp("images")
    (root / "sub").mkdir()
    _photo("astronaut").save(root / "astronaut.png")
    _photo("chelsea").save(root / "sub" / "chelsea.jpg")
    _photo("coffee").save(root / "coffee.JPG")
    _photo("rocket").save(root / "rocket.webp")
    _photo("camera").convert("L").save(root / "camera.png")
    _photo("hubble_deep_field").save(root / "hubble.bmp")
    (root / "broken.jpg").write_bytes(np.random.default_rng(0).bytes(2000))
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.jpg").write_bytes(b"")
    return root


def _dataset(root, **kwargs):
    options = dict(size=SIZE, batch_size=3, seed=0, templates="face", read_threads=2,
                   stats=data.SkipStats())
    return data.make_dataset(root, **{**options, **kwargs})


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_same_batches(first, second):
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a["pixels"], b["pixels"])
        np.testing.assert_array_equal(a["prompt"], b["prompt"])


# -------------------------------------------------------------------------- listing


def test_list_images_recursive_sorted_filtered(folder):
    names = [p.relative_to(folder).as_posix() for p in data.list_images(folder)]
    assert names == ["astronaut.png", "broken.jpg", "camera.png", "coffee.JPG", "hubble.bmp",
                     "rocket.webp", "sub/chelsea.jpg"]


def test_missing_or_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no images found under .*looked for .jpg"):
        data.list_images(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.make_dataset(tmp_path / "nowhere", size=SIZE, batch_size=1, seed=0)


# ------------------------------------------------------------------------- decoding


def test_load_image_modes(tmp_path):
    rgb = np.asarray(_photo("astronaut", side=64))
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=-1)
    rgba[:, :16, 3] = 0  # transparent stripe -> white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rgb).convert("L").save(tmp_path / "gray.png")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    Image.fromarray(rgb).convert("P").save(tmp_path / "palette.png")
    gray16 = (np.asarray(Image.fromarray(rgb).convert("L"), np.uint16) * 257)
    Image.fromarray(gray16).save(tmp_path / "gray16.png")

    out = data.load_image(tmp_path / "rgba.png")
    assert out.dtype == np.uint8 and out.shape == rgb.shape
    assert (out[:, :16] == 255).all()
    np.testing.assert_array_equal(out[:, 16:], rgb[:, 16:])

    gray = data.load_image(tmp_path / "gray.png")
    assert gray.shape == rgb.shape and (gray[..., 0] == gray[..., 2]).all()
    np.testing.assert_array_equal(data.load_image(tmp_path / "gray16.png"), gray)

    cmyk = data.load_image(tmp_path / "cmyk.jpg")
    assert cmyk.shape == rgb.shape
    assert np.abs(cmyk.astype(float) - rgb).mean() < 8

    palette = data.load_image(tmp_path / "palette.png")
    assert palette.shape == rgb.shape and np.abs(palette.astype(float) - rgb).mean() < 20


def test_load_image_exif_rotation_and_size(tmp_path):
    image = _photo("chelsea", side=60)  # landscape, 90 x 60 (W x H)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    image.save(tmp_path / "rotated.jpg", exif=exif)
    height, width = np.asarray(image).shape[:2]
    assert width > height
    assert data.load_image(tmp_path / "rotated.jpg").shape == (width, height, 3)
    assert data.load_image(tmp_path / "rotated.jpg", size=30).shape == (round(width / 2), 30, 3)


def test_load_image_unreadable(folder, tmp_path):
    assert data.load_image(folder / "broken.jpg") is None
    (tmp_path / "truncated.png").write_bytes((folder / "astronaut.png").read_bytes()[:500])
    assert data.load_image(tmp_path / "truncated.png") is None


# ----------------------------------------------------------------------- augmentation


def test_augment_deterministic_in_range():
    image = np.asarray(_photo("coffee"))
    first = data.augment(image, np.random.default_rng(7), SIZE)
    again = data.augment(image, np.random.default_rng(7), SIZE)
    other = data.augment(image, np.random.default_rng(8), SIZE)
    assert first.shape == (SIZE, SIZE, 3) and first.dtype == np.float32
    assert first.min() >= -1 and first.max() <= 1
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_augment_flip_and_center_crop():
    image = np.asarray(_photo("astronaut", side=SIZE))  # square SIZE x SIZE
    unflipped = data.augment(image, np.random.default_rng(0), SIZE, crop_scale=(1, 1), flip=False)
    np.testing.assert_allclose(unflipped, image / 127.5 - 1, atol=1e-6)
    flips = [data.augment(image, np.random.default_rng(s), SIZE, crop_scale=(1, 1)) for s in range(8)]
    assert any(np.array_equal(f, unflipped[:, ::-1]) for f in flips)
    assert any(np.array_equal(f, unflipped) for f in flips)
    wide = np.asarray(_photo("chelsea", side=SIZE))
    left = (wide.shape[1] - SIZE) // 2
    np.testing.assert_allclose(data.center_crop_resize(wide, SIZE), wide[:, left:left + SIZE] / 127.5 - 1, atol=1e-6)


# -------------------------------------------------------------------------- prompts


def test_templates(tmp_path):
    for domain, templates in data.PROMPT_TEMPLATES.items():
        assert data.load_templates(domain) == templates and len(templates) >= 8
        assert all("{}" in t for t in templates)
    assert "a painting in the style of {}" in data.PROMPT_TEMPLATES["art"]
    good = tmp_path / "good.txt"
    good.write_text("a photo of {}\n\n  a drawing of {}  \n")
    assert data.load_templates(good) == ["a photo of {}", "a drawing of {}"]
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo of {}\na photo of a dog\n")
    with pytest.raises(ValueError, match="template 2 'a photo of a dog' has no"):
        data.load_templates(bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no prompt template"):
        data.load_templates(empty)
    with pytest.raises(ValueError, match="unknown prompt templates 'dogs'"):
        data.load_templates("dogs")


# -------------------------------------------------------------------------- dataset


def test_batches_skip_and_count_unreadable(folder, caplog):
    stats = data.SkipStats()
    with caplog.at_level(logging.WARNING):
        batches = _take(_dataset(folder, stats=stats, placeholder="<e4t>"), 6)  # 18 images: 3 epochs
    for batch in batches:
        assert batch["pixels"].shape == (3, SIZE, SIZE, 3) and batch["pixels"].dtype == np.float32
        assert batch["pixels"].min() >= -1 and batch["pixels"].max() <= 1
        assert batch["prompt"].shape == (3,)
        assert all(p in [t.format("<e4t>") for t in data.PROMPT_TEMPLATES["face"]] for p in batch["prompt"])
    assert stats.skipped == 1 and str(folder / "broken.jpg") in stats.paths
    skip_logs = [r for r in caplog.records if "skipped unreadable image" in r.getMessage()]
    assert len(skip_logs) == 1 and "broken.jpg" in skip_logs[0].getMessage()


def test_all_unreadable_is_an_error(folder, tmp_path):
    (tmp_path / "a.png").write_bytes(b"not a png")
    (tmp_path / "b.jpg").write_bytes((folder / "broken.jpg").read_bytes())
    with pytest.raises(RuntimeError, match="all 2 images of this shard are unreadable"):
        next(_dataset(tmp_path))


def test_same_seed_same_batches_other_seed_differs(folder):
    first, again = _take(_dataset(folder), 3), _take(_dataset(folder), 3)
    _assert_same_batches(first, again)
    other = _take(_dataset(folder, seed=1), 3)
    assert not np.array_equal(first[0]["pixels"], other[0]["pixels"])
    pixels = np.concatenate([b["pixels"] for b in _take(_dataset(folder), 4)])  # 6 readable images an epoch
    assert not np.array_equal(pixels[:6], pixels[6:])


def test_exact_resume(folder):
    iterator = _dataset(folder)
    _take(iterator, 3)
    state = json.loads(json.dumps(data.dataset_state(iterator)))
    expected = _take(iterator, 2)
    fresh = _dataset(folder)
    data.restore_dataset_state(fresh, state)
    _assert_same_batches(expected, _take(fresh, 2))


def test_shards_disjoint_and_complete(tmp_path):
    colors = [(20 * i, 255 - 20 * i, 100) for i in range(7)]
    for i, color in enumerate(colors):
        Image.new("RGB", (24, 24), color).save(tmp_path / f"{i}.png")

    def shard_colors(index):
        batches = list(_dataset(tmp_path, shard_index=index, shard_count=2, batch_size=1, num_epochs=1))
        return [tuple(np.round((b["pixels"][0, 5, 5] + 1) * 127.5).astype(int)) for b in batches]

    first, second = shard_colors(0), shard_colors(1)
    assert len(first) == 4 and len(second) == 3
    assert set(first).isdisjoint(second) and sorted(first + second) == sorted(colors)
    with pytest.raises(ValueError, match="shard_index"):
        _dataset(tmp_path, shard_index=2, shard_count=2)


def test_random_access_source():
    class Source:
        def __init__(self):
            self.items = [{"image": _photo("astronaut", 40)}, {"image": None}, {"image": _photo("chelsea", 40)}]

        def __len__(self):
            return len(self.items)

        def __getitem__(self, index):
            return self.items[index]

    stats = data.SkipStats()
    batches = _take(data.make_dataset(hf_dataset=Source(), size=SIZE, batch_size=2, seed=0, stats=stats,
                                      read_threads=0), 3)
    assert all(b["pixels"].shape == (2, SIZE, SIZE, 3) for b in batches)
    assert stats.paths == {"hf_dataset[1]"}


def test_worker_processes_same_data_and_resume(folder):
    """Decoding in grain worker processes (``e4t-pretrain --workers 2``) changes neither the data nor the resume."""
    expected = _take(_dataset(folder), 4)
    iterator = _dataset(folder, workers=2)
    try:
        _assert_same_batches(expected[:2], _take(iterator, 2))
        state = json.loads(json.dumps(data.dataset_state(iterator)))
    finally:
        iterator.close()
    fresh = _dataset(folder, workers=2)
    try:
        data.restore_dataset_state(fresh, state)
        _assert_same_batches(expected[2:], _take(fresh, 2))
    finally:
        fresh.close()
