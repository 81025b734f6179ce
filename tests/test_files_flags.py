"""Files and flags: nothing lost, nothing silent.

No command overwrites an input, or an existing output without ``--force``, and every
output is checked before a model is loaded; every numeric flag of every CLI is checked
(finite, in range: one line, exit 2); ``--model`` is required (except in the demo);
``--encoder`` takes a pre-training run folder; ``--init-latents`` is read in diffusers'
``[B, C, h, w]`` layout; a re-saved copy of a base model keeps its identity. The CLIs
run in-process; only one test personalizes (on the tiny model).
"""
import argparse
import importlib
import json
import logging
import os
import re
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from e4t_jax import cli, files, pipeline
from e4t_jax.errors import UserError

CLIS = {"e4t-generate": "infer.generate", "e4t-personalize": "infer.personalize", "e4t-export": "infer.export",
        "e4t-demo": "infer.demo", "e4t-pretrain": "train.pretrain_encoder", "train.digits": "train.digits",
        "e4t-ti": "train.textual_inversion", "e4t-dreambooth": "train.dreambooth"}
WITH_MODEL = ("e4t-generate", "e4t-personalize", "e4t-export", "e4t-pretrain", "e4t-ti", "e4t-dreambooth")


class _Parsed(Exception):
    """Raised in place of parsing: carries the CLI's parser out of its ``main``."""


@pytest.fixture(scope="module")
def parsers():
    """Each CLI's argument parser, caught as its ``main`` is about to parse."""
    found = {}
    original = cli.ArgumentParser.parse_args

    def capture(self, *args, **kwargs):
        raise _Parsed(self)

    cli.ArgumentParser.parse_args = capture
    try:
        for name, module in CLIS.items():
            with pytest.raises(_Parsed) as caught:  # a CLI that does not use cli.ArgumentParser fails here
                importlib.import_module(module).main([])
            found[name] = caught.value.args[0]
    finally:
        cli.ArgumentParser.parse_args = original
    return found


def _main(name):
    return importlib.import_module(CLIS[name]).main


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error" in err[0] and "Traceback" not in err[0], err
    return err[0]


def _numeric_flags(parser):
    return [a for a in parser._actions if a.option_strings and a.type not in (None, str, Path)]


def test_every_numeric_flag_uses_a_checked_type(parsers):
    for name, parser in parsers.items():
        for action in _numeric_flags(parser):
            assert getattr(action.type, "__name__", "") in ("integer", "number"), (name, action.option_strings)
    assert len(_numeric_flags(parsers["e4t-pretrain"])) >= 20


@pytest.mark.parametrize("bad", ["nan", "inf", "-5", "x"])
def test_bad_numbers_are_refused_with_one_line_and_status_2(parsers, capsys, bad):
    for name, parser in parsers.items():
        for action in _numeric_flags(parser):
            flag = action.option_strings[0]
            values = [bad] * (action.nargs if isinstance(action.nargs, int) else 1)
            assert _main(name)([flag, *values]) == 2, (name, flag)
            line = _one_error_line(capsys)
            assert f"argument {flag}" in line and f"see {parser.prog} --help" in line, line


def test_nan_guidance_is_refused_before_anything_loads(capsys, monkeypatch):
    monkeypatch.setattr(pipeline, "load_model", _never)
    assert _main("e4t-generate")(["--model", "tiny", "--prompt", "a cat", "--guidance", "nan"]) == 2
    assert "--guidance: must be a finite number, got 'nan'" in _one_error_line(capsys)


@pytest.mark.parametrize("name", WITH_MODEL)
def test_model_is_required(parsers, name, capsys):
    assert any(a.required for a in parsers[name]._actions if "--model" in a.option_strings)
    assert _main(name)([]) == 2
    assert "--model" in _one_error_line(capsys)


def test_the_demo_needs_no_model(parsers):
    assert not any("--model" in a.option_strings for a in parsers["e4t-demo"]._actions)


