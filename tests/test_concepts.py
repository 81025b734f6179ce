"""Concept files (format 3) and several concepts of one domain encoder sampled together.

A concept stores the domain encoder's offsets and its own change of them; sampling
applies the domain offsets once, whatever the number of concepts. Concepts of another
encoder, files of format 2, and offsets that do not fit are refused with one line.
"""
import json

import jax
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import save_file

from e4t_jax import pipeline
from e4t_jax.e4t import concept as concept_lib
from e4t_jax.e4t import offsets as offsets_lib
from e4t_jax.e4t.config import E4TConfig, ModelConfig
from e4t_jax.tokenizer import Tokenizer
from infer import generate

PROMPT = "a photo of S*"


def _random_like(rng, tree, scale):
    return jax.tree.map(lambda leaf: (scale * rng.standard_normal(np.shape(leaf))).astype(np.float32), tree)


def _domain(unet, kind, rng):
    """Offsets of ``kind`` with every leaf random, as a pre-trained encoder's are."""
    return _random_like(rng, jax.device_get(offsets_lib.init_offsets(jax.random.key(0), unet,
                                                                     offsets_lib.OffsetConfig(kind=kind))), 0.1)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return pipeline.load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def concept_files(model, tmp_path_factory):
    """``{"A": random change, "B": zero change (placeholder S2*), "C": another encoder's (S3*)}``."""
    sd, params, _ = model
    rng, folder = np.random.default_rng(0), tmp_path_factory.mktemp("concepts")
    domain = _domain(params["unet"], "lowrank", rng)
    changes = {"A": ("S*", domain, _random_like(rng, domain, 0.05)),
               "B": ("S2*", domain, jax.tree.map(np.zeros_like, domain)),
               "C": ("S3*", _domain(params["unet"], "lowrank", rng), _random_like(rng, domain, 0.05))}
    return {name: concept_lib.save_concept(
        folder / f"{name}.safetensors", embedding=rng.standard_normal(sd.text_dim), sd=sd, domain=dom, delta=delta,
        config=E4TConfig(model=ModelConfig(domain_word="cat", placeholder=placeholder)))
        for name, (placeholder, dom, delta) in changes.items()}


def _load(model, tiny_model_dir, *paths):
    return concept_lib.load_concepts(paths, model[0], Tokenizer.from_folder(tiny_model_dir))


def test_a_zero_change_concept_leaves_the_other_concepts_image_alone(model, tiny_model_dir, concept_files):
    sd, params, tokenizer = model
    alone = _load(model, tiny_model_dir, concept_files["A"])
    both = _load(model, tiny_model_dir, concept_files["A"], concept_files["B"])
    assert both[0].fingerprint == both[1].fingerprint == alone[0].fingerprint

    def composed_unet(concepts):
        hooks = concept_lib.sampling_hooks(concepts)
        (transform,) = hooks.transforms  # one transform for every concept
        return transform.fn(params, transform.state)["unet"]

    own = offsets_lib.apply_offsets(params["unet"], jax.tree.map(np.add, alone[0].domain, alone[0].delta), "lowrank")
    for want, got in ((own, composed_unet(alone)), (own, composed_unet(both))):
        jax.tree.map(np.testing.assert_array_equal, want, got)

    generator = pipeline.Generator(sd)
    ids, uncond = tokenizer.encode([PROMPT]), tokenizer.encode([""])
    images = [generator(params, ids, uncond, seed=0, num_steps=3, hooks=concept_lib.sampling_hooks(c))
              for c in (alone, both)]
    np.testing.assert_array_equal(images[1], images[0])
    assert images[0].std() > 0.01


