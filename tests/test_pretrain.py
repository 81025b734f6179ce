"""e4t-pretrain end to end: real photos, a corrupt file, checkpoints, TensorBoard, resume after SIGKILL
or SIGTERM (preemption), the training features (accumulation, schedule, EMA, workers) and a resume that
takes the stored config."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


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


def _cli(*argv, env_extra=None):
    env = dict(os.environ, PYTHONPATH=str(REPO), **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "train.pretrain_encoder", *map(str, argv)], env=env,
                          capture_output=True, text=True, timeout=900)


def _pretrain(tiny_model_dir, image_folder, out, *extra, env_extra=None):
    return _cli("--model", tiny_model_dir, "--data", image_folder, "--domain-word", "face", "--steps", "6",
                "--batch-size", "2", "--lr", "1e-3", "--head-width", "32", "--save-every", "3", "--log-every", "1",
                "--out", out, *extra, env_extra=env_extra)


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
    assert other_config.returncode == 2 and "--offset-rank: stored 4, given 2" in other_config.stderr
    resumed = _pretrain(tiny_model_dir, image_folder, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 3" in resumed.stderr

    _assert_continues(full, out, 3)


def _assert_continues(full, out, resumed_at):
    """The run in ``out``, resumed at step ``resumed_at``, read the same batches and ended with a bit-identical
    encoder as the uninterrupted run in ``full``."""
    import jax

    from e4t_jax.files import load_encoder

    expected, got = _metrics(full), _metrics(out)
    later = range(resumed_at + 1, 7)
    assert [got[s]["batch"] for s in later] == [expected[s]["batch"] for s in later]  # same data order
    head_a, offsets_a, _ = load_encoder(full / "encoder", expected=None)
    head_b, offsets_b, _ = load_encoder(out / "encoder", expected=None)
    for a, b in zip(jax.tree.leaves((head_a, offsets_a)), jax.tree.leaves((head_b, offsets_b))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sigterm_saves_the_last_step_exits_75_and_resumes_exactly(uninterrupted, tiny_model_dir, image_folder,
                                                                   tmp_path):
    """SIGTERM after step 4, which is no saving step (--save-every 3): step 4 is saved, then the exit."""
    from e4t_jax.errors import EXIT_PREEMPTED

    full, _ = uninterrupted
    out = tmp_path / "preempted"
    stopped = _pretrain(tiny_model_dir, image_folder, out,
                        env_extra={"E4T_CRASH_AFTER_STEP": "4", "E4T_CRASH_SIGNAL": "TERM"})
    assert stopped.returncode == EXIT_PREEMPTED == 75, stopped.stderr[-3000:]
    assert stopped.stderr.strip().splitlines()[-1].startswith(
        f"preempted: stopped by SIGTERM after step 4, saved in {out / 'checkpoints'}; run the same command with "
        "--resume")
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())[-2:] == [3, 4]
    assert not (out / "encoder").exists() and max(_metrics(out)) == 4
    resumed = _pretrain(tiny_model_dir, image_folder, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 4" in resumed.stderr
    _assert_continues(full, out, 4)


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


def _image_tags(tb_folder):
    """The tags of the image summaries in a TensorBoard folder's event files."""
    import struct

    from tensorboardX.proto import event_pb2

    tags = []
    for path in tb_folder.glob("events.out.tfevents.*"):
        raw, at = path.read_bytes(), 0
        while at < len(raw):  # TFRecords: length, its crc, the event, its crc
            (length,) = struct.unpack("<Q", raw[at:at + 8])
            event = event_pb2.Event.FromString(raw[at + 12:at + 12 + length])
            tags += [value.tag for value in event.summary.value if value.HasField("image")]
            at += 16 + length
    return tags


