"""Per-step re-encoding at generation: exact against a closed form, and it matters."""
import dataclasses

import jax
import numpy as np
import pytest

from e4t_jax import pipeline
from e4t_jax.e4t import concept as concept_lib
from e4t_jax.e4t import model as model_lib
from e4t_jax.e4t.config import E4TConfig, ModelConfig
from e4t_jax.e4t.encoder import EncoderConfig


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    e = model_lib.build(E4TConfig(model=ModelConfig(base=str(tiny_model_dir), domain_word="cat"),
                                  encoder=EncoderConfig(vision_dim=16, unet_dim=16, hidden_dim=16)))
    rng = np.random.default_rng(0)
    taps = e.model.vision.num_layers // 2
    image = {"layers": rng.standard_normal((taps, e.model.vision.width)).astype(np.float32),
             "latents": rng.standard_normal((8, 8, 4)).astype(np.float32)}
    loaded = concept_lib.Concept("S*", e.model.placeholder_id, np.zeros(e.sd.text_dim, np.float32), e.config,
                                 image=image)
    ids = e.tokenizer.encode(["a photo of S*"])
    return e, loaded, ids, e.tokenizer.encode([""])


def _reencoding(e, loaded, head):
    return concept_lib.reencoding_hooks(loaded, e.sd, e.frozen.text, e.tokenizer, head_params=head)


def _fixed(e, embedding):
    return pipeline.Hooks(overrides=(pipeline.TokenOverride(np.int32(e.model.placeholder_id), embedding),))


def test_constant_head_equals_a_fixed_embedding(setup):
    e, loaded, ids, uncond = setup
    head = dict(e.params.head)
    bias = np.random.default_rng(1).standard_normal(e.sd.text_dim).astype(np.float32)
    head["out"] = {"kernel": np.zeros_like(head["out"]["kernel"]), "bias": bias}  # E(x) = bias for every input
    generator = pipeline.Generator(e.sd)
    reencoded = generator(e.frozen.base, ids, uncond, num_steps=3, hooks=_reencoding(e, loaded, head))
    expected = generator(e.frozen.base, ids, uncond, num_steps=3,
                         hooks=_fixed(e, np.asarray(e.frozen.class_embedding) + 0.1 * bias))
    np.testing.assert_allclose(reencoded, expected, atol=2e-5)


def test_reencoding_changes_the_embedding_per_step(setup):
    e, loaded, ids, uncond = setup
    generator = pipeline.Generator(e.sd)
    reencoded = generator(e.frozen.base, ids, uncond, num_steps=3, hooks=_reencoding(e, loaded, e.params.head))
    plain = generator(e.frozen.base, ids, uncond, num_steps=3, hooks=_fixed(e, np.asarray(e.frozen.class_embedding)))
    assert np.abs(reencoded - plain).mean() > 1e-3


def test_concept_without_image_features_is_refused(setup):
    e, loaded, _, _ = setup
    with pytest.raises(concept_lib.ConceptError, match="--reencode"):
        _reencoding(e, dataclasses.replace(loaded, image=None), e.params.head)


def test_reencoding_sees_the_composed_unet(setup):
    """Re-encoding A beside a zero-change concept B of its encoder: A's images, bit for bit."""
    e, loaded, ids, uncond = setup
    rng = np.random.default_rng(2)
    domain = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32) * 0.1, e.params.offsets)
    a = dataclasses.replace(loaded, domain=domain,
                            delta=jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), domain))
    b = dataclasses.replace(a, placeholder="S2*", token_id=e.tokenizer.add_placeholder("S2*", "cat")[0],
                            delta=jax.tree.map(np.zeros_like, domain))
    override = pipeline.Hooks(overrides=(concept_lib.reencoding_override(a, e.sd, e.frozen.text, e.tokenizer,
                                                                         head_params=e.params.head),))
    generator = pipeline.Generator(e.sd)
    alone, both = (generator(e.frozen.base, ids, uncond, num_steps=3, hooks=override + concept_lib.offsets_hooks(c))
                   for c in ([a], [a, b]))
    np.testing.assert_array_equal(both, alone)
    base = generator(e.frozen.base, ids, uncond, num_steps=3, hooks=override)
    assert np.abs(alone - base).mean() > 1e-3  # the offsets do change the images
