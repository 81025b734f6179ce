"""CLIP text / vision towers: parity with transformers, loaders, preprocessing."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import save_file

from e4t_jax import weights
from e4t_jax.models import clip

TEXT = dict(vocab_size=100, hidden_size=32, intermediate_size=37, num_hidden_layers=3,
            num_attention_heads=4, max_position_embeddings=16, bos_token_id=98, pad_token_id=0)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
              image_size=32, patch_size=8)


def _randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Perturbs every parameter, so that swapped norm scales / biases would show."""
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model.eval()


def _torch_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in model.state_dict().items() if not k.endswith("position_ids")}


def _input_ids(eos_token_id: int) -> np.ndarray:
    """[2, 16] ids whose largest id and first ``eos_token_id`` sit at different positions."""
    ids = np.random.default_rng(0).integers(3, 90, size=(2, 16)).astype(np.int32)
    ids[ids == eos_token_id] = 3
    ids[0, 9], ids[1, 3] = 99, 99
    ids[0, [4, 12]], ids[1, [7, 14]] = eos_token_id, eos_token_id
    return ids


def _assert_outputs_equal(ours: clip.CLIPOutput, theirs) -> None:
    np.testing.assert_allclose(ours.last_hidden_state, theirs.last_hidden_state.numpy(), atol=1e-4)
    np.testing.assert_allclose(ours.pooler_output, theirs.pooler_output.numpy(), atol=1e-4)
    assert len(ours.hidden_states) == len(theirs.hidden_states)
    for mine, reference in zip(ours.hidden_states, theirs.hidden_states):
        np.testing.assert_allclose(mine, reference.numpy(), atol=1e-4)


@pytest.fixture(scope="module", params=[("quick_gelu", 2), ("gelu", 49)], ids=["quick_gelu-legacy_eos", "gelu-eos"])
def text(request, tmp_path_factory):
    act, eos = request.param
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(**TEXT, hidden_act=act, eos_token_id=eos)
    reference = _randomize(transformers.CLIPTextModel(config))
    folder = tmp_path_factory.mktemp(f"clip_text_{act}")
    reference.save_pretrained(folder)
    module, params = clip.load_clip_text(folder)
    run = jax.jit(lambda p, ids, embeds: module.apply(
        {"params": p}, ids, output_hidden_states=True, inputs_embeds=embeds))
    embed = jax.jit(lambda p, ids: module.apply({"params": p}, ids, method=module.embed_tokens))
    return dict(reference=reference, module=module, params=params, run=run, embed=embed, folder=folder, eos=eos)


@pytest.fixture(scope="module", params=["quick_gelu", "gelu"])
def vision(request, tmp_path_factory):
    torch.manual_seed(0)
    reference = _randomize(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION, hidden_act=request.param)))
    folder = tmp_path_factory.mktemp(f"clip_vision_{request.param}")
    reference.save_pretrained(folder)
    module, params = clip.load_clip_vision(folder)
    run = jax.jit(lambda p, pixels: module.apply({"params": p}, pixels, output_hidden_states=True))
    return dict(reference=reference, module=module, params=params, run=run, folder=folder)


def test_text_matches_transformers(text):
    ids = _input_ids(text["eos"])
    with torch.no_grad():
        theirs = text["reference"](torch.from_numpy(ids).long(), output_hidden_states=True)
    ours = text["run"](text["params"], ids, None)
    assert len(ours.hidden_states) == TEXT["num_hidden_layers"] + 1
    _assert_outputs_equal(ours, theirs)


def test_text_pooling_rule_follows_eos_token_id(text):
    ids = _input_ids(text["eos"])
    last = np.asarray(text["run"](text["params"], ids, None).last_hidden_state)
    pooled = np.asarray(text["run"](text["params"], ids, None).pooler_output)
    position = [9, 3] if text["eos"] == 2 else [4, 7]  # largest id (legacy) vs first eos
    np.testing.assert_array_equal(pooled, last[[0, 1], position])


