"""Crash safety: a full disk during a checkpoint save, SIGTERM agreement across processes, the exit
statuses, non-finite samples, and atomic outputs (a failure or a SIGKILL mid-write leaves the old output).

The preemption round trip (SIGTERM, exit 75, an exact resume) is in tests/test_pretrain.py, beside the
SIGKILL resume test, to share its uninterrupted run.
"""
import errno
import itertools
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from e4t_jax import cli, files, pipeline
from e4t_jax.errors import EXIT_PREEMPTED, Preempted, UserError
from e4t_jax.training import checkpoint, loop

REPO = Path(__file__).resolve().parents[1]
CONFIG = {"base_model": {"text_width": 32}}


@flax.struct.dataclass
class _State:
    step: jax.Array
    w: jax.Array


def _driver(state, frozen, batch):
    """A training step of a toy state: random-looking (incompressible) weights that change every step."""
    return _State(state.step + 1, state.w + 1), {"loss": jnp.float32(0.5)}


def _run(state, manager, steps):
    return loop.run(_driver, state, None, itertools.repeat({"x": np.zeros(1)}), steps=steps, global_batch_size=1,
                    manager=manager, data_state=lambda: {"at": 0}, config={"run": 1},
                    metrics_log=loop.MetricsLog(Path("."), enabled=False))


@pytest.fixture
def small_disk(tmp_path):
    """A 600 KiB tmpfs (root only; skipped elsewhere), unmounted at the end."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mount)],
                      capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_keeps_the_last_good_checkpoint_and_the_run_resumes(small_disk):
    """400 KB of state: step 1 fits on the disk, step 2 does not; with --keep 1, step 1 must survive."""
    first = _State(jnp.int32(0), jax.random.normal(jax.random.key(0), (100_000,)))
    manager = checkpoint.open_manager(small_disk / "ck", max_to_keep=1)
    with pytest.raises(loop.CheckpointSaveError) as failure:
        _run(first, manager, steps=3)
    message = str(failure.value)
    assert f"could not save a checkpoint in {small_disk / 'ck'}" in message and "No space left" in message
    assert "The last good checkpoint (step 1) is kept" in message and "\n" not in message

    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)  # space freed
    manager = checkpoint.open_manager(small_disk / "ck", max_to_keep=1)
    assert manager.all_steps() == [1]
    restored, _, _ = checkpoint.restore(manager, abstract_state=first)
    np.testing.assert_array_equal(np.asarray(restored.w), np.asarray(first.w) + 1)
    final = _run(restored, manager, steps=3)
    assert int(final.step) == 3 and manager.all_steps() == [3]
    assert sorted(p.name for p in (small_disk / "ck").iterdir()) == ["3"]  # the failed step's temp folder is gone


def test_sigterm_is_agreed_by_all_processes(monkeypatch):
    """One process flagged: every process stops (the decision is the any() of all the flags)."""
    from jax.experimental import multihost_utils

    previous, stop = signal.getsignal(signal.SIGTERM), loop.StopSignal()
    assert not stop.agreed()
    with stop:
        os.kill(os.getpid(), signal.SIGTERM)  # caught: the test goes on
    assert stop.received and stop.agreed()
    assert signal.getsignal(signal.SIGTERM) == previous  # the handler is put back

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "process_allgather", lambda x: np.stack([x, [1]]))
    assert loop.StopSignal().agreed()
    monkeypatch.setattr(multihost_utils, "process_allgather", lambda x: np.stack([x, [0]]))
    assert not loop.StopSignal().agreed()


@pytest.mark.parametrize("error, status, line", [
    (Preempted("stopped by SIGTERM after step 4, saved in /ck; run the same command with --resume to continue"),
     EXIT_PREEMPTED, "preempted: stopped by SIGTERM after step 4"),
    (loop.CheckpointSaveError("could not save a checkpoint in /ck (disk full)"), 2, "error: could not save"),
    (OSError(errno.ENOSPC, "No space left on device"), 2, "error: no space left on device"),
])
def test_exit_status_and_one_line(error, status, line, capsys):
    def main(argv):
        raise error

    assert cli.main_wrapper(main)([]) == status
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(line)


@pytest.mark.parametrize("module", [("unet", "up_blocks_1"), ("vae", "decoder")])  # NaN latents; NaN images only
def test_non_finite_samples_are_refused(tiny_model_dir, module):
    sd, params, tokenizer = pipeline.load_model(tiny_model_dir)
    name, block = module
    leaves, tree = jax.tree.flatten(params[name][block])
    leaves[-1] = leaves[-1].at[..., 0].set(jnp.nan)
    params = {**params, name: {**params[name], block: jax.tree.unflatten(tree, leaves)}}
    with pytest.raises(UserError, match=r"NaN or infinite values in 2 of 2 images \(nothing was written\); try a "
                                        r"lower guidance scale, another sampler, or float32"):
        pipeline.Generator(sd)(params, tokenizer.encode(["a cat", "a dog"]), tokenizer.encode(["", ""]),
                               num_steps=2)


def test_a_failed_image_write_keeps_the_old_files(tmp_path, monkeypatch):
    from PIL import Image

    out = tmp_path / "images"
    old = np.full((2, 8, 8, 3), 10, np.uint8)
    pipeline.save_images(old, ["a", "b"], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    save = Image.Image.save

    def fails_on_the_second(self, fp, *args, **kwargs):
        if Path(fp).name == "001.png":
            Path(fp).write_bytes(b"\x89PNG half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", fails_on_the_second)
    with pytest.raises(OSError):
        pipeline.save_images(np.full((2, 8, 8, 3), 200, np.uint8), ["c", "d"], out)
    assert sorted(p.name for p in out.iterdir()) == sorted(before)  # no temporary entry is left
    assert (out / "001.png").read_bytes() == before["001.png"]
    assert np.asarray(Image.open(out / "000.png")).max() == 200  # written before the failure: complete


def test_a_failed_folder_replacement_keeps_the_old_folder(tmp_path):
    target = tmp_path / "export"
    with files.atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "a.bin").write_bytes(b"old")
    with pytest.raises(RuntimeError), files.atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "a.bin").write_bytes(b"new, half")
        raise RuntimeError("crash mid-write")
    assert [p.name for p in tmp_path.iterdir()] == ["export"] and (target / "a.bin").read_bytes() == b"old"
    with files.atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "b.bin").write_bytes(b"new")
    assert [p.name for p in tmp_path.iterdir()] == ["export"] and [p.name for p in target.iterdir()] == ["b.bin"]


KILLED_WRITE = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import numpy as np
    from e4t_jax import files

    def half_then_killed(path, data):  # the process dies with half of the new file written
        Path(path).write_bytes(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)

    target, kind = Path(sys.argv[1]), sys.argv[2]
    if kind == "image":
        from PIL import Image
        Image.Image.save = lambda self, fp, **kw: half_then_killed(fp, Path(target).read_bytes() * 2)
        files.save_image(np.zeros((64, 64, 3), np.uint8), target)
    else:  # a concept file: what e4t_jax.e4t.concept.save_concept does, with safetensors' writer dying
        import safetensors.numpy
        safetensors.numpy.save_file = lambda tensors, path, metadata=None: half_then_killed(path, b"x" * 4096)
        with files.atomic_path(target) as tmp:
            safetensors.numpy.save_file({"embedding": np.zeros(8, np.float32)}, str(tmp))
""")


