"""Each extension point takes a new implementation from this file alone, with no library edit.

* an offset kind (:func:`e4t_jax.e4t.offsets.register`): a per-column scale of the
  kernel, trained, saved in a concept file and applied at generation;
* a vision backbone (:func:`e4t_jax.e4t.vision.register`): a SigLIP-style tower with no
  [CLS] token, mean-pooled, used to personalize and to re-encode at generation;
* a text conditioner (:func:`e4t_jax.conditioning.register`): picked by the model
  folder's ``text_encoder/config.json``.
"""
import dataclasses
import json
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from skimage import data as photos

from e4t_jax import conditioning, pipeline
from e4t_jax.e4t import concept as concept_lib
from e4t_jax.e4t import model as model_lib
from e4t_jax.e4t import offsets as offsets_lib
from e4t_jax.e4t import vision as vision_lib
from e4t_jax.e4t.config import E4TConfig, ModelConfig
from e4t_jax.e4t.encoder import EncoderConfig
from e4t_jax.models.clip import CLIPTextTransformer, load_clip_text
from e4t_jax.recipes.personalize import personalize, tuned_concept
from e4t_jax.training.config import OptimizerConfig, TrainConfig

HEAD = EncoderConfig(vision_dim=16, unet_dim=16, hidden_dim=16)
TUNE = TrainConfig(steps=8, batch_size=2, optimizer=OptimizerConfig(lr=1e-2))


def sampler(e):
    """``hooks -> [1, H, W, 3]`` images of "a photo of S*" (one compiled program per hook structure)."""
    generator = pipeline.Generator(e.sd)
    ids, uncond = e.tokenizer.encode(["a photo of S*"]), e.tokenizer.encode([""])
    return lambda hooks: generator(e.frozen.base, ids, uncond, num_steps=3, hooks=hooks)


# ---------------------------------------------------------------------------- offset kind


@dataclasses.dataclass(frozen=True)
class ColumnScale:
    """``dW = W * scale[None, :]``: one scale per output column, zeros at init."""

    leaves: tuple[str, ...] = ("scale",)

    def init(self, key, shape, config):
        return {"scale": jnp.zeros(shape[-1:], jnp.float32)}

    def delta(self, offset, kernel):
        return kernel.astype(jnp.float32) * offset["scale"]

    def l2(self, offset, kernel):
        return jnp.sum(jnp.square(self.delta(offset, kernel)))


@pytest.fixture(scope="module")
def column_scale():
    offsets_lib.register("column_scale", ColumnScale())
    yield "column_scale"
    del offsets_lib.KINDS["column_scale"]


def test_a_registered_offset_kind_trains_saves_and_generates(column_scale, tiny_model_dir, tmp_path):
    config = E4TConfig(model=ModelConfig(base=str(tiny_model_dir)), encoder=HEAD,
                       offsets=offsets_lib.OffsetConfig(kind=column_scale))
    e = model_lib.build(config)
    kernels = offsets_lib.offset_leaves(e.params.offsets, column_scale)
    assert kernels and all(set(leaf) == {"scale"} and leaf["scale"].ndim == 1 for leaf in kernels.values())

    result = personalize(e, photos.astronaut(), TUNE, progress=False)
    assert result.loss_after < result.loss_before
    tuned = offsets_lib.offset_leaves(result.params.offsets, column_scale)
    assert all(np.any(np.asarray(leaf["scale"])) for leaf in tuned.values())  # every kernel's offset moved
    unet = traverse_util.flatten_dict(e.frozen.unet)
    want = sum(np.sum((np.asarray(unet[path], np.float64) * np.asarray(leaf["scale"])) ** 2)
               for path, leaf in tuned.items())
    np.testing.assert_allclose(float(offsets_lib.offset_l2(result.params.offsets, column_scale, e.frozen.unet)),
                               want, rtol=1e-5)

    concept = tuned_concept(e, result)
    path = concept_lib.save_concept(tmp_path / "c.safetensors", embedding=concept.embedding, config=e.config,
                                    sd=e.sd, domain=concept.domain, delta=concept.delta)
    loaded = concept_lib.load_concept(path, e.sd, type(e.tokenizer).from_folder(e.sd.folder))
    assert loaded.config.offsets.kind == column_scale and loaded.token_id == e.model.placeholder_id
    sample = sampler(e)
    untuned = dataclasses.replace(loaded, delta=jax.tree.map(np.zeros_like, loaded.delta))  # zero scales: the base
    no_offsets = sample(dataclasses.replace(loaded, domain=None, delta=None).hooks())
    np.testing.assert_array_equal(sample(untuned.hooks()), no_offsets)
    tuned = sample(loaded.hooks())
    assert np.abs(tuned - no_offsets).mean() > 1e-4
    # with a zero-change copy of itself under another placeholder, the same image (composition in weight space)
    copy = dataclasses.replace(untuned, placeholder="S2*", token_id=e.tokenizer.add_placeholder("S2*", "face")[0])
    np.testing.assert_array_equal(sample(concept_lib.sampling_hooks([loaded, copy])), tuned)


def test_an_unregistered_kind_is_refused():
    with pytest.raises(ValueError, match="kind must be one of"):
        offsets_lib.OffsetConfig(kind="no_such_kind")


# ------------------------------------------------------------------------ vision backbone


class TinySigLIP(nn.Module):
    """A ViT without a [CLS] token: patch embedding + position, 4 pre-norm MLP blocks."""

    width: int = 24
    layers: int = 4
    patch: int = 8

    @nn.compact
    def __call__(self, pixels):
        x = nn.Conv(self.width, (self.patch, self.patch), strides=self.patch)(pixels)
        x = x.reshape(x.shape[0], -1, self.width)
        x = x + self.param("position", nn.initializers.normal(0.02), x.shape[1:])
        hidden = []
        for _ in range(self.layers):
            x = x + nn.Dense(self.width)(nn.gelu(nn.Dense(2 * self.width)(nn.LayerNorm()(x))))
            hidden.append(x)
        return hidden