@pytest.mark.parametrize("kind", ["lowrank", "multiplicative", "dense"])
def test_the_composed_kernels_are_the_closed_form(model, kind):
    """``W_dom + sum_i (W_i - W_dom)``, computed here in float64 from each kind's definition."""
    unet = model[1]["unet"]
    rng = np.random.default_rng(1)
    domain = _domain(unet, kind, rng)
    deltas = [_random_like(rng, domain, 0.05) for _ in range(3)]
    composed = traverse_util.flatten_dict(offsets_lib.compose_offsets(unet, domain, deltas, kind))
    flat = traverse_util.flatten_dict(unet)

    def weights(kernel, offset):
        kernel = np.asarray(kernel, np.float64)
        offset = {k: np.asarray(v, np.float64) for k, v in offset.items()}
        if kind == "lowrank":
            return kernel + (offset["down"] @ offset["up"]).reshape(kernel.shape)
        return kernel * (1 + offset["scale"]) if kind == "multiplicative" else kernel + offset["delta"]

    tuned = [offsets_lib.offset_leaves(jax.tree.map(np.add, domain, d), kind) for d in deltas]
    kernels = offsets_lib.offset_leaves(domain, kind)
    for path, offset in kernels.items():
        w_dom = weights(flat[path], offset)
        want = w_dom + sum(weights(flat[path], t[path]) - w_dom for t in tuned)
        np.testing.assert_allclose(np.asarray(composed[path]), want, rtol=1e-6, atol=1e-6)
    assert all(composed[p] is flat[p] for p in flat if p not in kernels)  # every other leaf untouched
    one = offsets_lib.compose_offsets(unet, domain, deltas[:1], kind)
    jax.tree.map(np.testing.assert_array_equal, one,
                 offsets_lib.apply_offsets(unet, jax.tree.map(np.add, domain, deltas[0]), kind))


def test_concepts_of_another_encoder_are_refused(model, tiny_model_dir, concept_files, tmp_path, capsys):
    with pytest.raises(concept_lib.ConceptError, match="only when they come from the same domain encoder"):
        _load(model, tiny_model_dir, concept_files["A"], concept_files["C"])
    out = tmp_path / "out"
    capsys.readouterr()
    code = generate.main(["--model", str(tiny_model_dir), "--concept", str(concept_files["A"]), "--concept",
                          str(concept_files["C"]), "--prompt", PROMPT, "--steps", "2", "--out", str(out)])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert str(concept_files["A"]) in err[0] and str(concept_files["C"]) in err[0]
    assert not out.exists()


def _rewritten(source, out, change):
    """A copy of the concept ``source`` with ``change(tensors, header)`` applied."""
    tensors, header = concept_lib.read_concept(source)
    change(tensors, header)
    save_file(tensors, str(out), metadata={"e4t": json.dumps(header)})
    return out


def _format_2(tensors, header):
    header["format_version"] = 2
    for name in [n for n in tensors if n.startswith("domain/")]:
        tensors["offsets/" + name[len("domain/"):]] = tensors.pop(name) + tensors.pop("delta/" + name[len("domain/"):])


def _first(tensors, prefix):
    return sorted(n for n in tensors if n.startswith(prefix))[0]


def _narrow_delta(tensors, header):
    name = _first(tensors, "delta/")
    tensors[name] = tensors[name][..., :-1]


def _drop_delta_leaf(tensors, header):
    del tensors[_first(tensors, "delta/")]


def _other_rank(tensors, header):
    header["config"]["offsets"]["rank"] += 1


def _altered_domain(tensors, header):
    name = _first(tensors, "domain/")
    tensors[name] = tensors[name] * 2


@pytest.mark.parametrize("change, message", [
    (_format_2, "is concept format 2; this version reads format 3 (format 2 stored"),
    (_narrow_delta, "its delta does not fit its domain offsets"),
    (_drop_delta_leaf, "its delta does not fit its domain offsets (it lacks"),
    (_other_rank, "its domain offsets do not fit this model's lowrank offsets"),
    (_altered_domain, "its encoder_fingerprint does not match its domain offsets"),
])
def test_a_malformed_concept_is_refused(model, tiny_model_dir, concept_files, tmp_path, change, message):
    bad = _rewritten(concept_files["A"], tmp_path / "bad.safetensors", change)
    with pytest.raises(concept_lib.ConceptError, match="personalize the concept again|damaged|use the model") as info:
        _load(model, tiny_model_dir, bad)
    assert message in str(info.value) and str(bad) in str(info.value)


def test_saving_a_delta_that_does_not_fit_is_an_error(model, tiny_model_dir, concept_files):
    sd = model[0]
    (concept,) = _load(model, tiny_model_dir, concept_files["A"])
    with pytest.raises(ValueError, match="together, or neither"):
        concept_lib.save_concept("never.safetensors", embedding=concept.embedding, config=concept.config, sd=sd,
                                 domain=concept.domain)
    with pytest.raises(ValueError, match="does not fit the domain offsets"):
        concept_lib.save_concept("never.safetensors", embedding=concept.embedding, config=concept.config, sd=sd,
                                 domain=concept.domain, delta={"unexpected": np.zeros(3, np.float32)})
