"""Concept files from strangers: every broken or hostile file ends in one ConceptError.

The contract: :func:`e4t_jax.e4t.concept.load_concept` either returns a concept whose
tensors are float32, finite and of the model's shapes, or raises ``ConceptError`` (a
UserError: the CLIs print one line and exit 2). Never another exception, a hang, or an
allocation of what the file declares. Hypothesis mutates a valid file's bytes, its JSON
header and its tensors.
"""
import json
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings, strategies as st
from safetensors.numpy import load_file, save_file

from e4t_jax.e4t import concept as concept_lib
from e4t_jax.e4t import model as model_lib
from e4t_jax.e4t.config import E4TConfig, ModelConfig
from e4t_jax.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, phases=[Phase.generate],
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def made(tiny_model_dir, tmp_path_factory):
    """``(E4T, path of a valid concept, its bytes)`` on the tiny model."""
    e = model_lib.build(E4TConfig(model=ModelConfig(base=str(tiny_model_dir), domain_word="face")))
    domain = jax.device_get(e.params.offsets)
    delta = jax.tree.map(lambda x: np.full_like(x, 0.01), domain)
    path = tmp_path_factory.mktemp("concepts") / "good.safetensors"
    concept_lib.save_concept(path, embedding=np.asarray(e.frozen.class_embedding) + 0.1, config=e.config, sd=e.sd,
                             domain=domain, delta=delta)
    return e, path, path.read_bytes()


def load(e, path):
    return concept_lib.load_concept(path, e.sd, Tokenizer.from_folder(e.sd.folder))


def holds_the_contract(e, path) -> bool:
    """True if the file loads as a sound concept; False if it is refused with a ConceptError."""
    try:
        concept = load(e, path)
    except concept_lib.ConceptError as error:
        assert "\n" not in str(error), str(error)
        return False
    for leaf in [concept.embedding, *jax.tree.leaves(concept.domain), *jax.tree.leaves(concept.delta)]:
        assert leaf.dtype == np.float32 and np.all(np.isfinite(leaf))
    return True


def split(data: bytes) -> tuple[dict, bytes]:
    """A safetensors file's JSON header and its tensor bytes."""
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + size]), data[8 + size:]


def join(header: dict, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


def test_the_valid_file_loads(made):
    e, path, _ = made
    assert holds_the_contract(e, path)


@SETTINGS
@given(cut=st.floats(0.0, 0.999))
def test_a_truncated_file_is_refused(made, tmp_path, cut):
    e, _, data = made
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[:int(len(data) * cut)])
    assert not holds_the_contract(e, path)


@SETTINGS
@given(flips=st.lists(st.tuples(st.floats(0.0, 0.999), st.integers(1, 255)), min_size=1, max_size=8))
def test_flipped_bytes_are_refused_or_harmless(made, tmp_path, flips):
    e, _, data = made
    mutated = bytearray(data)
    for where, mask in flips:
        mutated[int(len(data) * where)] ^= mask
    path = tmp_path / "flipped.safetensors"
    path.write_bytes(bytes(mutated))
    holds_the_contract(e, path)  # refused, or (a flip inside a tensor) loaded and still sound


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True)
                           | st.text(max_size=8), lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)


def _field_paths(tree, prefix=()):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield prefix + (key,)
            yield from _field_paths(value, prefix + (key,))


@SETTINGS
@given(data=st.data())
def test_a_header_field_of_another_type_is_refused_or_harmless(made, tmp_path, data):
    e, _, raw = made
    header, body = split(raw)
    e4t = json.loads(header["__metadata__"]["e4t"])
    paths = sorted(_field_paths(e4t))
    where = data.draw(st.sampled_from(paths))
    node = e4t
    for key in where[:-1]:
        node = node[key]
    if data.draw(st.booleans()):
        del node[where[-1]]
    else:
        node[where[-1]] = data.draw(JSON_VALUES)
    header["__metadata__"]["e4t"] = json.dumps(e4t)
    path = tmp_path / "header.safetensors"
    path.write_bytes(join(header, body))
    holds_the_contract(e, path)


@SETTINGS
@given(data=st.data())
def test_a_tensor_of_another_shape_dtype_or_value_is_refused(made, tmp_path, data):
    e, good, _ = made
    tensors = load_file(str(good))
    metadata = split(good.read_bytes())[0]["__metadata__"]
    name = data.draw(st.sampled_from(sorted(tensors)))
    change = data.draw(st.sampled_from(["shape", "dtype", "nan", "inf", "extra"]))
    value = tensors[name]
    if change == "shape":
        tensors[name] = np.zeros(value.shape + (2,), np.float32)
    elif change == "dtype":
        tensors[name] = value.astype(data.draw(st.sampled_from([np.float16, np.float64, np.int32])))
    elif change == "extra":
        tensors["surprise/" + name] = value
    else:
        tensors[name] = value.copy()
        tensors[name].flat[0] = np.nan if change == "nan" else np.inf
    path = tmp_path / "tensor.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    assert not holds_the_contract(e, path)


def test_a_declared_10_gb_tensor_is_refused_without_reading_it(made, tmp_path):
    e, _, raw = made
    header, body = split(raw)
    header["embedding"] = {"dtype": "F32", "shape": [2_500_000_000], "data_offsets": [0, 10_000_000_000]}
    path = tmp_path / "huge.safetensors"
    path.write_bytes(join(header, body))
    assert not holds_the_contract(e, path)


def test_a_pickle_is_refused_and_never_unpickled(made, tmp_path):
    e, _, _ = made
    marker = tmp_path / "unpickled"
    path = tmp_path / "pickle.safetensors"
    path.write_bytes(pickle.dumps(_Touch(marker)))
    assert not holds_the_contract(e, path)
    assert not marker.exists()


class _Touch:
    """Unpickling this creates ``path``: proof that a loader ran the pickle."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_generate_refuses_a_damaged_concept_in_one_line(made, tiny_model_dir, tmp_path):
    _, _, raw = made
    path = tmp_path / "cut.safetensors"
    path.write_bytes(raw[:len(raw) // 2])
    result = subprocess.run([sys.executable, "-m", "infer.generate", "--model", str(tiny_model_dir), "--concept",
                             str(path), "--prompt", "a photo of S*", "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error:"), result.stderr
    assert not (tmp_path / "out").exists()