def test_inputs_embeds_replace_token_lookup(text):
    ids = _input_ids(text["eos"])
    embeds = text["embed"](text["params"], ids)
    assert embeds.shape == (2, 16, TEXT["hidden_size"])
    from_ids = text["run"](text["params"], ids, None)
    from_embeds = text["run"](text["params"], ids, embeds)
    np.testing.assert_allclose(from_embeds.last_hidden_state, from_ids.last_hidden_state, atol=1e-6)
    np.testing.assert_allclose(from_embeds.pooler_output, from_ids.pooler_output, atol=1e-6)
    # A new word embedding at position 5 changes positions >= 5 only (causal mask).
    new_word = np.random.default_rng(1).normal(size=TEXT["hidden_size"]).astype(np.float32)
    edited = text["run"](text["params"], ids, embeds.at[:, 5].set(new_word)).last_hidden_state
    np.testing.assert_allclose(edited[:, :5], from_ids.last_hidden_state[:, :5], atol=1e-6)
    change = np.abs(np.asarray(edited[:, 5:] - from_ids.last_hidden_state[:, 5:])).max(axis=-1)
    assert change.min() > 1e-3


def test_vision_matches_transformers(vision):
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = vision["reference"](pixels, output_hidden_states=True)
    ours = vision["run"](vision["params"], pixels.permute(0, 2, 3, 1).numpy())
    assert len(ours.hidden_states) == VISION["num_hidden_layers"] + 1
    _assert_outputs_equal(ours, theirs)


def test_vision_rejects_wrong_image_size(vision):
    with pytest.raises(ValueError, match="pixel_values"):
        vision["module"].apply({"params": vision["params"]}, jnp.zeros((1, 16, 16, 3)))


def _write(folder, state, config: dict):
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_text_loads_with_and_without_prefix(text, tmp_path):
    state = weights.load_state_dict(text["folder"])
    bare = {k.removeprefix("text_model."): v for k, v in state.items()}
    prefixed = {"text_model." + k: v for k, v in bare.items()}
    prefixed["text_projection.weight"] = np.ones((8, TEXT["hidden_size"]), np.float32)  # WithProjection
    config = json.loads((text["folder"] / "config.json").read_text())
    _, from_bare = clip.load_clip_text(_write(tmp_path / "bare", bare, config))
    _, from_prefixed = clip.load_clip_text(_write(tmp_path / "prefixed", prefixed, config))
    flat_bare = jax.tree_util.tree_leaves_with_path(from_bare)
    flat_prefixed = jax.tree_util.tree_leaves_with_path(from_prefixed)
    assert [p for p, _ in flat_bare] == [p for p, _ in flat_prefixed]
    for (_, a), (_, b) in zip(flat_bare, flat_prefixed):
        np.testing.assert_array_equal(a, b)


def test_towers_load_from_full_clip_model(tmp_path):
    torch.manual_seed(0)
    config = transformers.CLIPConfig(text_config=dict(TEXT, eos_token_id=49), vision_config=VISION,
                                     projection_dim=8)
    reference = _randomize(transformers.CLIPModel(config))
    reference.save_pretrained(tmp_path)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    ids = _input_ids(49)
    with torch.no_grad():
        vision_ref = reference.vision_model(pixels)
        image_embeds = reference.visual_projection(vision_ref.pooler_output)
        text_ref = reference.text_model(torch.from_numpy(ids).long())
    vision_module, vision_params = clip.load_clip_vision(tmp_path, with_projection=True)
    text_module, text_params = clip.load_clip_text(tmp_path)
    assert (vision_module.config.patch_size, vision_module.config.num_hidden_layers) == (8, 4)
    assert text_module.config.eos_token_id == 49
    vision_out = vision_module.apply({"params": vision_params}, pixels.permute(0, 2, 3, 1).numpy())
    text_out = text_module.apply({"params": text_params}, ids)
    np.testing.assert_allclose(vision_out.pooler_output, vision_ref.pooler_output.numpy(), atol=1e-4)
    np.testing.assert_allclose(vision_out.image_embeds, image_embeds.numpy(), atol=1e-4)
    np.testing.assert_allclose(text_out.pooler_output, text_ref.pooler_output.numpy(), atol=1e-4)


