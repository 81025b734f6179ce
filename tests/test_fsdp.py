"""e4t-pretrain with --fsdp: the mesh holds the only device copies, and multi-host runs export.

Simulated devices need XLA_FLAGS before JAX starts, so each run is a subprocess of the
real CLI on the tiny model: one with 4 devices (fsdp 1 against fsdp 4), and a pair of
processes with 2 devices each joined over 127.0.0.1 (gloo), fsdp 2.
"""
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 600
MIN_SIZE = "4096"  # the tiny model's leaves are small; this splits most of its bytes


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    import skimage.data

    root = tmp_path_factory.mktemp("fsdp-images")
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        Image.fromarray(getattr(skimage.data, name)()).save(root / f"{name}.png")
    return root


def _start(devices: int, tiny_model_dir, images, out, *extra) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               XLA_FLAGS=f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}")
    argv = [sys.executable, "-m", "train.pretrain_encoder", "--model", str(tiny_model_dir), "--data", str(images),
            "--domain-word", "face", "--steps", "1", "--batch-size", "4", "--lr", "1e-3", "--head-width", "32",
            "--save-every", "1", "--log-every", "1", "--fsdp-min-size", MIN_SIZE,
            "--out", str(out), *extra]
    return subprocess.Popen(argv, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)


def _finish(process: subprocess.Popen) -> str:
    try:
        _, stderr = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        _, stderr = process.communicate()
        pytest.fail(f"e4t-pretrain timed out:\n{stderr[-3000:]}")
    assert process.returncode == 0, stderr[-3000:]
    return stderr


def _device0_mib(stderr: str) -> float:
    return float(re.search(r"first local device holds ([\d.]+) MiB", stderr).group(1))


def _device0_mib_then_stop(process: subprocess.Popen) -> float:
    """What the first device holds, read as soon as the run logs it (before compiling); then the run is killed."""
    seen = []
    for line in process.stderr:
        seen.append(line)
        if "first local device holds" in line:
            process.kill()
            process.communicate()
            return _device0_mib(line)
    process.wait()
    pytest.fail(f"e4t-pretrain never said what its first device holds:\n{''.join(seen)[-3000:]}")


def test_fsdp_splits_what_the_first_device_holds(tiny_model_dir, images, tmp_path):
    split = _start(4, tiny_model_dir, images, tmp_path / "fsdp4", "--fsdp", "4", "--sample-every", "1")
    whole = _device0_mib_then_stop(_start(4, tiny_model_dir, images, tmp_path / "fsdp1", "--fsdp", "1"))
    held = _device0_mib(_finish(split))
    assert held <= 0.4 * whole, (held, whole)  # measured: 1.8 of 4.8 MiB
    assert (tmp_path / "fsdp4" / "samples" / "0000001.png").is_file()  # sampled from the split weights
    assert (tmp_path / "fsdp4" / "encoder").is_dir()


def test_two_processes_with_fsdp_export_an_encoder(tiny_model_dir, images, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    hosts = [_start(2, tiny_model_dir, images, out, "--fsdp", "2", "--sample-every", "1", "--coordinator",
                    f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)) for i in range(2)]
    for host in hosts:
        _finish(host)
    from e4t_jax.e4t.pretrained import load_pretrained

    e = load_pretrained(tiny_model_dir, out / "encoder")
    head = np.concatenate([np.ravel(x) for x in jax.tree.leaves(e.params.head)])
    assert np.all(np.isfinite(head)) and np.abs(head).max() > 0
    assert (out / "samples" / "0000001.png").is_file()
