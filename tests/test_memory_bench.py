"""``bench/memory.py`` compiles E4T for shapes only: its abstract model must be the real one.

The full-size table in bench/RESULTS.md is only as true as :func:`bench.memory.abstract_e4t`:
for the tiny preset its frozen and trained trees (bfloat16 storage) have exactly the shapes and dtypes that
:func:`e4t_jax.e4t.model.build` loads, and at full size the parameter counts are SD 1.5's
and OpenCLIP ViT-H/14's published ones. ``jax.eval_shape`` only: nothing compiles.
"""
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import memory  # noqa: E402
from e4t_jax import presets  # noqa: E402
from e4t_jax.e4t import model as model_lib  # noqa: E402
from e4t_jax.e4t.config import E4TConfig, ModelConfig  # noqa: E402


def _shapes(tree):
    return jax.tree.map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)), tree)


def test_abstract_tiny_model_has_the_loaded_models_shapes():
    """In bfloat16 storage (float32 differs only in not converting the frozen leaves)."""
    dtype = "bfloat16"
    built = model_lib.build(E4TConfig(model=ModelConfig(base="tiny", domain_word="face")), dtype=jnp.dtype(dtype))
    model, frozen, params, _ = memory.abstract_e4t(presets.preset_configs("tiny"), jnp.dtype(dtype), remat=False)
    assert _shapes(frozen) == _shapes(built.frozen)
    assert _shapes(params) == _shapes(built.params)
    assert model.sd.unet.config == built.sd.unet.config


def test_full_size_counts_are_sd15_and_vit_h14():
    _, frozen, params, _ = memory.abstract_e4t(presets.full_size_configs(), jnp.float32, remat=True)

    def count(tree):
        return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))

    assert count(frozen.unet) == 859_520_964  # runwayml/stable-diffusion-v1-5 unet/
    assert count(frozen.vae) == 83_653_863
    assert count(frozen.text) == 123_060_480  # CLIP ViT-L/14 text tower
    assert count(frozen.vision) == 630_766_080  # OpenCLIP ViT-H/14 visual, without its projection
    assert frozen.empty_context.shape == (1, 77, 768) and params.head is not None
