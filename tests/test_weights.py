"""The checkpoint loader: key mapping, sharded files, pickle refusal, clear errors, dtypes, model ids."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from e4t_jax import pipeline, weights


def test_torch_key_joins_list_indices_only():
    assert weights.torch_key(("down_blocks_0", "resnets_1", "conv1", "kernel")) == "down_blocks.0.resnets.1.conv1.weight"
    assert weights.torch_key(("time_embedding", "linear_1", "bias")) == "time_embedding.linear_1.bias"
    assert weights.torch_key(("mid_block", "attentions_0", "transformer_blocks_0", "ff", "net_0", "proj", "kernel")) \
        == "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj.weight"
    assert weights.torch_key(("encoder", "layers_3", "mlp", "fc1", "kernel")) == "encoder.layers.3.mlp.fc1.weight"
    assert weights.torch_key(("final_layer_norm", "scale")) == "final_layer_norm.weight"


ABSTRACT = {"conv": {"kernel": jax.ShapeDtypeStruct((3, 3, 2, 4), jnp.float32),
                     "bias": jax.ShapeDtypeStruct((4,), jnp.float32)},
            "proj": {"kernel": jax.ShapeDtypeStruct((4, 5), jnp.float32)},
            "norm": {"scale": jax.ShapeDtypeStruct((5,), jnp.float32)}}


def _state(rng):
    return {"conv.weight": rng.standard_normal((4, 2, 3, 3)).astype(np.float32),
            "conv.bias": rng.standard_normal(4).astype(np.float32),
            "proj.weight": rng.standard_normal((5, 4)).astype(np.float32),
            "norm.weight": rng.standard_normal(5).astype(np.float32)}


def test_layouts_and_exact_round_trip():
    state = _state(np.random.default_rng(0))
    params = weights.state_dict_to_params(state, ABSTRACT)
    np.testing.assert_array_equal(params["conv"]["kernel"], state["conv.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["proj"]["kernel"], state["proj.weight"].T)
    back = weights.params_to_state_dict(params)
    assert back.keys() == state.keys()
    for key in state:
        np.testing.assert_array_equal(back[key], state[key])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_weights_dtype_option(dtype):
    params = weights.state_dict_to_params(_state(np.random.default_rng(0)), ABSTRACT, dtype=dtype)
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {np.dtype(dtype)}


def test_missing_unexpected_and_misshaped_keys_are_all_listed():
    state = _state(np.random.default_rng(0))
    del state["norm.weight"]
    state["extra.weight"] = np.zeros(3, np.float32)
    state["proj.weight"] = np.zeros((4, 4), np.float32)
    with pytest.raises(weights.CheckpointError) as error:
        weights.state_dict_to_params(state, ABSTRACT, what="toy model")
    message = str(error.value)
    assert "toy model" in message and "norm.weight" in message and "extra.weight" in message
    assert "proj.weight: checkpoint (4, 4), model expects (4, 5)" in message


def test_sharded_checkpoint_with_index(tmp_path):
    state = _state(np.random.default_rng(1))
    shards = {"model-00001-of-00002.safetensors": ["conv.weight", "conv.bias"],
              "model-00002-of-00002.safetensors": ["proj.weight", "norm.weight"]}
    for name, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(tmp_path / name))
    index = {"metadata": {}, "weight_map": {k: name for name, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    loaded = weights.load_state_dict(tmp_path)
    assert loaded.keys() == state.keys()
    np.testing.assert_array_equal(loaded["norm.weight"], state["norm.weight"])


def test_pickle_is_refused_unless_allowed(tmp_path):
    torch = pytest.importorskip("torch")
    torch.save({k: torch.from_numpy(v) for k, v in _state(np.random.default_rng(2)).items()},
               tmp_path / "pytorch_model.bin")
    with pytest.raises(weights.CheckpointError, match="pickle checkpoint; loading it can run arbitrary code"):
        weights.load_state_dict(tmp_path)
    assert set(weights.load_state_dict(tmp_path, allow_pickle=True)) == set(_state(np.random.default_rng(2)))


def test_corrupt_safetensors_is_a_clear_error(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(weights.CheckpointError, match="damaged or not a safetensors file"):
        weights.load_state_dict(tmp_path)


def test_model_ids_offline_and_missing_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="--model DIR"):
        weights.resolve_model("someone/some-model-that-is-not-cached")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        weights.resolve_model(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="not a diffusers Stable Diffusion model"):
        pipeline.load_model(tmp_path)


def test_load_model_in_bfloat16(tiny_model_dir):
    _, params, _ = pipeline.load_model(tiny_model_dir, param_dtype=jnp.bfloat16)
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {np.dtype(jnp.bfloat16)}
