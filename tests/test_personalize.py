"""e4t-personalize and e4t-generate on the tiny model with a real photo (skimage's astronaut).

Two personalization runs run in fresh processes, as a user runs them, with one fresh
compilation cache: the first checks the tuning and the concept file, the second that
the cache removes most of the compile time, and both that the same seed and inputs give
bit-identical concept tensors and previews (as two generation processes give
bit-identical PNGs). Two runs that each compiled their own programs wrote the same bytes
too (checked once: 10 minutes on 2 busy CPU cores, too slow to keep). (The demo runs the trained digits preset:
tests/test_digits_default.py.)
Bad inputs run in-process and must end with status 2, one line on stderr and nothing
written.
"""
import json
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from flax import traverse_util
from PIL import Image

from e4t_jax import presets, weights
from e4t_jax.e4t import concept as concept_lib
from e4t_jax.e4t.pretrained import encoder_fingerprint, load_pretrained, preset_encoder_dir
from e4t_jax.files import base_model_identity
from e4t_jax.models.unet import UNetConfig
from infer import generate, personalize

TUNING = ["--steps", "15", "--batch-size", "4", "--lr", "1e-3", "--seed", "3",
          "--preview-steps", "1", "--preview-prompt", "a photo of {}"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The tiny model's random face encoder, the astronaut photo, and a fresh compile cache folder."""
    folder = tmp_path_factory.mktemp("personalize")
    photo = folder / "astronaut.png"
    Image.fromarray(skimage.data.astronaut()).save(photo)
    return types.SimpleNamespace(folder=folder, photo=photo, encoder=preset_encoder_dir("tiny", "face"),
                                 cache=folder / "xla")


def _run(inputs, module: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m module args`` in a fresh process; fails the test unless it exits 0."""
    done = subprocess.run([sys.executable, "-m", module, *args, "--cache-dir", str(inputs.cache)],
                          capture_output=True, text=True, cwd=inputs.folder, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _personalize_compile_seconds(log: str) -> float:
    return float(re.search(r"^timings: load [0-9.]+s, compile ([0-9.]+)s, tune", log, re.M).group(1))


@pytest.fixture(scope="module")
def runs(inputs):
    """e4t-personalize twice, in fresh processes sharing one --cache-dir."""
    return tuple(_run(inputs, "infer.personalize", "--model", "tiny", "--encoder", str(inputs.encoder),
                      "--image", str(inputs.photo), *TUNING, "--out", str(inputs.folder / f"{name}.safetensors"))
                 for name in ("first", "second"))


@pytest.fixture(scope="module")
def concept_file(inputs, runs):
    return inputs.folder / "first.safetensors"


def test_tuning_loss_falls(runs):
    found = re.search(r"tuning loss on a fixed batch and noise: ([0-9.]+) -> ([0-9.]+)", runs[0].stderr)
    assert found, runs[0].stderr[-3000:]
    before, after = map(float, found.groups())
    assert after < before


def test_concept_file_header_and_size(concept_file):
    tensors, header = concept_lib.read_concept(concept_file)
    model = presets.preset_dir("tiny")
    text_width = weights.read_config(model / "text_encoder")["hidden_size"]
    words = header["config"]["model"]
    assert words["placeholder"] == "S*" and words["domain_word"] == "face" and header["model_id"] == "tiny"
    architecture = UNetConfig.from_diffusers(weights.read_config(model / "unet")).architecture()
    assert header["base_model"] == base_model_identity(architecture, text_width)
    assert tensors["embedding"].shape == (text_width,)
    domain = sorted(name[len("domain/"):] for name in tensors if name.startswith("domain/"))
    assert domain and domain == sorted(name[len("delta/"):] for name in tensors if name.startswith("delta/"))
    assert not any(n.startswith(("head/", "offsets/")) for n in tensors)
    size = concept_file.stat().st_size
    print(f"concept file: {size / 1024:.1f} KiB")
    assert size < 100 * 1024


def test_the_concept_records_its_encoders_fingerprint(inputs, concept_file):
    """The loaded encoder and the concept compute one fingerprint, whatever the placeholder."""
    _, header = concept_lib.read_concept(concept_file)
    e = load_pretrained("tiny", inputs.encoder, placeholder="S2*")
    assert header["encoder_fingerprint"] == encoder_fingerprint(e.config, e.params.offsets)
    tensors, _ = concept_lib.read_concept(concept_file)
    flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(e.params.offsets, sep="/").items()}
    assert all(np.array_equal(tensors[f"domain/{k}"], v) for k, v in flat.items())


def test_compile_cache_makes_second_run_compile_faster(runs):
    first, second = (_personalize_compile_seconds(run.stderr) for run in runs)
    print(f"compile: first run {first:.1f}s, second run (cache) {second:.1f}s")
    assert second < 0.7 * first


def test_personalize_is_bit_exact_across_processes(inputs, runs):
    outputs = [inputs.folder / f"{name}.safetensors" for name in ("first", "second")]
    (tensors, header), (again, header_again) = map(concept_lib.read_concept, outputs)
    assert tensors and header["run"]["loss_after"] == header_again["run"]["loss_after"]
    assert tensors.keys() == again.keys()
    for key, value in tensors.items():
        assert value.dtype == again[key].dtype and value.tobytes() == again[key].tobytes(), key
    previews = [path.with_suffix(".preview.png").read_bytes() for path in outputs]
    assert previews[0] == previews[1]


def test_generate_is_bit_exact_across_processes(inputs, concept_file, tmp_path):
    outs = [tmp_path / f"run{i}" for i in range(2)]
    for out in outs:
        _run(inputs, "infer.generate", "--model", "tiny", "--concept", str(concept_file), "--prompt", "a photo of S*",
             "--prompt", "a painting of S*", "--steps", "3", "--seed", "5", "--out", str(out))
    names = sorted(p.name for p in outs[0].iterdir())
    assert "000.png" in names and names == sorted(p.name for p in outs[1].iterdir())
    for name in names:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name


def test_generate_with_concept(concept_file, tmp_path):
    out = tmp_path / "images"
    code = generate.main(["--model", "tiny", "--concept", str(concept_file), "--prompt", "a photo of S*",
                          "--num-images", "2", "--steps", "3", "--out", str(out)])
    assert code == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["000.png", "001.png", "grid.png"]
    assert Image.open(out / "000.png").size == (64, 64)
    assert all(line.endswith("\ta photo of S*") for line in (out / "prompts.txt").read_text().splitlines())


def test_generate_reencodes_with_the_concepts_own_encoder_only(inputs, concept_file, tmp_path, capsys):
    args = ["--model", "tiny", "--concept", str(concept_file), "--prompt", "a photo of S*", "--steps", "2",
            "--reencode"]
    assert generate.main([*args, "--encoder", str(inputs.encoder), "--out", str(tmp_path / "same")]) == 0
    capsys.readouterr()
    other = preset_encoder_dir("tiny", "cat")  # another domain word: another encoder
    assert generate.main([*args, "--encoder", str(other), "--out", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "is not the domain encoder that" in err[0], err
    assert not (tmp_path / "other").exists()


def _encoder_for_another_model(inputs, folder: Path) -> Path:
    """A copy of the tiny encoder whose stored config claims an SD 1.x text width."""
    encoder = shutil.copytree(inputs.encoder, folder / "foreign-encoder")
    config_file = encoder / "config" / "metadata"  # where orbax's JsonCheckpointHandler keeps the config
    config = json.loads(config_file.read_text())
    config["base_model"]["text_width"] = 768
    config_file.write_text(json.dumps(config))
    return encoder


def _concept_for_another_model(concept_file: Path, folder: Path) -> Path:
    from safetensors.numpy import save_file

    tensors, header = concept_lib.read_concept(concept_file)
    header["base_model"]["text_width"] = 768
    foreign = folder / "foreign.safetensors"
    save_file(tensors, str(foreign), metadata={"e4t": json.dumps(header)})
    return foreign


def _personalize_exit_code(inputs, out: Path, *, image: Path | None = None, encoder: Path | None = None,
                           extra: tuple[str, ...] = ()) -> int:
    return personalize.main(["--model", "tiny", "--encoder", str(encoder or inputs.encoder),
                             "--image", str(image or inputs.photo), *TUNING, *extra,
                             "--out", str(out / "c.safetensors")])


def _generate_exit_code(concept: Path, out: Path, prompt: str = "a photo of S*") -> int:
    return generate.main(["--model", "tiny", "--concept", str(concept), "--prompt", prompt, "--steps", "2",
                          "--out", str(out)])


def _not_a_picture(folder: Path) -> Path:
    fake = folder / "fake.png"
    fake.write_text("this is text, not a picture\n")
    return fake


# case -> (inputs, scratch folder, --out, a good concept file) -> exit code
BAD_INPUTS = {
    "missing image": lambda inputs, folder, out, concept: _personalize_exit_code(
        inputs, out, image=folder / "missing.png"),
    "not a picture": lambda inputs, folder, out, concept: _personalize_exit_code(
        inputs, out, image=_not_a_picture(folder)),
    "encoder for another model": lambda inputs, folder, out, concept: _personalize_exit_code(
        inputs, out, encoder=_encoder_for_another_model(inputs, folder)),
    "concept for another model": lambda inputs, folder, out, concept: _generate_exit_code(
        _concept_for_another_model(concept, folder), out),
    "batch not a multiple of --grad-accum": lambda inputs, folder, out, concept: _personalize_exit_code(
        inputs, out, extra=("--grad-accum", "3")),
    "prompt without S*": lambda inputs, folder, out, concept: _generate_exit_code(concept, out, "a photo of a cat"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_exits_2_with_one_line(case, inputs, concept_file, tmp_path, capsys):
    out = tmp_path / "out"
    capsys.readouterr()
    code = BAD_INPUTS[case](inputs, tmp_path, out, concept_file)
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert not out.exists()
