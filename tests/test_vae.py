"""Parity of the Flax AutoencoderKL with diffusers, and its checkpoint loading."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from flax import traverse_util
from safetensors.numpy import save_file

from e4t_jax import weights
from e4t_jax.models import vae

TINY = dict(
    block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=32,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
)
# Stable Diffusion 1.5 / 2.x vae/config.json (they differ only in sample_size).
SD_VAE = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "out_channels": 3, "sample_size": 512,
}
LEGACY_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def _to_nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _to_nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A tiny diffusers VAE with every weight perturbed, saved to a folder."""
    torch.manual_seed(0)
    model = TorchAutoencoderKL(**TINY).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = 0.1 * torch.randn_like(p)
            p.add_(noise if p.ndim > 1 or "norm" in name else noise + 0.05)
    folder = tmp_path_factory.mktemp("vae")
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def loaded(reference):
    module, params = vae.load_vae(reference[1])
    return module, params


@pytest.fixture(scope="module")
def apply_fns(loaded):
    """Compiled ``(encode, decode)``: ``(params, x) -> module method output``."""
    module, _ = loaded
    return tuple(jax.jit(lambda p, x, method=method: module.apply({"params": p}, x, method=method))
                 for method in (vae.AutoencoderKL.encode, vae.AutoencoderKL.decode))


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)


def test_encode_matches_diffusers(reference, loaded, apply_fns, images):
    model, _ = reference
    mean, logvar = apply_fns[0](loaded[1], images)
    with torch.no_grad():
        posterior = model.encode(_to_nchw(images)).latent_dist
    assert mean.shape == (2, 16, 16, 4)
    assert 0.1 < float(jnp.std(mean)) < 10
    np.testing.assert_allclose(mean, _to_nhwc(posterior.mean), atol=1e-4)
    np.testing.assert_allclose(logvar, _to_nhwc(posterior.logvar), atol=1e-4)


def test_decode_matches_diffusers(reference, loaded, apply_fns):
    model, _ = reference
    latents = np.random.default_rng(1).normal(size=(2, 16, 16, 4)).astype(np.float32)
    out = apply_fns[1](loaded[1], latents)
    with torch.no_grad():
        expected = _to_nhwc(model.decode(_to_nchw(latents)).sample)
    assert out.shape == (2, 32, 32, 3)
    assert 0.1 < float(jnp.std(out)) < 10
    np.testing.assert_allclose(out, expected, atol=1e-4)


def test_latent_scaling_helpers(loaded, apply_fns, images):
    module, params = loaded
    encode = jax.jit(lambda p, x, rng: vae.encode_to_latents(p, module, x, rng))
    mean, logvar = apply_fns[0](params, images)
    np.testing.assert_allclose(encode(params, images, None), mean * 0.18215, atol=1e-6)
    sampled = encode(params, images, jax.random.key(0))
    noise = (sampled / 0.18215 - mean) / jnp.exp(0.5 * logvar)
    assert abs(float(noise.mean())) < 0.1 and abs(float(noise.std()) - 1) < 0.1

    latents = jnp.asarray(np.random.default_rng(2).normal(size=(2, 16, 16, 4)), jnp.float32)
    decoded = jax.jit(lambda p, z: vae.decode_latents(p, module, z))(params, latents)
    raw = apply_fns[1](params, latents / 0.18215)
    np.testing.assert_allclose(decoded, jnp.clip(raw, -1, 1), atol=1e-5)
    assert float(jnp.abs(raw).max()) > 1 >= float(jnp.abs(decoded).max())


def test_save_round_trip_is_exact(reference, loaded, tmp_path):
    model, _ = reference
    weights.save_safetensors(loaded[1], tmp_path / "vae.safetensors")
    ours = weights.read_safetensors(tmp_path / "vae.safetensors")
    theirs = {k: v.numpy() for k, v in model.state_dict().items()}
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert ours[key].shape == value.shape, key
        np.testing.assert_array_equal(ours[key], value, err_msg=key)


@pytest.mark.parametrize("as_conv", [False, True], ids=["linear", "conv1x1"])
def test_legacy_attention_names_load(reference, loaded, tmp_path, as_conv):
    _, folder = reference
    state = weights.load_state_dict(folder)
    legacy = {}
    for key, value in state.items():
        for new, old in LEGACY_NAMES.items():
            if f".attentions.0.{new}." in key:
                key = key.replace(f".{new}.", f".{old}.")
                value = value[:, :, None, None] if as_conv and value.ndim == 2 else value
        legacy[key] = value
    assert sum(".query." in k for k in legacy) == 4  # weight + bias, encoder + decoder
    save_file(legacy, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    _, params = vae.load_vae(tmp_path)
    expected = traverse_util.flatten_dict(loaded[1])
    got = traverse_util.flatten_dict(params)
    assert got.keys() == expected.keys()
    for path in expected:
        np.testing.assert_array_equal(got[path], expected[path], err_msg=str(path))


@pytest.mark.parametrize("sample_size", [512, 768], ids=["sd15", "sd2"])
def test_real_sd_config_maps_every_key(sample_size):
    config = {**SD_VAE, "sample_size": sample_size}
    with torch.device("meta"):
        model = TorchAutoencoderKL.from_config(config)
    stubs = {k: np.broadcast_to(np.zeros((), np.float32), tuple(v.shape)) for k, v in model.state_dict().items()}
    abstract = vae.abstract_params(vae.AutoencoderKL(vae.VAEConfig.from_diffusers(config)))
    params = weights.state_dict_to_params(stubs, abstract, what="VAE")
    n_ours = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
    assert n_ours == sum(p.numel() for p in model.parameters()) == 83_653_863


def test_config_reads_and_rejects():
    cfg = vae.VAEConfig.from_diffusers({**SD_VAE, "scaling_factor": None, "force_upcast": True, "shift_factor": 0.1})
    assert cfg.block_out_channels == (128, 256, 512, 512) and cfg.downsample_factor == 8
    assert cfg.scaling_factor == 0.18215 and cfg.shift_factor == 0.1
    assert vae.VAEConfig.from_diffusers({}) == vae.VAEConfig()
    bad = [
        {"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"], "block_out_channels": [32, 64]},
        {"act_fn": "gelu"},
        {"latents_mean": [0.0] * 4},
        {"norm_type": "spatial"},
    ]
    for config in bad:
        with pytest.raises(ValueError, match="Unsupported"):
            vae.VAEConfig.from_diffusers(config)