def test_training_features_and_a_resume_with_the_stored_config(tiny_model_dir, image_folder, tmp_path):
    import jax
    import orbax.checkpoint as ocp

    from e4t_jax.files import load_encoder

    out = tmp_path / "features"
    first = _cli("--model", tiny_model_dir, "--data", image_folder, "--domain-word", "cat", "--steps", "2",
                 "--batch-size", "2", "--grad-accum", "2", "--lr", "1e-3", "--lr-schedule", "cosine", "--warmup", "1",
                 "--ema", "0.5", "--export-ema", "--head-width", "32", "--workers", "2", "--sample-every", "2",
                 "--save-every", "1", "--out", out)
    assert first.returncode == 0, first.stderr[-3000:]
    assert _image_tags(out / "tb") == ["samples/grid"]

    # Omitted flags are not compared with the defaults (domain word "face", ...): only --lr conflicts.
    conflict = _cli("--model", tiny_model_dir, "--data", image_folder, "--resume", "--lr", "3e-5", "--out", out)
    assert conflict.returncode == 2
    assert "--lr: stored 0.001, given 3e-05; omit these flags" in conflict.stderr.strip().splitlines()[-1]

    resumed = _cli("--model", tiny_model_dir, "--data", image_folder, "--resume", "--steps", "3", "--export-ema",
                   "--out", out)  # --grad-accum back to 1 (memory only); the stored --workers 2
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 2" in resumed.stderr
    stored = json.loads((out / "checkpoints" / "3" / "config" / "metadata").read_text())
    assert stored["e4t"]["model"]["domain_word"] == "cat" and stored["train"]["ema_decay"] == 0.5
    assert stored["train"]["optimizer"]["schedule"] == "cosine" and stored["train"]["steps"] == 3
    assert stored["data"]["workers"] == 2

    head, _, config = load_encoder(out / "encoder", expected=None)
    assert config["e4t"]["encoder"]["hidden_dim"] == 32 and config["pretrained_steps"] == 3
    state = ocp.StandardCheckpointer().restore(out / "checkpoints" / "3" / "state")
    exported, ema, params = (jax.tree.leaves(tree) for tree in (head, state["ema"]["head"], state["params"]["head"]))
    for a, b, c in zip(exported, ema, params):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(not np.array_equal(np.asarray(a), np.asarray(c)) for a, c in zip(exported, params))


def test_resume_check_lists_conflicts_overrides_and_reads_old_configs(image_folder, tmp_path, caplog):
    """No model: a checkpoint of a config without the newer fields, checked against configs."""
    import dataclasses

    import jax.numpy as jnp
    import pytest

    from e4t_jax import config as config_lib
    from e4t_jax.errors import UserError
    from e4t_jax.recipes import pretrain
    from e4t_jax.training import checkpoint
    from train.pretrain_encoder import FLAG_NAMES

    config = pretrain.PRESETS["tiny"]
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, root=str(image_folder)))
    old = config_lib.to_dict(config)
    del old["train"]["ema_decay"], old["train"]["optimizer"]["schedule"]  # as written before they existed
    options = pretrain.RunOptions(out=tmp_path / "run", resume=True)
    manager = checkpoint.open_manager(options.checkpoint_dir(), async_save=False)
    checkpoint.save(manager, 1, train_state={"step": jnp.ones((), jnp.int32)}, config=old, force=True)
    manager.close()

    assert pretrain.stored_config(options) == config
    pretrain.check(dataclasses.replace(config, train=dataclasses.replace(config.train, steps=1)), options)
    changed = dataclasses.replace(config, train=dataclasses.replace(
        config.train, ema_decay=0.9, optimizer=dataclasses.replace(config.train.optimizer, lr=3e-5)))
    with pytest.raises(UserError, match="--ema: stored None, given 0.9; --lr: stored 0.001, given 3e-05; omit"):
        pretrain.check(changed, options, names=FLAG_NAMES)
    with caplog.at_level("WARNING", logger="e4t.pretrain"):
        pretrain.check(changed, dataclasses.replace(options, override=True))
    assert "train.optimizer.lr: stored 0.001, given 3e-05" in caplog.text and "--override" in caplog.text
    with pytest.raises(UserError, match="--export-ema needs an EMA"):
        pretrain.check(config, dataclasses.replace(options, export_ema=True))
    with pytest.raises(UserError, match="not a multiple of --grad-accum 3"):
        pretrain.check(config, dataclasses.replace(options, grad_accum=3))
