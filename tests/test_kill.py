"""e4t-pretrain is exact across processes: a second run, and a run killed at random moments.

Pre-training with the same seed and data in two processes gives bit-identical encoders.
A harness runs ``e4t-pretrain --resume`` on the tiny model with a checkpoint after every
step (so that orbax saves take much of the time and kills fall inside them), kills it with
SIGKILL from outside at a seeded random moment once training is under way, and starts it
again, until it finishes. Its exported encoder must be bit-identical to an uninterrupted run's.
"""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
STEPS, KILLS = 10, 4
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    import skimage.data

    root = tmp_path_factory.mktemp("kill-images")
    for name in ("astronaut", "chelsea"):
        Image.fromarray(getattr(skimage.data, name)()).save(root / f"{name}.png")
    return root


def _start(tiny_model_dir, images, out) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    argv = [sys.executable, "-m", "train.pretrain_encoder", "--model", str(tiny_model_dir), "--data", str(images),
            "--domain-word", "face", "--steps", str(STEPS), "--batch-size", "2", "--lr", "1e-3", "--head-width", "32",
            "--save-every", "1", "--keep", "2", "--log-every", "1", "--resume", "--out", str(out)]
    return subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _logged_steps(out: Path) -> int:
    metrics = out / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.is_file() else 0


def _encoder(tiny_model_dir, out: Path) -> list[np.ndarray]:
    from e4t_jax.e4t.pretrained import load_pretrained

    params = load_pretrained(tiny_model_dir, out / "encoder").params
    return [np.asarray(leaf) for leaf in jax.tree.leaves(params)]


@pytest.fixture(scope="module")
def reference(tiny_model_dir, images, tmp_path_factory):
    """An uninterrupted run's output folder."""
    out = tmp_path_factory.mktemp("reference") / "run"
    run = _start(tiny_model_dir, images, out)
    assert run.wait(TIMEOUT_S) == 0, run.stderr.read()[-3000:]
    return out


def _assert_same_encoder(tiny_model_dir, got: Path, want: Path):
    pairs = list(zip(_encoder(tiny_model_dir, got), _encoder(tiny_model_dir, want), strict=True))
    assert len(pairs) > 4
    for a, b in pairs:
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()


def test_pretrain_is_bit_exact_across_processes(tiny_model_dir, images, reference, tmp_path):
    again = _start(tiny_model_dir, images, tmp_path / "again")
    assert again.wait(TIMEOUT_S) == 0, again.stderr.read()[-3000:]
    _assert_same_encoder(tiny_model_dir, tmp_path / "again", reference)


def test_random_sigkills_then_resume_equal_an_uninterrupted_run(tiny_model_dir, images, reference, tmp_path):
    rng, out, kills, mid_save = random.Random(0), tmp_path / "killed", 0, 0
    while kills < KILLS:
        process, logged = _start(tiny_model_dir, images, out), _logged_steps(out)
        deadline = time.monotonic() + TIMEOUT_S
        while process.poll() is None and _logged_steps(out) == logged and time.monotonic() < deadline:
            time.sleep(0.02)  # until this run has finished a step: training (and saving) is under way
        time.sleep(rng.uniform(0.0, 0.4))
        if process.poll() is not None:  # it finished before the kill
            break
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills += 1
        mid_save += any(p.name.endswith(".orbax-checkpoint-tmp") for p in (out / "checkpoints").glob("*"))
    final = _start(tiny_model_dir, images, out)
    assert final.wait(TIMEOUT_S) == 0, final.stderr.read()[-3000:]
    print(f"{kills} SIGKILLs, {mid_save} of them during a checkpoint save")
    assert kills == KILLS
    _assert_same_encoder(tiny_model_dir, out, reference)


def test_a_save_cut_short_is_no_checkpoint_and_is_cleaned_up(tmp_path):
    """What a process killed during its first save leaves: ``--resume`` starts afresh, and the leftover goes."""
    from e4t_jax.recipes import pretrain
    from e4t_jax.training import checkpoint

    options = pretrain.RunOptions(out=tmp_path / "run", resume=True)
    leftover = Path(options.checkpoint_dir()) / "1.orbax-checkpoint-tmp"
    (leftover / "state").mkdir(parents=True)
    (leftover / "state" / "partial").write_bytes(b"\0" * 100)
    assert pretrain.stored_config(options) is None
    manager = checkpoint.open_manager(options.checkpoint_dir())
    checkpoint.save(manager, 1, train_state={"w": np.zeros(2, np.float32)}, data_state={"at": 0}, config={})
    manager.wait_until_finished()
    manager.close()
    assert sorted(p.name for p in leftover.parent.iterdir()) == ["1"]
