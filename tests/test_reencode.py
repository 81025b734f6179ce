"""Per-step re-encoding at generation: exact against a closed form, and it matters."""
import dataclasses

import numpy as np
import pytest

from e4t_jax import pipeline
from e4t_jax.e4t import concept as concept_lib
from e4t_jax.e4t import model as model_lib
from e4t_jax.e4t.encoder import EncoderConfig


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    e = model_lib.build(tiny_model_dir, domain_word="cat", encoder=EncoderConfig(clip_dim=16, unet_dim=16,
                                                                                 hidden_dim=16))
    rng = np.random.default_rng(0)
    taps = e.model.vision.config.num_hidden_layers // 2
    image = {"clip_tokens": rng.standard_normal((taps, e.model.vision.config.hidden_size)).astype(np.float32),
             "latents": rng.standard_normal((8, 8, 4)).astype(np.float32)}
    base = pipeline.Concept(e.model.placeholder_id, np.zeros(e.sd.text_dim, np.float32))
    loaded = concept_lib.LoadedConcept(base, "S*", {"domain_word": "cat"}, e.model.offsets, None, image)
    ids = e.tokenizer.encode(["a photo of S*"])
    return e, loaded, ids, e.tokenizer.encode([""])


def _reencoding(e, loaded, head):
    return concept_lib.with_reencoding(loaded, head_params=head, encoder_config=dataclasses.asdict(
        e.model.encoder_config), text_params=e.frozen["text"], tokenizer=e.tokenizer)


def test_constant_head_equals_a_fixed_embedding(setup):
    e, loaded, ids, uncond = setup
    head = dict(e.trainable["head"])
    bias = np.random.default_rng(1).standard_normal(e.sd.text_dim).astype(np.float32)
    head["out"] = {"kernel": np.zeros_like(head["out"]["kernel"]), "bias": bias}  # E(x) = bias for every input
    generator = pipeline.Generator(e.sd)
    reencoded = generator(e.base_params, ids, uncond, num_steps=3, concepts=(_reencoding(e, loaded, head),))
    fixed = pipeline.Concept(e.model.placeholder_id, np.asarray(e.frozen["class_embedding"]) + 0.1 * bias)
    expected = generator(e.base_params, ids, uncond, num_steps=3, concepts=(fixed,))
    np.testing.assert_allclose(reencoded, expected, atol=2e-5)


def test_reencoding_changes_the_embedding_per_step(setup):
    e, loaded, ids, uncond = setup
    generator = pipeline.Generator(e.sd)
    head = e.trainable["head"]
    reencoded = generator(e.base_params, ids, uncond, num_steps=3, concepts=(_reencoding(e, loaded, head),))
    once = pipeline.Concept(e.model.placeholder_id, np.asarray(e.frozen["class_embedding"]))
    plain = generator(e.base_params, ids, uncond, num_steps=3, concepts=(once,))
    assert np.abs(reencoded - plain).mean() > 1e-3


def test_concept_without_image_features_is_refused(setup):
    e, loaded, _, _ = setup
    with pytest.raises(concept_lib.ConceptError, match="--reencode"):
        _reencoding(e, dataclasses.replace(loaded, image=None), e.trainable["head"])
