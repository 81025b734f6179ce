"""The checkpoint loader: key mapping, which files are read (variants, shards, Hub downloads), no pickles,
clear errors, dtypes, model ids."""
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


def test_pickles_are_never_loaded(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(weights.CheckpointError, match="never loads pickles") as error:
        weights.load_state_dict(tmp_path)
    assert "allow" not in str(error.value)  # no opt-in is advertised: there is none


def _save(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"w": np.full((2,), value, np.float32)}, str(path))


def _sharded(folder, index_name, shard_stem, value):
    """Two shards and their index, each shard holding one key of ``value``."""
    names = [f"{shard_stem}-0000{i}-of-00002.safetensors" for i in (1, 2)]
    for key, name in zip(("a", "b"), names):
        folder.mkdir(parents=True, exist_ok=True)
        save_file({key: np.full((2,), value, np.float32)}, str(folder / name))
    (folder / index_name).write_text(json.dumps({"metadata": {}, "weight_map": dict(zip(("a", "b"), names))}))


@pytest.fixture
def hub_like(tmp_path):
    """A model folder laid out like a Hub snapshot: plain, fp16, non-EMA and pickle files side by side.

    Each file's values say which file it is: 32 plain, 16 fp16, 99 a file never to be read.
    """
    unet, text = tmp_path / "unet", tmp_path / "text_encoder"
    _save(unet / "diffusion_pytorch_model.safetensors", 32)
    _save(unet / "diffusion_pytorch_model.fp16.safetensors", 16)
    _save(unet / "diffusion_pytorch_model.non_ema.safetensors", 99)
    _save(unet / "aaa_first_alphabetically.safetensors", 99)
    (unet / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    _sharded(text, "model.safetensors.index.json", "model", 32)
    _sharded(text, "model.safetensors.index.fp16.json", "model.fp16", 16)
    _save(text / "zzz.safetensors", 99)
    return tmp_path


@pytest.mark.parametrize("variant, value", [(None, 32), ("fp16", 16)])
def test_weight_files_follow_the_documented_rule(hub_like, variant, value):
    unet = weights.load_state_dict(hub_like / "unet", variant=variant)
    assert set(unet) == {"w"} and (unet["w"] == value).all()
    text = weights.load_state_dict(hub_like / "text_encoder", variant=variant)  # sharded: both shards, one variant
    assert set(text) == {"a", "b"} and all((v == value).all() for v in text.values())


def test_a_single_file_wins_over_an_index_and_an_odd_name_is_read_only_alone(tmp_path):
    _sharded(tmp_path / "both", "model.safetensors.index.json", "model", 99)
    _save(tmp_path / "both" / "model.safetensors", 32)
    assert (weights.load_state_dict(tmp_path / "both")["w"] == 32).all()
    _save(tmp_path / "odd" / "unet.safetensors", 32)
    assert (weights.load_state_dict(tmp_path / "odd")["w"] == 32).all()
    _save(tmp_path / "odd" / "other.safetensors", 99)
    with pytest.raises(weights.CheckpointError, match="it holds other.safetensors, unet.safetensors"):
        weights.load_state_dict(tmp_path / "odd")


def test_a_missing_variant_is_refused_not_replaced(tmp_path):
    _save(tmp_path / "plain" / "model.safetensors", 32)
    with pytest.raises(weights.CheckpointError, match="no fp16 weights in .*model.fp16.safetensors"):
        weights.load_state_dict(tmp_path / "plain", variant="fp16")
    _save(tmp_path / "fp16_only" / "model.fp16.safetensors", 16)
    with pytest.raises(weights.CheckpointError, match="pass --variant"):
        weights.load_state_dict(tmp_path / "fp16_only")


# The files of stable-diffusion-v1-5/stable-diffusion-v1-5 on the Hub (13 GB in all).
SD15_FILES = """.gitattributes README.md model_index.json v1-inference.yaml
v1-5-pruned.ckpt v1-5-pruned.safetensors v1-5-pruned-emaonly.ckpt v1-5-pruned-emaonly.safetensors
feature_extractor/preprocessor_config.json
safety_checker/config.json safety_checker/model.safetensors safety_checker/model.fp16.safetensors
safety_checker/pytorch_model.bin safety_checker/pytorch_model.fp16.bin
scheduler/scheduler_config.json
text_encoder/config.json text_encoder/model.safetensors text_encoder/model.fp16.safetensors
text_encoder/pytorch_model.bin text_encoder/pytorch_model.fp16.bin
tokenizer/merges.txt tokenizer/special_tokens_map.json tokenizer/tokenizer_config.json tokenizer/vocab.json
unet/config.json unet/diffusion_pytorch_model.safetensors unet/diffusion_pytorch_model.fp16.safetensors
unet/diffusion_pytorch_model.non_ema.safetensors unet/diffusion_pytorch_model.bin
unet/diffusion_pytorch_model.fp16.bin unet/diffusion_pytorch_model.non_ema.bin
vae/config.json vae/diffusion_pytorch_model.safetensors vae/diffusion_pytorch_model.fp16.safetensors
vae/diffusion_pytorch_model.bin vae/diffusion_pytorch_model.fp16.bin""".split()


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_hub_download_fetches_only_the_parts_read(variant):
    from huggingface_hub.utils import filter_repo_objects

    fetched = set(filter_repo_objects(SD15_FILES, allow_patterns=weights.hub_patterns(weights.PIPELINE_PARTS,
                                                                                       variant)))
    suffix = f".{variant}.safetensors" if variant else ".safetensors"
    assert {f for f in fetched if f.endswith(".safetensors")} == {
        f"unet/diffusion_pytorch_model{suffix}", f"vae/diffusion_pytorch_model{suffix}", f"text_encoder/model{suffix}"}
    assert {f for f in fetched if not f.endswith(".safetensors")} == {
        "model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json", "unet/config.json",
        "vae/config.json", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer_config.json", "tokenizer/vocab.json"}
    vision = set(filter_repo_objects(["config.json", "model.safetensors", "open_clip_model.safetensors",
                                      "pytorch_model.bin"], allow_patterns=weights.hub_patterns(None)))
    assert vision == {"config.json", "model.safetensors"}


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
