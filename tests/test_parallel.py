"""Parallel drivers on a toy model: jit (data, fsdp), pmap and two-process runs agree.

Simulated devices need XLA_FLAGS before JAX starts, so every scenario runs in a
subprocess (tests/_parallel_worker.py): one with 4 devices, and a pair of processes
with 2 devices each joined by ``jax.distributed`` over 127.0.0.1 (gloo collectives).
All three start together; each prints its trained params as JSON.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("_parallel_worker.py")
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(devices: int, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               XLA_FLAGS=f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}")
    return subprocess.Popen([sys.executable, str(WORKER), *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _result(process: subprocess.Popen) -> dict:
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        pytest.fail(f"worker {process.args[2:]} timed out; stderr:\n{stderr[-3000:]}")
    assert process.returncode == 0, f"worker {process.args[2:]} failed:\n{stderr[-3000:]}"
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs():
    port = str(_free_port())
    processes = {"local": _start(4, "local"),
                 "host0": _start(2, "multihost", port, "0"),
                 "host1": _start(2, "multihost", port, "1")}
    return {name: _result(process) for name, process in processes.items()}


def _assert_params_close(actual: dict, expected: dict):
    assert actual.keys() == expected.keys()
    for name in expected:
        np.testing.assert_allclose(np.array(actual[name]), np.array(expected[name]), atol=1e-5, err_msg=name)


def test_local_drivers_match_single_device(runs):
    local = runs["local"]
    assert (local["process_count"], local["device_count"]) == (1, 4)
    reference = local["single"]["params"]
    initial_w = np.random.default_rng(0).normal(size=np.shape(reference["w"]))
    assert np.abs(np.array(reference["w"]) - initial_w).max() > 1e-2  # training moved the params
    for run in ("jit", "fsdp", "pmap"):
        _assert_params_close(local[run]["params"], reference)
    assert local["jit"]["loss"] == pytest.approx(local["pmap"]["loss"], abs=1e-5)


def test_state_donated_and_jit_traced_once(runs):
    for run in ("jit", "fsdp", "pmap"):
        assert runs["local"][run]["donated"], run
    for run in ("jit", "fsdp"):
        assert runs["local"][run]["traces"] == 1, run


def test_fsdp_splits_big_leaves(runs):
    local = runs["local"]
    assert local["jit"]["w_spec"] == "P()"
    assert local["fsdp"]["w_spec"] == "P('fsdp',)"
    assert local["fsdp"]["proj_spec"] == "P('fsdp',)"
    assert local["api"]["specs"] == {"big": "P(None, 'fsdp')", "odd": "P()", "small": "P()"}


def test_clear_errors_and_single_process_noop(runs):
    api = runs["local"]["api"]
    assert api["errors"]["strings"].startswith("TypeError") and "tokenize" in api["errors"]["strings"]
    assert api["errors"]["rows"].startswith("ValueError") and "multiple of the 4" in api["errors"]["rows"]
    assert api["initialized"] is False


def test_two_processes_match_single_device(runs):
    reference = runs["local"]["single"]["params"]
    for process_id, host in enumerate((runs["host0"], runs["host1"])):
        assert (host["process_count"], host["device_count"]) == (2, 4)
        assert host["host_slice"] == [4 * process_id, 4]
        for run in ("jit", "fsdp", "pmap"):
            _assert_params_close(host[run]["params"], reference)
        assert host["jit"]["traces"] == 1 and host["jit"]["donated"]


@pytest.mark.parametrize("environ, pod", [
    ({}, False),
    ({"TPU_WORKER_HOSTNAMES": "t1v-n-0"}, False),  # a single-host TPU VM
    ({"TPU_WORKER_HOSTNAMES": "t1v-n-0,t1v-n-1,t1v-n-2,t1v-n-3"}, True),
    ({"TPU_PROCESS_ADDRESSES": "10.0.0.1:8476,10.0.0.2:8476"}, True),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.1:8080", "TPU_WORKER_HOSTNAMES": "t1v-n-0"}, True),
    ({"MEGASCALE_NUM_SLICES": "2"}, True),
    ({"MEGASCALE_NUM_SLICES": "1"}, False),
])
def test_cloud_tpu_pod_detection(environ, pod):
    from e4t_jax.training import parallel

    assert parallel.cloud_tpu_pod(environ) is pod


def test_initialize_distributed_starts_itself_on_a_tpu_pod_only(monkeypatch):
    import jax

    from e4t_jax.training import parallel

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(jax.config, "update", lambda *args: None)
    for name in [k for k in os.environ if k.startswith(("JAX_", "TPU_", "MEGASCALE_"))]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1v-n-0")
    assert parallel.initialize_distributed() is False and calls == []
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1v-n-0,t1v-n-1")
    assert parallel.initialize_distributed() is True
    assert calls == [{"coordinator_address": None, "num_processes": None, "process_id": None}]