@dataclasses.dataclass(frozen=True)
class MeanPooled:
    """Per layer the mean of all tokens; pooled: the last layer's."""

    module: TinySigLIP
    size: int = 32

    @property
    def num_layers(self):
        return self.module.layers

    @property
    def width(self):
        return self.module.width

    def __call__(self, params, pixels):
        x = vision_lib.resize_and_normalize(pixels, self.size, (0.5,) * 3, (0.5,) * 3)
        layers = jnp.stack([h.mean(axis=1) for h in self.module.apply({"params": params}, x)], axis=1)
        return layers, layers[:, -1]


def _load_tiny_siglip(folder, dtype):
    """Random weights: the test needs the plumbing, not a trained tower (``folder`` unused)."""
    module = TinySigLIP()
    return MeanPooled(module), module.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]


@pytest.fixture(scope="module")
def siglip():
    vision_lib.register("tiny-siglip", _load_tiny_siglip)
    yield "tiny-siglip"
    del vision_lib.BACKBONES["tiny-siglip"]


def test_a_registered_mean_pooled_backbone_personalizes_and_reencodes(siglip, tiny_model_dir):
    e = model_lib.build(E4TConfig(model=ModelConfig(base=str(tiny_model_dir)),
                                  encoder=dataclasses.replace(HEAD, vision=siglip)))
    assert isinstance(e.model.vision, MeanPooled)
    assert sorted(k for k in e.params.head if k.startswith("vision_proj")) == ["vision_proj_0", "vision_proj_1"]
    assert e.params.head["vision_proj_0"]["kernel"].shape == (24, 16)

    result = personalize(e, photos.astronaut(), TUNE, progress=False)
    assert result.loss_after < result.loss_before
    assert result.image["layers"].shape == (2, 24) and result.embedding.shape == (e.sd.text_dim,)
    concept, sample = tuned_concept(e, result), sampler(e)
    fixed = sample(concept.hooks())
    reencoded = sample(concept_lib.reencoding_hooks(concept, e.sd, e.frozen.text, e.tokenizer,
                                                    head_params=result.params.head))
    assert np.all(np.isfinite(reencoded)) and np.abs(reencoded - fixed).mean() > 1e-4


def test_clip_mean_uses_no_class_token(tiny_model_dir):
    mean, params = vision_lib.load("clip-mean", tiny_model_dir / "image_encoder")
    cls, _ = vision_lib.load("clip", tiny_model_dir / "image_encoder")
    pixels = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 40, 40, 3)), jnp.float32)
    layers, pooled = mean(params, pixels)
    size = mean.module.config.image_size
    out = mean.module.apply({"params": params}, vision_lib.resize_and_normalize(
        pixels, size, vision_lib.CLIP_MEAN, vision_lib.CLIP_STD), output_hidden_states=True)
    want = np.stack([np.asarray(h[:, 1:]).mean(axis=1) for h in out.hidden_states[1:]], axis=1)
    np.testing.assert_allclose(layers, want, atol=1e-6)
    np.testing.assert_allclose(pooled, want[:, -1], atol=1e-6)
    cls_layers, _ = cls(params, pixels)
    np.testing.assert_array_equal(cls_layers[:, -1], out.hidden_states[-1][:, 0])


# ------------------------------------------------------------------------ text conditioner


@dataclasses.dataclass(frozen=True)
class DoubledCLIP:
    """CLIP's text encoder with its context scaled by 2."""

    module: CLIPTextTransformer

    @property
    def width(self):
        return self.module.config.hidden_size

    def embed(self, params, ids):
        return conditioning.CLIPText(self.module).embed(params, ids)

    def encode(self, params, ids, embeds):
        return 2 * conditioning.CLIPText(self.module).encode(params, ids, embeds)


def _load_doubled(folder, dtype, param_dtype):
    module, params = load_clip_text(folder, dtype, param_dtype=param_dtype)
    return DoubledCLIP(module), params


@pytest.fixture(scope="module")
def doubled_model(tiny_model_dir, tmp_path_factory):
    conditioning.register("doubled_clip", _load_doubled)
    folder = shutil.copytree(tiny_model_dir, tmp_path_factory.mktemp("doubled") / "model")
    config_file = folder / "text_encoder" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "model_type": "doubled_clip"}))
    yield folder
    del conditioning.TEXT_CONDITIONERS["doubled_clip"]


def test_a_registered_text_conditioner_is_picked_by_the_model_folder(doubled_model, tiny_model_dir):
    sd, params, tokenizer = pipeline.load_model(doubled_model)
    base_sd, base_params, _ = pipeline.load_model(tiny_model_dir)
    assert isinstance(sd.text, DoubledCLIP) and isinstance(base_sd.text, conditioning.CLIPText)
    ids = jnp.asarray(tokenizer.encode(["a photo of a cat"]))
    vector = jnp.ones((sd.text_dim,))
    doubled = conditioning.encode_text(sd.text, params["text"], ids, ((ids[0, 1], vector),))
    plain = conditioning.encode_text(base_sd.text, base_params["text"], ids, ((ids[0, 1], vector),))
    np.testing.assert_allclose(doubled, 2 * plain, rtol=1e-6)
    images = pipeline.Generator(sd)(params, tokenizer.encode(["a cat"]), tokenizer.encode([""]), num_steps=2)
    base = pipeline.Generator(base_sd)(base_params, tokenizer.encode(["a cat"]), tokenizer.encode([""]), num_steps=2)
    assert np.abs(images - base).mean() > 1e-4