def test_help_shows_defaults(capsys):
    for name in CLIS:
        assert _main(name)(["--help"]) == 0
        assert "(default: " in capsys.readouterr().out, name
    _main("e4t-generate")(["--help"])
    assert "(default: 7.5)" in capsys.readouterr().out


# ------------------------------------------------------------------ outputs and inputs


def _never(*args, **kwargs):
    raise AssertionError("a model was loaded: the output check must come first")


class _Loaded(Exception):
    """The check passed and the program went on to load a model."""


def _loaded(*args, **kwargs):
    raise _Loaded()


def _photo(path: Path) -> Path:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def personalized(tmp_path_factory):
    """``e4t-personalize --image cat.png --out cat.safetensors`` on the tiny model, with a preview."""
    from e4t_jax.e4t.pretrained import preset_encoder_dir

    folder = tmp_path_factory.mktemp("personalize")
    photo = _photo(folder / "cat.png")
    before = photo.read_bytes()
    encoder = preset_encoder_dir("tiny", "face")
    argv = ["--model", "tiny", "--encoder", str(encoder), "--image", str(photo),
            "--out", str(folder / "cat.safetensors"),
            "--steps", "1", "--batch-size", "4",  # test_personalize's batch: its compiled step is cached
            "--preview-steps", "1", "--preview-prompt", "a photo of {}"]
    mask = os.umask(0o027)
    try:
        assert _main("e4t-personalize")(argv) == 0
    finally:
        os.umask(mask)
    return types.SimpleNamespace(folder=folder, photo=photo, before=before, argv=argv, encoder=encoder)


def test_personalize_keeps_the_photo_and_writes_a_preview_beside_the_concept(personalized):
    assert personalized.photo.read_bytes() == personalized.before
    assert sorted(p.name for p in personalized.folder.iterdir()) == ["cat.png", "cat.preview.png", "cat.safetensors"]


def test_written_files_honour_the_umask(personalized):
    for name in ("cat.safetensors", "cat.preview.png"):
        assert (personalized.folder / name).stat().st_mode & 0o777 == 0o640, name


def test_personalize_refuses_existing_outputs_before_loading(personalized, monkeypatch, capsys):
    from e4t_jax.recipes import personalize as recipe

    monkeypatch.setattr(recipe, "load_pretrained", _never)
    before = (personalized.folder / "cat.safetensors").read_bytes()
    assert _main("e4t-personalize")(personalized.argv) == 2
    assert "cat.safetensors already exists; pass --force" in _one_error_line(capsys)
    assert (personalized.folder / "cat.safetensors").read_bytes() == before
    monkeypatch.setattr(recipe, "load_pretrained", _loaded)
    with pytest.raises(_Loaded):
        _main("e4t-personalize")(personalized.argv + ["--force"])


def test_an_input_is_never_overwritten_even_with_force(personalized, monkeypatch, capsys):
    from e4t_jax.recipes import personalize as recipe

    monkeypatch.setattr(recipe, "load_pretrained", _never)
    preview_as_input = personalized.folder / "cat.preview.png"
    argv = ["--model", "tiny", "--encoder", str(personalized.encoder), "--image", str(preview_as_input),
            "--out", str(personalized.folder / "cat.safetensors"), "--force"]
    assert _main("e4t-personalize")(argv) == 2
    assert "would overwrite the input" in _one_error_line(capsys)


def test_generate_refuses_a_file_as_out_at_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pipeline, "load_model", _never)
    photo = _photo(tmp_path / "cat.png")
    before = photo.read_bytes()
    assert _main("e4t-generate")(["--model", "tiny", "--prompt", "a cat", "--out", str(photo), "--force"]) == 2
    assert "is a file" in _one_error_line(capsys) and photo.read_bytes() == before


