"""The Flax U-Net against diffusers' UNet2DConditionModel: outputs, features, loading."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from diffusers.models.embeddings import get_timestep_embedding

from e4t_jax import weights
from e4t_jax.models.unet import UNet2DConditionModel, UNetConfig, load_unet, timestep_embedding, unet_abstract_params

# SD 1.x-like: int head count, 1x1-conv projections; non-default timestep embedding and
# two transformer layers per block to cover those branches.
SD1_TINY = dict(
    sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=4, cross_attention_dim=32, transformer_layers_per_block=2,
    flip_sin_to_cos=False, freq_shift=1,
)
# SD 2.x-like: per-block head counts, linear projections, upcast attention, 3 blocks;
# only_cross_attention in the middle block covers that option.
SD2_TINY = dict(
    sample_size=16, block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=16,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=[2, 4, 8], cross_attention_dim=48, use_linear_projection=True, upcast_attention=True,
    only_cross_attention=[False, True, False], flip_sin_to_cos=True, freq_shift=0,
)
SD15 = {  # stable-diffusion-v1-5/stable-diffusion-v1-5 unet/config.json
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD21 = {  # stabilityai/stable-diffusion-2-1 unet/config.json (2-1-base: sample_size 64, no upcast)
    **SD15, "_diffusers_version": "0.10.0.dev0", "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
    "dual_cross_attention": False, "num_class_embeds": None, "only_cross_attention": False, "sample_size": 96,
    "upcast_attention": True, "use_linear_projection": True,
}


def _perturbed_reference(config: dict) -> TorchUNet:
    """A diffusers U-Net whose every parameter is random and nonzero (outputs O(1))."""
    torch.manual_seed(0)
    model = TorchUNet(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0.0, p[0].numel() ** -0.5)
            else:
                p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def case(request, tmp_path_factory):
    config = {"sd1": SD1_TINY, "sd2": SD2_TINY}[request.param]
    reference = _perturbed_reference(config)
    folder = tmp_path_factory.mktemp(request.param)
    reference.save_pretrained(folder, safe_serialization=True)
    model, params = load_unet(folder)

    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, 4, 16, 16), dtype=np.float32)
    timesteps = np.array([3.0, 701.0], np.float32)
    context = rng.standard_normal((2, 7, config["cross_attention_dim"]), dtype=np.float32)

    torch_features = []
    blocks = list(reference.down_blocks) + [reference.mid_block]
    hooks = [b.register_forward_hook(lambda m, i, o: torch_features.append(o[0] if isinstance(o, tuple) else o))
             for b in blocks]
    with torch.no_grad():
        torch_out = reference(torch.from_numpy(sample), torch.from_numpy(timesteps),
                              encoder_hidden_states=torch.from_numpy(context)).sample
    for hook in hooks:
        hook.remove()

    inputs = (jnp.asarray(sample.transpose(0, 2, 3, 1)), jnp.asarray(timesteps), jnp.asarray(context))
    out, features = jax.jit(lambda p, *x: model.apply({"params": p}, *x, return_features=True))(params, *inputs)
    return dict(reference=reference, model=model, params=params, inputs=inputs, out=out, features=features,
                torch_out=torch_out.numpy().transpose(0, 2, 3, 1),
                torch_features=[f.numpy().transpose(0, 2, 3, 1) for f in torch_features])


def test_output_matches_diffusers(case):
    expected = case["torch_out"]
    assert 0.3 < np.abs(expected).mean() < 3.0  # outputs of order 1, so atol is meaningful
    np.testing.assert_allclose(np.asarray(case["out"]), expected, atol=1e-4, rtol=0)


def test_features_match_diffusers(case):
    features, expected = case["features"], case["torch_features"]
    assert len(features) == len(case["reference"].down_blocks) + 1
    for ours, theirs in zip(features, expected):
        assert ours.shape == theirs.shape
        np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4, rtol=1e-4)


def test_features_only_needs_no_up_path(case):
    down_and_mid = {k: v for k, v in case["params"].items()
                    if not k.startswith("up_blocks") and k not in ("conv_norm_out", "conv_out")}
    features = jax.jit(lambda p, *x: case["model"].apply({"params": p}, *x, features_only=True))(
        down_and_mid, *case["inputs"])
    for ours, full in zip(features, case["features"], strict=True):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(full), atol=1e-6)


def test_remat_keeps_names_and_gradients():
    config = UNetConfig(down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
                        block_out_channels=(16,), layers_per_block=(1,), num_attention_heads=(2,),
                        transformer_layers_per_block=(1,), only_cross_attention=(False,), cross_attention_dim=8,
                        norm_num_groups=4)
    plain_model, remat_model = UNet2DConditionModel(config), UNet2DConditionModel(config, remat=True)
    inputs = (jnp.ones((1, 4, 4, 4)), jnp.array([10.0]), jnp.ones((1, 3, 8)))
    abstract = unet_abstract_params(config)
    init_remat = jax.eval_shape(remat_model.init, jax.random.key(0), *inputs)["params"]
    assert jax.tree.structure(init_remat) == jax.tree.structure(abstract)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda leaf: rng.normal(0.0, 0.3, leaf.shape).astype(np.float32), abstract)

    def gradient(model):
        loss = lambda p: sum(jnp.mean(f ** 2) for f in model.apply({"params": p}, *inputs, features_only=True))
        return jax.grad(loss)

    has_remat = lambda model: re.search(r"\b(remat2?|checkpoint)\[", str(jax.make_jaxpr(gradient(model))(params)))
    assert has_remat(remat_model) and not has_remat(plain_model)
    plain, remat = jax.jit(gradient(plain_model))(params), jax.jit(gradient(remat_model))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), plain, remat)
    cross_key = plain["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn2"]["to_k"]["kernel"]
    assert float(jnp.abs(cross_key).max()) > 0


def test_safetensors_round_trip(case, tmp_path):
    weights.save_safetensors(case["params"], tmp_path / "unet.safetensors")
    state = weights.load_state_dict(tmp_path / "unet.safetensors")
    expected = {k: v.numpy() for k, v in case["reference"].state_dict().items()}
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_array_equal(state[key], value, err_msg=key)


@pytest.mark.parametrize("config", [SD15, SD21], ids=["sd15", "sd21"])
def test_full_size_configs_map_every_key(config):
    with torch.device("meta"):
        reference = TorchUNet.from_config(config)
    zero = np.zeros((), np.float32)
    stubs = {k: np.broadcast_to(zero, tuple(v.shape)) for k, v in reference.state_dict().items()}
    abstract = unet_abstract_params(UNetConfig.from_diffusers(config))
    # Raises on any missing, unexpected or mis-shaped key; bool copies keep memory low.
    weights.state_dict_to_params(stubs, abstract, dtype=np.bool_, what="U-Net")
    ours = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(abstract))
    assert ours == sum(p.numel() for p in reference.parameters())


def test_head_count_follows_diffusers_naming():
    assert UNetConfig.from_diffusers(SD21).num_attention_heads == (5, 10, 20, 20)
    assert UNetConfig.from_diffusers(SD15).num_attention_heads == (8, 8, 8, 8)
    overridden = UNetConfig.from_diffusers({**SD15, "attention_head_dim": 64, "num_attention_heads": [5, 10, 20, 20]})
    assert overridden.num_attention_heads == (5, 10, 20, 20)


@pytest.mark.parametrize("flip, shift, dim", [(True, 0, 320), (False, 1, 33)])
def test_timestep_embedding_matches_diffusers(flip, shift, dim):
    t = np.array([0.0, 1.0, 250.5, 999.0], np.float32)
    expected = get_timestep_embedding(torch.from_numpy(t), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    np.testing.assert_allclose(np.asarray(timestep_embedding(jnp.asarray(t), dim, flip, shift)), expected.numpy(),
                               atol=2e-4)


@pytest.mark.parametrize("option, value", [
    ("class_embed_type", "timestep"),
    ("addition_embed_type", "text_time"),
    ("time_embedding_type", "fourier"),
    ("attention_type", "gated"),
    ("down_block_types", ["AttnDownBlock2D"] * 4),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
])
def test_unsupported_option_is_named(option, value):
    with pytest.raises(ValueError, match=option):
        UNetConfig.from_diffusers({**SD15, option: value})
