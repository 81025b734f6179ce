"""Hostile and broken inputs: refused with one line (exit status 2), never a traceback.

Images of every kind are written here by PIL (16-bit RGB PNGs by numpy and zlib, which
PIL cannot write): the odd modes decode to upright uint8 RGB, the broken ones are
skipped and counted by pre-training and refused by ``e4t-personalize`` in one line; an
image whose header asks for too many pixels is refused before any pixel is decoded.
Model and encoder folders with missing, damaged, foreign or absurd configs are refused
by the CLIs in one line, before anything is allocated.
"""
import importlib
import json
import logging
import re
import shutil
import struct
import zlib
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image, ImageFile

from e4t_jax import files, weights
from e4t_jax.training import data

SIDE = 24


def _rgb(side=SIDE):
    """A smooth uint8 ``[side, 2 side, 3]`` picture (landscape: rotations show)."""
    y, x = np.mgrid[:side, :2 * side]
    return np.stack([x * 255 // (2 * side), y * 255 // side, np.full_like(x, 90)], -1).astype(np.uint8)


def _png(width, height, depth, color_type, rows: bytes) -> bytes:
    """A PNG file from its raw scanlines (each starting with its filter byte)."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def _rgb16_png(path, rgb16):
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rgb16)
    path.write_bytes(_png(rgb16.shape[1], rgb16.shape[0], 16, 2, rows))


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """Readable images of every odd kind -> what each must decode to (uint8 ``[H, W, 3]``)."""
    root = tmp_path_factory.mktemp("good")
    rgb = _rgb()
    expected = {}

    def add(name, image, want, **save):
        image.save(root / name, **save)
        expected[name] = want

    add("cmyk.jpg", Image.fromarray(rgb).convert("CMYK"), rgb, quality=98)
    gray16 = np.asarray(Image.fromarray(rgb).convert("L"), np.uint16) * 257
    gray = np.repeat(np.asarray(Image.fromarray(rgb).convert("L"))[..., None], 3, -1)
    add("gray16.png", Image.fromarray(gray16), gray)
    assert Image.open(root / "gray16.png").mode == "I;16"
    _rgb16_png(root / "rgb16.png", rgb.astype(np.uint16) * 257)
    expected["rgb16.png"] = rgb
    palette = Image.fromarray(rgb).quantize(16)
    indices = np.asarray(palette).copy()
    indices[:, :4] = 16  # an extra palette entry, the transparent one
    transparent = Image.frombytes("P", palette.size, indices.tobytes())
    transparent.putpalette(palette.getpalette()[:48] + [0, 0, 0])
    see_through = np.asarray(palette.convert("RGB")).copy()
    see_through[:, :4] = 255
    add("palette.png", transparent, see_through, transparency=16)
    alpha = np.where(np.arange(2 * SIDE) < SIDE, 0, 255).astype(np.uint8)[None].repeat(SIDE, 0)
    half = np.where(alpha[..., None] == 0, 255, gray)
    add("la.png", Image.merge("LA", [Image.fromarray(gray[..., 0]), Image.fromarray(alpha)]), half)
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], -1)
    add("rgba.webp", Image.fromarray(rgba, "RGBA"), rgb, lossless=True)
    frames = [Image.fromarray(rgb), Image.fromarray(255 - rgb)]
    add("animated.gif", frames[0].quantize(256), np.asarray(frames[0].quantize(256).convert("RGB")),
        save_all=True, append_images=[frames[1].quantize(256)], duration=50, loop=0)
    add("animated.webp", frames[0], rgb, save_all=True, append_images=frames[1:], duration=50, lossless=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    add("exif.png", Image.fromarray(rgb), np.rot90(rgb, -1), exif=exif)
    return root, expected


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    """Unreadable files of every kind -> a word their error message must hold."""
    root = tmp_path_factory.mktemp("broken")
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8))
    (root / "empty.png").write_bytes(b"")
    for suffix in ("png", "jpg"):  # cut in the middle of the pixel data
        noise.save(root / f"whole.{suffix}")
        whole = (root / f"whole.{suffix}").read_bytes()
        (root / f"truncated.{suffix}").write_bytes(whole[:len(whole) // 2])
        (root / f"whole.{suffix}").unlink()
    (root / "noise.webp").write_bytes(np.random.default_rng(0).bytes(500))
    # A 20000 x 20000 RGB header over one row: decoding would allocate 1.2 GB first.
    (root / "bomb.png").write_bytes(_png(20000, 20000, 8, 2, b"\x00" + bytes(3 * 20000)))
    return root, {"empty.png": "empty (0 bytes)", "truncated.png": "not a readable picture",
                  "truncated.jpg": "not a readable picture", "noise.webp": "not a readable picture",
                  "bomb.png": "400000000 pixels"}


# ---------------------------------------------------------------------------- images


def test_every_odd_mode_decodes_to_upright_rgb(good):
    root, expected = good
    for name, want in expected.items():
        out = data.decode_image(root / name)
        assert out.dtype == np.uint8 and out.shape == want.shape, name
        tolerance = 6 if name.endswith(".jpg") else 0  # CMYK JPEG is lossy
        assert np.abs(out.astype(int) - want).max() <= tolerance, name


def test_broken_files_say_why(broken):
    root, reasons = broken
    for name, reason in reasons.items():
        with pytest.raises(data.UnreadableImage, match=re.escape(reason)) as caught:
            data.read_image(root / name)
        assert str(root / name) in str(caught.value) and "\n" not in str(caught.value)
        assert data.load_image(root / name) is None


@pytest.mark.parametrize("pil_limit", [Image.MAX_IMAGE_PIXELS, None])
def test_a_pixel_bomb_is_refused_from_its_header(broken, monkeypatch, pil_limit):
    """Refused before decoding, even where PIL's own limit is turned off."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pil_limit)

    def never(self):
        raise AssertionError("the bomb's pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", never)
    with pytest.raises(data.UnreadableImage, match="pixels"):
        data.decode_image(broken[0] / "bomb.png")


def test_the_pixel_limit_is_the_documented_one(tmp_path, monkeypatch):
    Image.fromarray(_rgb()).save(tmp_path / "small.png")
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", SIDE * 2 * SIDE)
    assert data.decode_image(tmp_path / "small.png").shape == (SIDE, 2 * SIDE, 3)
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", SIDE * 2 * SIDE - 1)
    with pytest.raises(data.UnreadableImage, match="over the limit"):
        data.decode_image(tmp_path / "small.png")


def test_pretraining_skips_and_counts_each_broken_kind(good, broken, tmp_path, caplog):
    root = tmp_path / "mixed"
    root.mkdir()
    for folder in (good[0], broken[0]):
        for file in folder.iterdir():
            (root / file.name).write_bytes(file.read_bytes())
    stats = data.SkipStats()
    with caplog.at_level(logging.WARNING):
        iterator = data.make_dataset(root, size=16, batch_size=4, seed=0, read_threads=1, stats=stats)
        batches = [next(iterator) for _ in range(6)]  # 24 readable draws: every file met at least once
    assert all(b["pixels"].shape == (4, 16, 16, 3) and np.isfinite(b["pixels"]).all() for b in batches)
    assert stats.paths == {str(root / name) for name in broken[1]}
    logged = [r.getMessage() for r in caplog.records if "skipped unreadable image" in r.getMessage()]
    assert sorted(logged) == sorted(f"skipped unreadable image {root / name}" for name in broken[1])


# ----------------------------------------------------------------------------- CLIs


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    return err[0]


def _personalize(argv):
    return importlib.import_module("infer.personalize").main(argv)


@pytest.fixture(scope="module")
def encoder(tiny_model_dir):
    from e4t_jax.e4t.pretrained import preset_encoder_dir

    return preset_encoder_dir("tiny", "face")


def test_personalize_refuses_each_broken_image_in_one_line(broken, encoder, tmp_path, capsys):
    root, reasons = broken
    for name, reason in reasons.items():
        argv = ["--model", "tiny", "--encoder", str(encoder), "--image", str(root / name),
                "--out", str(tmp_path / "c.safetensors"), "--no-preview"]
        assert _personalize(argv) == 2, name
        line = _one_error_line(capsys)
        assert reason in line and name in line, line
        assert not (tmp_path / "c.safetensors").exists()


# --------------------------------------------------------------------- model folders


def _edit_json(file, **changes):
    config = json.loads(file.read_text())
    file.write_text(json.dumps({**config, **changes}))


def _big_json(file):
    file.write_text(" " * files.MAX_JSON_BYTES + "{}")


# What to break in a copy of the tiny model, what the one line must say, and the part
# whose weights are never read (refused before: "*", no weights read at all).
MODEL_DAMAGE = {
    "no vae folder": (lambda m: shutil.rmtree(m / "vae"), "has no vae/ folder", "*"),
    "no unet config": (lambda m: (m / "unet" / "config.json").unlink(), "config.json is missing", "*"),
    "unet config not JSON": (lambda m: (m / "unet" / "config.json").write_text("{'sample_size': 8"),
                             "is not valid JSON", "*"),
    "unet config a list": (lambda m: (m / "unet" / "config.json").write_text("[8, 4]"), "not the object", "*"),
    "deeply nested JSON": (lambda m: (m / "vae" / "config.json").write_text("[" * 100_000 + "]" * 100_000),
                           "is not valid JSON", "vae"),
    "oversized config": (lambda m: _big_json(m / "scheduler" / "scheduler_config.json"), "over the limit", None),
    "oversized tokenizer file": (lambda m: _big_json(m / "tokenizer" / "vocab.json"), "over the limit", None),
    "million channels": (lambda m: _edit_json(m / "unet" / "config.json", block_out_channels=[10**6, 10**6]),
                         "tensor", "*"),
    "billion-wide text": (lambda m: _edit_json(m / "text_encoder" / "config.json", hidden_size=10**9),
                          "hidden_size is 1000000000; it must be from 1 to 1048576", "text_encoder"),
    "million layers": (lambda m: _edit_json(m / "text_encoder" / "config.json", num_hidden_layers=10**6),
                       "num_hidden_layers is 1000000; it must be from 1 to 256", "text_encoder"),
    "negative layers": (lambda m: _edit_json(m / "vae" / "config.json", layers_per_block=-1),
                        "layers_per_block is -1", "vae"),
    "zero width": (lambda m: _edit_json(m / "unet" / "config.json", cross_attention_dim=0),
                   "cross_attention_dim is 0", "*"),
    "string size": (lambda m: _edit_json(m / "unet" / "config.json", in_channels="4"),
                    "in_channels must be int, got '4'", "*"),
    "string list": (lambda m: _edit_json(m / "vae" / "config.json", block_out_channels=16), "vae/config.json", "vae"),
    "groups that do not divide": (lambda m: _edit_json(m / "vae" / "config.json", norm_num_groups=7),
                                  "describes no model that can be built", "vae"),
    "too many levels": (lambda m: _edit_json(m / "unet" / "config.json", down_block_types=["DownBlock2D"] * 40,
                                             up_block_types=["UpBlock2D"] * 40, block_out_channels=[32] * 40,
                                             layers_per_block=1, attention_head_dim=4),
                        "from 1 to 8 resolution levels", "*"),
}


@pytest.fixture
def damaged(tiny_model_dir, tmp_path):
    """A copy of the tiny model to break."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    return model


def _generate(model, tmp_path):
    argv = ["--model", str(model), "--prompt", "a cat", "--steps", "1", "--out", str(tmp_path / "images")]
    return importlib.import_module("infer.generate").main(argv)


@pytest.mark.parametrize("damage", MODEL_DAMAGE)
def test_a_damaged_model_folder_is_refused_in_one_line(damaged, tmp_path, monkeypatch, capsys, damage):
    breaking, message, unread = MODEL_DAMAGE[damage]
    breaking(damaged)
    read_weights = weights.load_state_dict

    def spy(folder, **kwargs):
        assert unread not in ("*", Path(folder).name), f"{folder}'s weights were read before its config was refused"
        return read_weights(folder, **kwargs)

    monkeypatch.setattr(weights, "load_state_dict", spy)
    assert _generate(damaged, tmp_path) == 2
    line = _one_error_line(capsys)
    assert message in line, line
    assert not (tmp_path / "images").exists()


def test_weights_that_do_not_fit_their_config_are_named(damaged, tmp_path, capsys):
    _edit_json(damaged / "text_encoder" / "config.json", intermediate_size=72)
    assert _generate(damaged, tmp_path) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: The checkpoint does not fit the CLIP text encoder configuration:")
    assert "mlp.fc2.weight: checkpoint (32, 64), model expects (72, 32)" in err and "Traceback" not in err


def test_the_limits_are_checked_on_abstract_params_only(monkeypatch):
    """The total is counted by eval_shape: a model just over the limit is refused, nothing allocated."""
    from e4t_jax.models import limits
    from e4t_jax.models.unet import UNetConfig, unet_abstract_params

    config = UNetConfig(sample_size=8, block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D",
                        "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=(1, 1),
                        num_attention_heads=(4, 4), transformer_layers_per_block=(1, 1),
                        only_cross_attention=(False, False), cross_attention_dim=32, norm_num_groups=16)
    total = sum(leaf.size for leaf in jax.tree.leaves(unet_abstract_params(config)))
    monkeypatch.setattr(limits, "MAX_PARAMS", total)
    unet_abstract_params(config)
    monkeypatch.setattr(limits, "MAX_PARAMS", total - 1)
    with pytest.raises(ValueError, match=f"asks for {total} parameters, over the limit of {total - 1}"):
        unet_abstract_params(config)


def test_a_vision_tower_config_is_checked_before_its_weights(tiny_model_dir, tmp_path, monkeypatch):
    from e4t_jax.errors import UserError
    from e4t_jax.models import clip

    tower = tmp_path / "image_encoder"
    shutil.copytree(tiny_model_dir / "image_encoder", tower)
    _edit_json(tower / "config.json", image_size=10**7)
    monkeypatch.setattr(weights, "load_state_dict", lambda *a, **k: pytest.fail("weights read"))
    with pytest.raises(UserError, match=r"image_encoder/config.json: CLIP vision config.image_size is 10000000"):
        clip.load_clip_vision(tower)


# -------------------------------------------------------------------- encoder folders


def _copy_encoder(encoder, tmp_path):
    copy = tmp_path / "encoder"
    shutil.copytree(encoder, copy)
    return copy


def _set_encoder(file, field, value):
    config = json.loads(file.read_text())
    config["e4t"]["encoder"][field] = value
    file.write_text(json.dumps(config))


ENCODER_DAMAGE = {
    "no config item": (lambda e: shutil.rmtree(e / "config"), "is a folder but not a domain encoder"),
    "no params item": (lambda e: shutil.rmtree(e / "params"), "has no params item"),
    "config not JSON": (lambda e: (e / "config" / "metadata").write_text('{"e4t": '), "is not valid JSON"),
    "config a list": (lambda e: (e / "config" / "metadata").write_text("[1]"), "is a JSON list, not an object"),
    "oversized config": (lambda e: _big_json(e / "config" / "metadata"), "over the limit"),
    "wrong types": (lambda e: _set_encoder(e / "config" / "metadata", "hidden_dim", "wide"),
                    "encoder config.encoder.hidden_dim must be int"),
    "params of another head": (lambda e: _set_encoder(e / "config" / "metadata", "hidden_dim", 48),
                               "its config builds"),
    "another model": (lambda e: _edit_json(e / "config" / "metadata", base_model={
        "text_width": 768, "cross_attention_dim": 768, "unet_architecture": {"cross_attention_dim": 768}}),
        "was pre-trained for a base model with text width 768; this model has 32"),
}


@pytest.mark.parametrize("damage", ENCODER_DAMAGE)
def test_a_damaged_encoder_folder_is_refused_by_personalize_in_one_line(encoder, tmp_path, capsys, damage):
    breaking, message = ENCODER_DAMAGE[damage]
    copy = _copy_encoder(encoder, tmp_path)
    breaking(copy)
    Image.fromarray(_rgb()).save(tmp_path / "me.png")
    argv = ["--model", "tiny", "--encoder", str(copy), "--image", str(tmp_path / "me.png"),
            "--out", str(tmp_path / "me.safetensors"), "--no-preview"]
    assert _personalize(argv) == 2
    line = _one_error_line(capsys)
    assert message in line, line
    assert not (tmp_path / "me.safetensors").exists()