def test_generate_refuses_existing_images_unless_forced(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pipeline, "load_model", _loaded)
    out = tmp_path / "out"
    out.mkdir()
    (out / "001.png").write_bytes(b"an earlier picture")
    (out / "notes.txt").write_text("the user's")
    argv = ["--model", "tiny", "--prompt", "a cat", "--num-images", "2", "--out", str(out)]
    assert _main("e4t-generate")(argv) == 2
    assert "001.png already exists; pass --force" in _one_error_line(capsys)
    with pytest.raises(_Loaded):
        _main("e4t-generate")(argv + ["--force"])
    (out / "001.png").unlink()
    with pytest.raises(_Loaded):  # a folder with other files is fine: nothing in it is replaced
        _main("e4t-generate")(argv)


def test_export_replaces_only_its_own_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pipeline, "resolve", _never)
    concept = tmp_path / "me.safetensors"
    concept.write_bytes(b"checked later")
    argv = ["--concept", str(concept), "--model", "tiny"]
    assert _main("e4t-export")(argv + ["--out", str(tmp_path), "--force"]) == 2  # holds the concept
    assert "would overwrite the input" in _one_error_line(capsys)
    foreign = tmp_path / "photos"
    foreign.mkdir()
    _photo(foreign / "cat.png")
    assert _main("e4t-export")(argv + ["--out", str(foreign), "--force"]) == 2
    assert "not a folder that e4t-export wrote" in _one_error_line(capsys)


@pytest.mark.parametrize("name, argv", [
    ("e4t-demo", []),
    ("train.digits", []),
])
def test_run_folders_with_foreign_files_are_refused(tmp_path, capsys, name, argv):
    out = tmp_path / "out"
    out.mkdir()
    _photo(out / "holiday.png")
    assert _main(name)(argv + ["--out", str(out)]) == 2
    assert "holiday.png" in _one_error_line(capsys)
    assert _main(name)(argv + ["--out", str(out / "holiday.png")]) == 2
    assert "is a file" in _one_error_line(capsys)


def test_pretrain_never_writes_into_its_data(tmp_path, monkeypatch, capsys):
    from e4t_jax.e4t import model as model_lib

    monkeypatch.setattr(model_lib, "build", _never)
    data = tmp_path / "photos"
    data.mkdir()
    _photo(data / "a.png")
    for out in (data, data / "run"):
        argv = ["--preset", "tiny", "--model", "tiny", "--data", str(data), "--out", str(out)]
        assert _main("e4t-pretrain")(argv) == 2
        assert "would overwrite the input" in _one_error_line(capsys)


def test_check_outputs_and_folders():
    with pytest.raises(UserError, match="would overwrite the input"):
        files.check_outputs([Path(__file__)], inputs=[Path(__file__).parent], force=True)
    files.check_outputs([Path(__file__).parent / "new.png"], inputs=["tiny", None, "owner/model"])
    with pytest.raises(UserError, match="did not write"):
        files.check_folder(Path(__file__).parent, {"conftest.py"}, "a program")


def test_atomic_writes_honour_the_umask(tmp_path):
    mask = os.umask(0o007)
    try:
        with files.atomic_path(tmp_path / "file.bin") as tmp:
            tmp.write_bytes(b"x")
            tmp.chmod(0o600)  # as safetensors' writer leaves its files
        with files.atomic_path(tmp_path / "folder") as tmp:
            (tmp / "sub").mkdir(parents=True)
            (tmp / "sub" / "f").write_bytes(b"x")
            (tmp / "sub" / "f").chmod(0o600)
    finally:
        os.umask(mask)
    assert (tmp_path / "file.bin").stat().st_mode & 0o777 == 0o660
    assert (tmp_path / "folder" / "sub" / "f").stat().st_mode & 0o777 == 0o660
    assert (tmp_path / "folder" / "sub").stat().st_mode & 0o777 == 0o770


# --------------------------------------------------------------------------- --encoder


