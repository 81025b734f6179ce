"""e4t-pretrain end to end: real photos, a corrupt file, checkpoints, TensorBoard, resume after SIGKILL."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    import skimage.data

    root = tmp_path_factory.mktemp("images")
    (root / "nested").mkdir()
    Image.fromarray(skimage.data.astronaut()).save(root / "astronaut.png")
    Image.fromarray(skimage.data.chelsea()).save(root / "nested" / "chelsea.jpg")
    Image.fromarray(skimage.data.coffee()).save(root / "coffee.webp")
    Image.fromarray(skimage.data.camera()).save(root / "camera_gray.png")  # grayscale
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    return root


def _pretrain(tiny_model_dir, image_folder, out, *extra, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    argv = [sys.executable, "-m", "train.pretrain_encoder", "--model", str(tiny_model_dir), "--data", str(image_folder),
            "--domain-word", "face", "--steps", "6", "--batch-size", "2", "--lr", "1e-3", "--head-width", "32",
            "--save-every", "3", "--log-every", "1", "--out", str(out), *extra]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)


def _metrics(out):
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, image_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "full"
    result = _pretrain(tiny_model_dir, image_folder, out, "--sample-every", "6")
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_cli_end_to_end(uninterrupted, tiny_model_dir):
    out, result = uninterrupted
    assert "skipped unreadable image" in result.stderr and "corrupt.jpg" in result.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit())[-1] == "6"
    assert list((out / "tb").glob("events.out.tfevents.*"))
    grid = np.asarray(Image.open(out / "samples" / "0000006.png"))
    assert grid.shape == (128, 128, 3)  # input image + 3 samples at 64x64
    metrics = _metrics(out)
    assert sorted(metrics) == [1, 2, 3, 4, 5, 6] and all(np.isfinite(m["loss"]) for m in metrics.values())

    from e4t_jax.e4t.pretrained import load_pretrained

    e = load_pretrained(tiny_model_dir, out / "encoder")
    assert e.config.model.domain_word == "face" and e.config.encoder.hidden_dim == 32


def test_resume_after_sigkill_equals_uninterrupted(uninterrupted, tiny_model_dir, image_folder, tmp_path):
    full, _ = uninterrupted
    out = tmp_path / "crashed"
    killed = _pretrain(tiny_model_dir, image_folder, out, env_extra={"E4T_CRASH_AFTER_STEP": "3"})
    assert killed.returncode == -signal.SIGKILL
    assert not (out / "encoder").exists()
    refused = _pretrain(tiny_model_dir, image_folder, out)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    other_config = _pretrain(tiny_model_dir, image_folder, out, "--resume", "--offset-rank", "2")
    assert other_config.returncode == 2 and "offsets.rank differ" in other_config.stderr
    resumed = _pretrain(tiny_model_dir, image_folder, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 3" in resumed.stderr

    expected, got = _metrics(full), _metrics(out)
    assert [got[s]["batch"] for s in (4, 5, 6)] == [expected[s]["batch"] for s in (4, 5, 6)]  # same data order
    from e4t_jax.files import load_encoder

    head_a, offsets_a, _ = load_encoder(full / "encoder", expected=None)
    head_b, offsets_b, _ = load_encoder(out / "encoder", expected=None)
    import jax

    for a, b in zip(jax.tree.leaves((head_a, offsets_a)), jax.tree.leaves((head_b, offsets_b))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_missing_data_folder_is_one_clear_error(tiny_model_dir, tmp_path, capsys):
    from train import pretrain_encoder

    code = pretrain_encoder.main(["--model", str(tiny_model_dir), "--data", str(tmp_path / "nothing"),
                                  "--domain-word", "face", "--steps", "2", "--batch-size", "2", "--lr", "1e-3",
                                  "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]


def test_an_encoder_folder_of_version_0_1_loads(uninterrupted, tiny_model_dir, tmp_path):
    """The layout e4t-jax 0.1 wrote: flat config keys, clip_-named encoder fields and head params."""
    import jax

    from e4t_jax import files
    from e4t_jax.e4t.pretrained import load_pretrained

    out, _ = uninterrupted
    head, offsets, config = files.load_encoder(out / "encoder", expected=None)
    tree = config["e4t"]
    encoder = {{"layer_stride": "clip_layer_stride", "vision_dim": "clip_dim"}.get(k, k): v
               for k, v in tree["encoder"].items() if k != "vision"}
    old_config = {"base_model": config["base_model"], "model_id": config["model_id"], "clip_vision": "image_encoder",
                  "domain_word": tree["model"]["domain_word"], "placeholder": tree["model"]["placeholder"],
                  "encoder": encoder, "offsets": tree["offsets"], "lambda_emb": tree["loss"]["lambda_emb"],
                  "lambda_w": tree["loss"]["lambda_w"], "e4t_jax_version": "0.1.0", "pretrained_steps": 6}
    old_head = {k.replace("vision_proj_", "clip_proj_"): v for k, v in head.items()}
    files.export_encoder(tmp_path / "old", encoder_params=jax.device_get(old_head),
                         offsets=jax.device_get(offsets), config=old_config)

    new, old = load_pretrained(tiny_model_dir, out / "encoder"), load_pretrained(tiny_model_dir, tmp_path / "old")
    assert old.config == new.config
    assert jax.tree.structure(old.params) == jax.tree.structure(new.params)
    for a, b in zip(jax.tree.leaves(old.params), jax.tree.leaves(new.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
