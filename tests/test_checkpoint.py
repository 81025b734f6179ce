"""Orbax checkpoints: exact train-state round trip, keep-last-N, encoder export and its base-model check."""
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from e4t_jax import files
from e4t_jax.training import checkpoint

CONFIG = {"lr": 1.6e-5, "batch_size": 16, "domain": "face"}
UNET_ARCHITECTURE = {"cross_attention_dim": 768, "block_out_channels": (32, 64)}


def _train_state(seed):
    """Params, a few Adam updates (non-trivial moments), step, and rng keys."""
    keys = jax.random.split(jax.random.key(seed), 3)
    params = {"head": {"kernel": jax.random.normal(keys[0], (4, 3)), "bias": jnp.zeros(3)},
              "offsets": {"to_q": jax.random.normal(keys[1], (2, 4))}}
    optimizer = optax.adamw(1e-2)
    opt_state = optimizer.init(params)
    for _ in range(2):
        grads = jax.tree.map(jnp.ones_like, params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    return {"params": params, "opt_state": opt_state, "step": jnp.asarray(seed, jnp.int32),
            "rng": keys[2], "raw_rng": jax.random.PRNGKey(seed)}


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_save_restore_exact(tmp_path):
    manager = checkpoint.open_manager(tmp_path / "run", max_to_keep=2)
    state = _train_state(7)
    data_state = {"next_index": 42, "nested": {"cycle": [1, 2]}}
    assert checkpoint.save(manager, 7, train_state=state, data_state=data_state, config=CONFIG)
    manager.wait_until_finished()

    abstract = jax.eval_shape(lambda: _train_state(0))
    restored, restored_data, restored_config = checkpoint.restore(manager, abstract_state=abstract)
    _assert_trees_equal(restored, state)
    assert restored_data == data_state and restored_config == CONFIG
    manager.close()


def test_restore_onto_mesh_shardings(tmp_path):
    """Saved from one device, restored sharded over a 2-device mesh (a fresh process)."""
    script = tmp_path / "restore_sharded.py"
    script.write_text(textwrap.dedent(f"""
        import jax, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from e4t_jax.training import checkpoint
        state = {{"kernel": np.arange(8.0, dtype=np.float32).reshape(4, 2), "step": np.int32(3)}}
        manager = checkpoint.open_manager({str(tmp_path / "run")!r}, async_save=False)
        checkpoint.save(manager, 3, train_state=state, config={{}})
        mesh = Mesh(np.array(jax.devices()), ("data",))
        abstract = {{"kernel": jax.ShapeDtypeStruct((4, 2), np.float32, sharding=NamedSharding(mesh, P("data"))),
                    "step": jax.ShapeDtypeStruct((), np.int32, sharding=NamedSharding(mesh, P()))}}
        restored, _, _ = checkpoint.restore(manager, abstract_state=abstract)
        kernel = restored["kernel"]
        assert len(jax.devices()) == 2 and kernel.sharding == abstract["kernel"].sharding, kernel.sharding
        assert [s.data.shape for s in kernel.addressable_shards] == [(2, 2), (2, 2)]
        np.testing.assert_array_equal(np.asarray(kernel), state["kernel"])
        print("SHARDED-OK")
    """))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert "SHARDED-OK" in result.stdout, result.stderr[-3000:]


def test_keep_last_n_and_restore_latest(tmp_path):
    manager = checkpoint.open_manager(tmp_path / "run", max_to_keep=2, save_every=10)
    for step in (10, 15, 20, 30):  # 15 is not a multiple of save_every
        saved = checkpoint.save(manager, step, train_state=_train_state(step), data_state=b"\x00grain\xff",
                                config={**CONFIG, "step": step})
        assert saved == (step != 15)
    assert checkpoint.save(manager, 35, train_state=_train_state(35), config=CONFIG, force=True)
    manager.wait_until_finished()
    assert manager.all_steps() == [30, 35]
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.isdigit()) == ["30", "35"]

    abstract = jax.eval_shape(lambda: _train_state(0))
    state, data_state, config = checkpoint.restore(manager, abstract_state=abstract)
    _assert_trees_equal(state, _train_state(35))
    assert data_state is None and config == CONFIG and checkpoint.read_config(manager) == CONFIG
    assert checkpoint.read_config(manager, 30) == {**CONFIG, "step": 30}
    state, data_state, config = checkpoint.restore(manager, 30, abstract_state=_train_state(0))
    _assert_trees_equal(state, _train_state(30))
    assert data_state == b"\x00grain\xff" and config["step"] == 30
    with pytest.raises(FileNotFoundError, match="saved steps: \\[30, 35\\]"):
        checkpoint.restore(manager, 10, abstract_state=abstract)
    manager.close()
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        checkpoint.restore(checkpoint.open_manager(tmp_path / "empty"), abstract_state=abstract)


def test_export_load_encoder_and_base_model_check(tmp_path):
    state = _train_state(3)
    identity = files.base_model_identity(UNET_ARCHITECTURE, text_width=768)
    config = {"base_model": identity, "scale": 0.1, "clip_layers": [1, 3]}
    directory = tmp_path / "face_encoder"
    files.export_encoder(directory, encoder_params=state["params"]["head"],
                              offsets=state["params"]["offsets"], config=config)

    encoder, offsets, loaded_config = files.load_encoder(directory, expected=identity)
    _assert_trees_equal(encoder, state["params"]["head"])
    _assert_trees_equal(offsets, state["params"]["offsets"])
    assert loaded_config == config

    sd2 = files.base_model_identity({**UNET_ARCHITECTURE, "cross_attention_dim": 1024}, text_width=1024)
    with pytest.raises(ValueError, match="pre-trained for a base model with text width 768; this model has 1024"):
        files.load_encoder(directory, expected=sd2)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        files.load_encoder(tmp_path / "missing", expected=identity)
    with pytest.raises(ValueError, match="base_model"):
        files.export_encoder(tmp_path / "bad", encoder_params={}, offsets={}, config={"scale": 0.1})


def test_two_processes_keep_their_own_data_state(tmp_path):
    """Two local JAX processes (gloo): each restores its own input-iterator state."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = tmp_path / "two_hosts.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        import jax, numpy as np
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        process = int(sys.argv[1])
        jax.distributed.initialize("127.0.0.1:{port}", num_processes=2, process_id=process)
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from e4t_jax.training import checkpoint
        replicated = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P())
        weights = jax.make_array_from_callback((3,), replicated, lambda index: np.arange(3.0, dtype=np.float32)[index])
        manager = checkpoint.open_manager({str(tmp_path / "run")!r})
        checkpoint.save(manager, 1, train_state={{"w": weights}}, data_state={{"next_index": "x" * (1 + 9 * process)}},
                        config={{"hosts": 2}})
        manager.wait_until_finished()
        abstract = {{"w": jax.ShapeDtypeStruct((3,), np.float32, sharding=replicated)}}
        state, data_state, config = checkpoint.restore(manager, abstract_state=abstract)
        manager.close()
        assert data_state == {{"next_index": "x" * (1 + 9 * process)}} and config == {{"hosts": 2}}, data_state
        np.testing.assert_array_equal(np.asarray(state["w"].addressable_data(0)), [0, 1, 2])
        print("PROCESS-OK", process)
    """))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("XLA_FLAGS", None)
    processes = [subprocess.Popen([sys.executable, str(script), str(i)], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outputs = [p.communicate(timeout=120) for p in processes]
    finally:
        for p in processes:
            p.kill()
    for i, (out, err) in enumerate(outputs):
        assert f"PROCESS-OK {i}" in out, err[-3000:]