def test_encoder_accepts_a_run_folder_and_says_what_else_to_pass(tmp_path):
    from e4t_jax.e4t.pretrained import encoder_folder

    run = tmp_path / "run"
    (run / "encoder" / "config").mkdir(parents=True)
    assert encoder_folder(run) == run / "encoder" and encoder_folder(run / "encoder") == run / "encoder"
    (tmp_path / "crashed" / "checkpoints").mkdir(parents=True)
    (tmp_path / "concept.safetensors").write_bytes(b"")
    (tmp_path / "photos").mkdir()
    for path, message in ((tmp_path / "crashed", "without an exported encoder yet"),
                          (tmp_path / "concept.safetensors", "is a file; pass the folder that e4t-pretrain exported"),
                          (tmp_path / "photos", "not a domain encoder; pass the folder"),
                          (tmp_path / "missing", "does not exist; pass the folder")):
        with pytest.raises(UserError, match=message):
            encoder_folder(path)


# ---------------------------------------------------------------------- --init-latents


@pytest.mark.parametrize("shape, message", [
    ((1, 4, 8, 8), None), ((1, 8, 8, 4), None), ((1, 4, 4, 4), "look alike"), ((1, 3, 8, 8), "needs [B, C, h, w]"),
    ((2, 4, 8, 8), "needs [B, C, h, w] = (1, 4, 8, 8)"),
])
def test_init_latents_layouts(tmp_path, shape, message):
    from e4t_jax.recipes.generate import read_latents

    latents = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    np.save(tmp_path / "x.npy", latents)
    expected = (1, shape[2], shape[3], 4) if shape == (1, 4, 4, 4) else (1, 8, 8, 4)
    if message:
        with pytest.raises(UserError, match=re.escape(message)):
            read_latents(tmp_path / "x.npy", expected)
        return
    read = read_latents(tmp_path / "x.npy", expected)
    np.testing.assert_array_equal(read, latents.transpose(0, 2, 3, 1) if shape[1] == 4 else latents)


def test_init_latents_must_be_finite_numbers(tmp_path):
    from e4t_jax.recipes.generate import read_latents

    np.save(tmp_path / "nan.npy", np.full((1, 4, 8, 8), np.nan, np.float32))
    with pytest.raises(UserError, match="NaN or infinite"):
        read_latents(tmp_path / "nan.npy", (1, 8, 8, 4))
    (tmp_path / "text.npy").write_text("not an array")
    with pytest.raises(UserError, match="not a .npy array file"):
        read_latents(tmp_path / "text.npy", (1, 8, 8, 4))


def test_generate_reads_documented_latents_and_counts_in_words(tiny_model_dir, tmp_path, caplog):
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    np.save(tmp_path / "nchw.npy", latents)
    np.save(tmp_path / "nhwc.npy", latents.transpose(0, 2, 3, 1))
    for layout in ("nchw", "nhwc"):
        with caplog.at_level(logging.INFO):
            assert _main("e4t-generate")(["--model", str(tiny_model_dir), "--prompt", "a cat", "--steps", "2",
                                          "--init-latents", str(tmp_path / f"{layout}.npy"),
                                          "--out", str(tmp_path / layout)]) == 0
    assert "wrote 1 image and" in caplog.text
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "nchw" / "000.png")),
                                  np.asarray(Image.open(tmp_path / "nhwc" / "000.png")))


# ------------------------------------------------------------------ base-model identity


@pytest.fixture(scope="module")
def resaved(tiny_model_dir, tmp_path_factory):
    """The tiny model with its U-Net config re-saved: other key order, bookkeeping keys, newer defaults."""
    folder = shutil.copytree(tiny_model_dir, tmp_path_factory.mktemp("resaved") / "model")
    config_file = folder / "unet" / "config.json"
    config = json.loads(config_file.read_text())
    config = {"_name_or_path": "/somewhere/else", "_diffusers_version": "0.99.0", "dropout": 0.0,
              "attention_type": "default", **dict(reversed(list(config.items())))}
    config_file.write_text(json.dumps(config, indent=4))
    return folder


@pytest.fixture(scope="module")
def concept_for_tiny(tiny_model_dir, tmp_path_factory):
    from e4t_jax.e4t import concept as concept_lib
    from e4t_jax.e4t.config import E4TConfig

    sd, _, _ = pipeline.load_model(tiny_model_dir)
    path = tmp_path_factory.mktemp("concept") / "c.safetensors"
    return concept_lib.save_concept(path, embedding=np.zeros(sd.text_dim), config=E4TConfig(), sd=sd)


