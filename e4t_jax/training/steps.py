"""Pure training steps for E4T: domain pre-training and single-image tuning.

A step sees two pytrees:

* ``state`` (:class:`TrainState`): what trains - ``params`` (by default
  ``{"head": encoder head, "offsets": U-Net weight offsets}``), the optax state of
  exactly those leaves, the step counter and the RNG key;
* ``frozen``: everything that does not train - ``{"unet", "vae", "text", "vision"}``
  params, ``class_embedding`` ``[D]`` (the domain word's embedding) and
  ``empty_context`` ``[1, 77, D]`` (the text encoding of ""), plus any E4T part
  that the caller chose not to train (e.g. ``{"head": ...}`` when tuning offsets only).

"What trains" is the choice of which pytree goes into ``state.params``; nothing in
the modules knows. Optimizer moments exist only for the trainable leaves.

Per-example noise and timesteps are drawn from ``fold_in(key, example_index)``, so
the update is identical however the global batch is split over devices or hosts.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from e4t_jax import schedulers
from e4t_jax.e4t import offsets as offsets_lib
from e4t_jax.e4t.embedding import encode_text
from e4t_jax.e4t.encoder import clip_class_tokens, pool_features
from e4t_jax.e4t.losses import diffusion_loss, downsample_mask, embedding_regularization
from e4t_jax.models.clip import CLIP_MEAN, CLIP_STD

PyTree = Any


class TrainState(flax.struct.PyTreeNode):
    """The trainable part of a run. ``params``: trainable pytree; ``opt_state``: its optax state."""

    step: jax.Array
    params: PyTree
    opt_state: optax.OptState
    rng: jax.Array

    @classmethod
    def create(cls, params: PyTree, optimizer: optax.GradientTransformation, rng: jax.Array) -> "TrainState":
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params), rng=rng)


@dataclasses.dataclass(frozen=True)
class E4TModel:
    """The static half of E4T: modules and configs (no arrays). Closed over by the steps.

    Attributes:
      unet, vae, text, vision: Flax modules of the frozen base model and CLIP vision tower.
      head: the :class:`e4t_jax.e4t.encoder.EncoderHead` module.
      scheduler: training noise schedule (:class:`e4t_jax.schedulers.SchedulerConfig`).
      offsets: :class:`e4t_jax.e4t.offsets.OffsetConfig`.
      placeholder_id: token id of the placeholder (``S*``).
      lambda_emb: weight of ``||s E(x)||^2``.
      lambda_w: weight of ``||dW||^2``.
      vae_scaling: the VAE's latent scaling factor.
    """

    unet: Any
    vae: Any
    text: Any
    vision: Any
    head: Any
    scheduler: Any
    offsets: Any
    placeholder_id: int
    lambda_emb: float = 0.01
    lambda_w: float = 1e-4
    vae_scaling: float = 0.18215

    @property
    def encoder_config(self):
        return self.head.config


def clip_pixels(pixels: jax.Array, size: int) -> jax.Array:
    """``[B, H, W, 3]`` in [-1, 1] -> ``[B, size, size, 3]`` CLIP-normalized float32.

    Bicubic resize of the whole (already square, cropped) image; CLIP's mean/std.
    """
    x = (pixels.astype(jnp.float32) + 1.0) / 2.0
    x = jax.image.resize(x, (x.shape[0], size, size, 3), method="bicubic", antialias=True)
    return (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)


def per_example_noise(key: jax.Array, index: jax.Array, latent_shape: tuple[int, ...],
                      num_train_timesteps: int) -> tuple[jax.Array, jax.Array]:
    """Noise ``[B, h, w, c]`` and timesteps ``[B]`` drawn from ``fold_in(key, index[i])``."""
    def draw(i):
        k_noise, k_t = jax.random.split(jax.random.fold_in(key, i))
        return (jax.random.normal(k_noise, latent_shape, jnp.float32),
                jax.random.randint(k_t, (), 0, num_train_timesteps))
    return jax.vmap(draw)(index)


def encode_concept(model: E4TModel, e4t_params: PyTree, frozen: PyTree, unet_params: PyTree,
                   pixels: jax.Array, noisy_latents: jax.Array, timesteps: jax.Array) -> jax.Array:
    """The encoder's offset ``E(x)``: ``[B, D]`` float32 (before the scale ``s``).

    Args:
      pixels: ``[B, H, W, 3]`` in [-1, 1], the concept image(s).
      noisy_latents: ``[B, h, w, c]`` the noisy latents the U-Net branch sees.
      timesteps: ``[B]`` int.
      unet_params: U-Net params with the current offsets applied.
    """
    cfg = model.encoder_config
    vision_size = frozen["vision"]["embeddings"]["position_embedding"]["embedding"].shape[0]
    patch = frozen["vision"]["embeddings"]["patch_embedding"]["kernel"].shape[0]
    size = int(round((vision_size - 1) ** 0.5)) * patch
    vision_out = model.vision.apply({"params": frozen["vision"]}, clip_pixels(pixels, size),
                                    output_hidden_states=True)
    tokens = jax.lax.stop_gradient(clip_class_tokens(vision_out.hidden_states, cfg.clip_layer_stride))
    pooled = None
    if cfg.use_unet_branch:
        context = jnp.broadcast_to(frozen["empty_context"],
                                   (noisy_latents.shape[0],) + frozen["empty_context"].shape[1:])
        features = model.unet.apply({"params": unet_params}, noisy_latents, timesteps, context,
                                    features_only=True)
        pooled = pool_features(features)
    return model.head.apply({"params": e4t_params["head"]}, tokens, pooled)


def e4t_loss(params: PyTree, frozen: PyTree, batch: dict, key: jax.Array, *,
             model: E4TModel) -> tuple[jax.Array, dict]:
    """The E4T objective on one batch.

    Args:
      params: trainable pytree (a subset of ``{"head", "offsets"}``).
      frozen: frozen pytree (see module docstring).
      batch: ``pixels`` ``[B, H, W, 3]`` float in [-1, 1]; ``input_ids`` ``[B, L]``
        int32 (prompts with the placeholder); ``index`` ``[B]`` int32 global example
        indices; optional ``mask`` ``[B, H, W]`` float in [0, 1] (per-pixel loss weight).
      key: this step's RNG key.

    Returns:
      ``(loss, metrics)``; loss = diffusion + lambda_emb * ||s E||^2 + lambda_w * ||dW||^2.
    """
    e4t_params = {**{k: v for k, v in frozen.items() if k in ("head", "offsets")}, **params}
    unet_params = offsets_lib.apply_offsets(frozen["unet"], e4t_params["offsets"], model.offsets)
    posterior_mean, _ = model.vae.apply({"params": frozen["vae"]}, batch["pixels"], method=model.vae.encode)
    latents = jax.lax.stop_gradient(posterior_mean.astype(jnp.float32) * model.vae_scaling)
    noise, timesteps = per_example_noise(key, batch["index"], latents.shape[1:],
                                         model.scheduler.num_train_timesteps)
    noisy = schedulers.add_noise(model.scheduler, latents, noise, timesteps)
    offset = encode_concept(model, e4t_params, frozen, unet_params, batch["pixels"], noisy, timesteps)
    scaled = model.encoder_config.embedding_scale * offset
    word = frozen["class_embedding"][None, :] + scaled
    context = encode_text(model.text, frozen["text"], batch["input_ids"], ((model.placeholder_id, word),))
    prediction = model.unet.apply({"params": unet_params}, noisy, timesteps, context)
    target = schedulers.training_target(model.scheduler, latents, noise, timesteps)
    mask = batch.get("mask")
    if mask is not None:
        mask = downsample_mask(mask, latents.shape[1:3])
    diffusion = diffusion_loss(prediction.astype(jnp.float32), target, mask)
    emb_reg = embedding_regularization(scaled)
    w_reg = offsets_lib.offset_l2(e4t_params["offsets"], model.offsets, unet_params=frozen["unet"])
    loss = diffusion + model.lambda_emb * emb_reg + model.lambda_w * w_reg
    return loss, {"loss": loss, "diffusion": diffusion, "emb_reg": emb_reg, "offset_reg": w_reg}


def make_optimizer(lr: float, *, weight_decay: float = 1e-2, clip_norm: float = 1.0,
                   warmup_steps: int = 0) -> optax.GradientTransformation:
    """AdamW with global-norm clipping and an optional linear warm-up."""
    schedule = optax.linear_schedule(0.0, lr, warmup_steps) if warmup_steps else lr
    return optax.chain(optax.clip_by_global_norm(clip_norm), optax.adamw(schedule, weight_decay=weight_decay))


def train_step(state: TrainState, frozen: PyTree, batch: dict, *, loss_fn: Callable,
               optimizer: optax.GradientTransformation, axis_name: str | None = None) -> tuple[TrainState, dict]:
    """One optimizer step. Pure; ``axis_name`` set under ``pmap`` averages grads and metrics.

    ``loss_fn(params, frozen, batch, key) -> (loss, metrics)`` is the objective,
    usually ``functools.partial(e4t_loss, model=model)``.
    """
    key = jax.random.fold_in(state.rng, state.step)
    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params, frozen, batch, key)
    if axis_name is not None:
        grads, metrics = jax.lax.pmean((grads, metrics), axis_name)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, grad_norm=optax.global_norm(grads))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def pretrain_step(state: TrainState, frozen: PyTree, batch: dict, *, model: E4TModel,
                  optimizer: optax.GradientTransformation, axis_name: str | None = None):
    """Domain pre-training: a batch of different images of the domain."""
    return train_step(state, frozen, batch, loss_fn=functools.partial(e4t_loss, model=model),
                      optimizer=optimizer, axis_name=axis_name)


def tune_step(state: TrainState, frozen: PyTree, batch: dict, *, model: E4TModel,
              optimizer: optax.GradientTransformation, axis_name: str | None = None):
    """Personalization: the same objective on augmented copies of ONE image.

    Identical to :func:`pretrain_step` in math; separate so that the two stages can
    diverge (learning rates, what trains) without flags inside the loss.
    """
    return train_step(state, frozen, batch, loss_fn=functools.partial(e4t_loss, model=model),
                      optimizer=optimizer, axis_name=axis_name)
