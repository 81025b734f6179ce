"""Same seed, same inputs, two separate processes: bit-identical outputs.

``e4t-personalize`` (the concept file's tensors and the preview PNG), ``e4t-generate``
(the PNGs) and ``e4t-pretrain`` (the exported encoder's params) each run twice as
subprocesses on the tiny model, one after the other. The second run reads the programs
that the first one compiled from their shared (new) compilation cache; two
``e4t-personalize`` runs that each compiled their own wrote the same bytes too (checked
once: 10 minutes on 2 busy CPU cores, too slow to keep).
"""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image


def _twice(tmp_path, module, make_argv):
    """Runs ``module`` in two processes, one after the other; returns their output folders."""
    outs = [tmp_path / f"run{i}" for i in range(2)]
    env = dict(os.environ, E4T_CACHE_DIR=str(tmp_path / "xla"))
    for out in outs:
        result = subprocess.run([sys.executable, "-m", module, *map(str, make_argv(out))], env=env,
                                capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
    return outs


def _same_bytes(first, second):
    assert first.keys() == second.keys()
    for key in first:
        assert first[key].dtype == second[key].dtype and first[key].tobytes() == second[key].tobytes(), key


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    import skimage.data

    path = tmp_path_factory.mktemp("photo") / "astronaut.png"
    Image.fromarray(skimage.data.astronaut()).resize((64, 64)).save(path)
    return path


@pytest.fixture(scope="module")
def personalized(tiny_model_dir, photo, tmp_path_factory):
    from e4t_jax.e4t.pretrained import preset_encoder_dir

    encoder = preset_encoder_dir("tiny", "face")
    return _twice(tmp_path_factory.mktemp("personalize"), "infer.personalize", lambda out: [
        "--model", "tiny", "--encoder", encoder, "--image", photo, "--out", out / "me.safetensors",
        "--steps", "2", "--batch-size", "2", "--seed", "3", "--preview-steps", "1", "--preview-prompt", "a photo of {}"])


def test_personalize_is_bit_exact_across_processes(personalized):
    from e4t_jax.e4t.concept import read_concept

    (tensors, header), (again, header_again) = (read_concept(out / "me.safetensors") for out in personalized)
    assert tensors and header["run"]["loss_after"] == header_again["run"]["loss_after"]
    _same_bytes(tensors, again)
    previews = [(out / "me.preview.png").read_bytes() for out in personalized]
    assert previews[0] == previews[1]


def test_generate_is_bit_exact_across_processes(personalized, tmp_path):
    concept = personalized[0] / "me.safetensors"
    outs = _twice(tmp_path, "infer.generate", lambda out: [
        "--model", "tiny", "--concept", concept, "--prompt", "a photo of S*", "--prompt", "a painting of S*",
        "--steps", "3", "--seed", "5", "--out", out / "images"])
    names = sorted(p.name for p in (outs[0] / "images").iterdir())
    assert "000.png" in names and names == sorted(p.name for p in (outs[1] / "images").iterdir())
    for name in names:
        assert (outs[0] / "images" / name).read_bytes() == (outs[1] / "images" / name).read_bytes(), name


def test_pretrain_is_bit_exact_across_processes(tiny_model_dir, photo, tmp_path):
    from e4t_jax import files

    images = tmp_path / "images"
    images.mkdir()
    for i, angle in enumerate((0, 90, 180)):
        Image.open(photo).rotate(angle).save(images / f"{i}.png")
    outs = _twice(tmp_path, "train.pretrain_encoder", lambda out: [
        "--model", tiny_model_dir, "--data", images, "--domain-word", "face", "--steps", "3", "--batch-size", "2",
        "--lr", "1e-3", "--head-width", "32", "--seed", "7", "--out", out / "run"])
    (*params, config), (*params_again, config_again) = (
        files.load_encoder(out / "run" / "encoder", expected=None) for out in outs)
    assert config == config_again and len(_flat(params)) > 4
    _same_bytes(_flat(params), _flat(params_again))


def _flat(tree):
    """``[head, offsets]`` -> ``{"head/...": numpy array, "offsets/...": ...}``."""
    from flax import traverse_util

    named = dict(zip(("head", "offsets"), tree))
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(named, sep="/").items()}
