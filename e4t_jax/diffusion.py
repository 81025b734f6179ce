"""The text-to-image diffusion objective of a Stable Diffusion model, as a pure function.

What trains a base model from scratch, fine-tunes it (DreamBooth) or learns a word
embedding (Textual Inversion) is this one loss with different trainable pytrees.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from e4t_jax import conditioning, schedulers
from e4t_jax.models.vae import encode_to_latents

PyTree = Any


def text_to_image_loss(params: PyTree, frozen: PyTree, batch: dict, key: jax.Array, *, sd,
                       encode_text: Callable[[PyTree, jax.Array], jax.Array] | None = None,
                       reduce: bool = True) -> tuple[jax.Array, dict]:
    """Mean squared error of the U-Net's prediction (epsilon or v, per the scheduler).

    Args:
      params, frozen: two halves of ``{"unet", "text", "vae"}`` (which half trains is
        the caller's choice); ``params`` wins where both hold a key.
      batch: ``pixels`` ``[B, H, W, 3]`` in [-1, 1], ``input_ids`` ``[B, 77]`` int32,
        ``index`` ``[B]`` int32 global example indices.
      key: this step's RNG key.
      sd: the static :class:`e4t_jax.pipeline.StableDiffusion`.
      encode_text: ``(text_params, input_ids) -> [B, 77, D]``; default: the model's
        text conditioner. Textual Inversion passes one that injects its learned embedding.
      reduce: False returns the per-example loss ``[B]`` instead of the mean.

    Returns:
      ``(loss, {"loss": mean loss})``.
    """
    merged = {**frozen, **params}
    latents = jax.lax.stop_gradient(encode_to_latents(merged["vae"], sd.vae, batch["pixels"]))
    noise, t = schedulers.per_example_noise(key, batch["index"], latents.shape[1:], sd.scheduler.num_train_timesteps)
    noisy = schedulers.add_noise(sd.scheduler, latents, noise, t)
    if encode_text is None:
        context = conditioning.encode_text(sd.text, merged["text"], batch["input_ids"])
    else:
        context = encode_text(merged["text"], batch["input_ids"])
    prediction = sd.unet.apply({"params": merged["unet"]}, noisy, t, context).astype(jnp.float32)
    target = schedulers.training_target(sd.scheduler, latents, noise, t)
    per_example = jnp.mean(jnp.square(prediction - target), axis=(1, 2, 3))
    loss = jnp.mean(per_example)
    return (loss if reduce else per_example), {"loss": loss}