@pytest.mark.parametrize("kind", ["image", "concept"])
def test_a_sigkill_mid_write_leaves_the_old_file(kind, tmp_path):
    target = tmp_path / ("grid.png" if kind == "image" else "me.safetensors")
    if kind == "image":
        files.save_image(np.full((8, 8, 3), 7, np.uint8), target)
    else:
        from safetensors.numpy import save_file

        save_file({"embedding": np.ones(8, np.float32)}, str(target))
    before = target.read_bytes()
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(target), kind], capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu"), timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert target.read_bytes() == before
    leftovers = [p for p in tmp_path.iterdir() if p != target]
    assert [p.name.startswith(f".{target.name}.") for p in leftovers] == [True]  # hidden, beside it


def _export(directory, value):
    files.export_encoder(directory, encoder_params={"w": np.full((4,), value, np.float32)}, offsets={},
                         config=CONFIG, overwrite=True)


def _loaded(directory):
    head, _, _ = files.load_encoder(directory, expected=None)
    return np.asarray(head["w"])


KILLED_EXPORT = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from e4t_jax import files

    def killed(new, target, staging):  # the new encoder is complete in staging; the rename never happens
        os.kill(os.getpid(), signal.SIGKILL)

    files.move_into_place = killed
    files.export_encoder(sys.argv[1], encoder_params={"w": np.full((1 << 20,), 2, np.float32)}, offsets={},
                         config={"base_model": {"text_width": 32}}, overwrite=True)
""")


def test_encoder_export_replaces_atomically(tmp_path, monkeypatch):
    encoder = tmp_path / "encoder"
    _export(encoder, 1)
    with pytest.raises(FileExistsError):
        files.export_encoder(encoder, encoder_params={}, offsets={}, config=CONFIG)

    killed = subprocess.run([sys.executable, "-c", KILLED_EXPORT, str(encoder)], capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu"), timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert files.staging_folder(encoder).is_dir()  # what the crash left, beside the old encoder
    np.testing.assert_array_equal(_loaded(encoder), np.ones(4))

    class Failing:
        def save(self, path, **kwargs):
            Path(path).mkdir(parents=True)
            (Path(path) / "partial").write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(files, "_encoder_checkpointer", Failing)
        with pytest.raises(OSError):
            _export(encoder, 3)
    np.testing.assert_array_equal(_loaded(encoder), np.ones(4))
    assert [p.name for p in tmp_path.iterdir()] == ["encoder"]  # the failed export's staging is gone

    _export(encoder, 4)
    np.testing.assert_array_equal(_loaded(encoder), np.full(4, 4))
    assert [p.name for p in tmp_path.iterdir()] == ["encoder"]


def test_a_non_finite_sample_grid_is_skipped_and_the_training_goes_on(tmp_path, caplog):
    """SampleWriter.write on a stand-in model whose sampling ends in NaN: a warning, no grid file."""
    import types

    from e4t_jax.e4t.config import E4TConfig
    from e4t_jax.recipes import pretrain

    def nan_sampling(*args, **kwargs):
        raise UserError("sampling produced NaN or infinite values in 3 of 3 images")

    writer = object.__new__(pretrain.SampleWriter)
    writer.e = types.SimpleNamespace(config=E4TConfig(), model=types.SimpleNamespace(placeholder_id=5))
    writer.frozen, writer.pixels, writer.out = types.SimpleNamespace(base={}), np.zeros((8, 8, 3)), tmp_path
    writer.embed, writer.generator = (lambda *args: np.zeros((1, 4))), nan_sampling
    writer.ids = writer.uncond = writer.seed = writer.metrics = None
    with caplog.at_level("WARNING", logger="e4t.pretrain"):
        writer.write(6, types.SimpleNamespace(offsets={}))
    assert "no sample grid at step 6: sampling produced NaN" in caplog.text and not list(tmp_path.iterdir())
