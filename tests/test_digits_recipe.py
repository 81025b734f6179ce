"""The digits base-model recipe: resumable stages, a model folder the pipeline loads.

* a stage stopped after 3 steps and run again to 6 ends bit-identical to 6 steps in
  one go (params, EMA and the data stream all resume);
* the per-patch ink targets are the ink map cut into the ViT's patches;
* the written folder is a diffusers Stable Diffusion that our pipeline and diffusers load.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from e4t_jax import digits, weights
from e4t_jax.recipes import digits as digits_recipe


def _toy_loss(params, frozen, batch, key):
    loss = jnp.mean(jnp.square(batch["x"] @ params["w"] - batch["y"]))
    return loss, {"loss": loss}


def _toy_data(rng, start):
    w_true = np.arange(6, dtype=np.float32).reshape(3, 2)
    while True:
        x = rng.standard_normal((8, 3)).astype(np.float32)
        yield {"x": x, "y": x @ w_true}


@pytest.mark.parametrize("ema", [None, 0.9])
def test_stage_resumes_exactly(tmp_path, ema):
    stage = digits_recipe.Stage(steps=6, batch_size=8, lr=0.1, warmup=2, ema=ema, save_every=3)
    params = {"w": jnp.zeros((3, 2))}
    run = lambda out, s: digits_recipe.train_stage("toy", out, loss_fn=_toy_loss, params=params, frozen={},
                                                   data=_toy_data, stage=s, log_every=1)
    straight = run(tmp_path / "a", stage)
    run(tmp_path / "b", dataclasses.replace(stage, steps=3))
    resumed = run(tmp_path / "b", stage)
    np.testing.assert_array_equal(np.asarray(straight["w"]), np.asarray(resumed["w"]))
    assert not np.allclose(np.asarray(straight["w"]), 0)
    np.testing.assert_array_equal(weights.load_pytree(tmp_path / "b" / "final.safetensors")["w"],
                                  np.asarray(resumed["w"]))
    with pytest.raises(ValueError, match="another configuration"):
        run(tmp_path / "b", dataclasses.replace(stage, lr=0.2))


def test_patch_ink_cuts_patches_in_row_major_order():
    ink = np.arange(2 * 16 * 16, dtype=np.float32).reshape(2, 256)
    patches = np.asarray(digits_recipe.patch_ink(jnp.asarray(ink), 4))
    maps = ink.reshape(2, 16, 16)
    for p in (0, 1, 5, 15):
        r, c = divmod(p, 4)
        np.testing.assert_array_equal(patches[:, p], maps[:, 4 * r:4 * r + 4, 4 * c:4 * c + 4].reshape(2, 16))


def test_written_model_loads_in_our_pipeline_and_diffusers(tmp_path):
    from e4t_jax import pipeline

    params = {name: digits_recipe.init_params(name, i) for i, name in enumerate(("unet", "vae", "text", "vision"))}
    folder = digits_recipe.write_model(tmp_path / "model", params, scaling_factor=0.5)
    sd, loaded, tokenizer = pipeline.load_model(folder)
    assert sd.downsample_factor == 1 and sd.vae.config.scaling_factor == 0.5
    assert sd.scheduler.prediction_type == "v_prediction"
    assert all(len(tokenizer.token_ids(word)) == 1 for word in digits.WORDS)
    np.testing.assert_array_equal(loaded["unet"]["conv_in"]["kernel"], params["unet"]["conv_in"]["kernel"])
    from diffusers import AutoencoderKL, UNet2DConditionModel

    assert UNet2DConditionModel.from_pretrained(folder / "unet").config.sample_size == digits.CANVAS
    assert AutoencoderKL.from_pretrained(folder / "vae").config.latent_channels == 4