def _assert_round_trip(params, reference: torch.nn.Module, path) -> None:
    weights.save_safetensors(params, path)
    saved = weights.read_safetensors(path)
    expected = _torch_state(reference)
    assert sorted(saved) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(saved[key], value, err_msg=key)


def test_text_params_round_trip_to_safetensors(text, tmp_path):
    _assert_round_trip(text["params"], text["reference"], tmp_path / "model.safetensors")


def test_vision_params_round_trip_to_safetensors(vision, tmp_path):
    _assert_round_trip(vision["params"], vision["reference"], tmp_path / "model.safetensors")


def _stub_count(reference: torch.nn.Module, module, example) -> tuple[int, int]:
    """Maps shape stubs of a meta-device transformers model onto our abstract params."""
    stubs = {k: np.broadcast_to(np.zeros((), np.bool_), tuple(v.shape))
             for k, v in reference.state_dict().items()}
    abstract = jax.eval_shape(module.init, jax.random.key(0), example)["params"]
    # One-byte leaves keep this test's memory small (ViT-H/14 has 632M parameters).
    params = weights.state_dict_to_params(stubs, abstract, dtype=np.bool_, ignore=(r"position_ids$",))
    leaves = jax.tree_util.tree_leaves(params)
    expected = sum(int(np.prod(v.shape)) for k, v in stubs.items() if not k.endswith("position_ids"))
    assert len(leaves) == sum(not k.endswith("position_ids") for k in stubs)
    return sum(leaf.size for leaf in leaves), expected


def test_full_size_configs_map_every_key():
    vit_l_text = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
    vit_h_vision = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                        image_size=224, patch_size=14, hidden_act="gelu", projection_dim=1024)
    with torch.device("meta"):
        text_ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**vit_l_text))
        vision_ref = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**vit_h_vision))
    text_module = clip.CLIPTextTransformer(clip.CLIPTextConfig.from_dict(vit_l_text))
    vision_module = clip.CLIPVisionTransformer(clip.CLIPVisionConfig.from_dict(vit_h_vision))
    ours, theirs = _stub_count(text_ref, text_module, jnp.zeros((1, 77), jnp.int32))
    assert ours == theirs == 123_060_480
    ours, theirs = _stub_count(vision_ref, vision_module, jnp.zeros((1, 224, 224, 3)))
    assert ours == theirs and theirs > 630_000_000


def test_config_from_dict_variants():
    full = {"model_type": "clip", "text_config": {"hidden_size": 64, "eos_token_id": 2},
            "vision_config": {"hidden_act": "gelu", "patch_size": 14}, "projection_dim": 8}
    # Both towers of a CLIPModel project to its top-level projection_dim.
    assert clip.CLIPTextConfig.from_dict(full) == clip.CLIPTextConfig(hidden_size=64, eos_token_id=2, projection_dim=8)
    assert clip.CLIPVisionConfig.from_dict(full) == clip.CLIPVisionConfig(hidden_act="gelu", patch_size=14,
                                                                          projection_dim=8)
    # transformers writes only non-default values: absent keys take transformers' defaults.
    assert clip.CLIPTextConfig.from_dict({"model_type": "clip_text_model"}).eos_token_id == 49407
    with pytest.raises(ValueError, match="hidden_act"):
        clip.CLIPVisionConfig.from_dict({"hidden_act": "relu6"})
    with pytest.raises(ValueError, match="vision"):
        clip.CLIPVisionConfig.from_dict({"model_type": "clip_text_model"})


def test_preprocess_images_close_to_clip_image_processor():
    from skimage.data import astronaut
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image = astronaut()[40:340, 50:470]  # 300 x 420, not square: exercises the crop
    expected = CLIPImageProcessorPil()(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    ours = np.asarray(clip.preprocess_images(image[None], 224))[0]
    from_float = np.asarray(clip.preprocess_images(image[None] / 255.0, 224))[0]
    assert ours.shape == expected.shape == (224, 224, 3)
    np.testing.assert_allclose(from_float, ours, atol=1e-5)
    difference = np.abs(ours - expected)
    assert difference.mean() < 0.01, difference.mean()  # measured 0.004 (about 0.3 / 255 before normalization)
    assert difference.max() < 0.06, difference.max()