def _rewrite_identity(concept_file: Path, out: Path, change) -> Path:
    from safetensors.numpy import save_file

    from e4t_jax.e4t import concept as concept_lib

    tensors, header = concept_lib.read_concept(concept_file)
    change(header["base_model"])
    save_file(tensors, str(out), metadata={"e4t": json.dumps(header)})
    return out


def test_a_resaved_model_keeps_its_identity_and_another_architecture_is_named(resaved, concept_for_tiny, tmp_path):
    from e4t_jax.e4t import concept as concept_lib
    from e4t_jax.tokenizer import Tokenizer

    sd, _, _ = pipeline.load_model(resaved)
    concept_lib.load_concept(concept_for_tiny, sd, Tokenizer.from_folder(resaved))

    def wider(identity):
        identity["unet_architecture"]["block_out_channels"] = [320, 640]

    other = _rewrite_identity(concept_for_tiny, tmp_path / "other.safetensors", wider)
    with pytest.raises(concept_lib.ConceptError, match=r"U-Net block_out_channels \[320, 640\]; this model has \["):
        concept_lib.load_concept(other, sd, Tokenizer.from_folder(resaved))


def test_files_with_the_legacy_fingerprint_still_load(tiny_model_dir, concept_for_tiny, tmp_path):
    from e4t_jax import weights
    from e4t_jax.e4t import concept as concept_lib
    from e4t_jax.tokenizer import Tokenizer

    fingerprint = files.legacy_fingerprint(weights.read_config(tiny_model_dir / "unet"))

    def legacy(identity):
        del identity["unet_architecture"]
        identity["unet_config_sha256"] = fingerprint

    old = _rewrite_identity(concept_for_tiny, tmp_path / "old.safetensors", legacy)
    sd, _, _ = pipeline.load_model(tiny_model_dir)
    concept_lib.load_concept(old, sd, Tokenizer.from_folder(tiny_model_dir))


def test_a_variant_is_read_when_asked_for(tiny_model_dir, tmp_path):
    from e4t_jax import weights

    folder = shutil.copytree(tiny_model_dir, tmp_path / "model")
    for name in ("unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model", "text_encoder/model"):
        (folder / f"{name}.safetensors").rename(folder / f"{name}.fp16.safetensors")
    with pytest.raises(weights.CheckpointError, match="pass --variant"):
        pipeline.load_model(folder)
    sd, _, _ = pipeline.load_model(folder, variant="fp16")
    assert sd.text_dim > 0


# ------------------------------------------------------------------------------ messages


def test_the_transformers_no_pytorch_notice_is_filtered(caplog):
    import e4t_jax.tokenizer  # noqa: F401 - installs the filter

    with caplog.at_level(logging.WARNING):
        logging.getLogger("transformers").warning("PyTorch was not found. Models won't be available ...")
        logging.getLogger("transformers").warning("another warning")
    assert "PyTorch was not found" not in caplog.text and "another warning" in caplog.text


def test_a_nan_loss_before_any_checkpoint_says_so(tmp_path):
    from e4t_jax.training import loop

    manager = types.SimpleNamespace(latest_step=lambda: None, wait_until_finished=lambda: None)
    with pytest.raises(FloatingPointError, match="No checkpoint was saved yet"):
        loop.run(lambda state, frozen, batch: (state, {"loss": np.float32(np.nan)}), types.SimpleNamespace(step=0),
                 None, iter([{"x": np.zeros(1)}]), steps=1, global_batch_size=1, manager=manager,
                 data_state=lambda: None, config={}, out=tmp_path)


def test_argument_types():
    assert cli.integer(1, 3)("2") == 2 and cli.number(0, above=True)("1e-5") == 1e-5
    for parse, text in ((cli.integer(1), "0"), (cli.number(0), "-inf"), (cli.number(0, above=True), "0"),
                        (cli.PIXELS, "12"), (cli.SEED, str(2**32))):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)
