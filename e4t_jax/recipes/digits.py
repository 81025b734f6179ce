"""The digits base model, trained from scratch on this CPU: architecture and training stages.

A complete small Stable Diffusion for the :mod:`e4t_jax.digits` domain, in diffusers
format, trained in three resumable stages with the project's own training code (the
pure :func:`e4t_jax.training.steps.train_step`, optax, orbax checkpoints):

1. ``vae``: an ``AutoencoderKL`` with one block and no downsampling (16x16x3 pixels
   <-> 16x16x4 latents). At 16 pixels every pixel of a digit matters, and a trained
   autoencoder keeps the pipeline exactly as for Stable Diffusion (encode, scale,
   denoise, decode) at almost no cost. Its scaling factor is measured after training
   (1 / the latents' standard deviation), as Stable Diffusion's was.
2. ``vision``: a small CLIP vision tower (4x4 patches) whose every patch token is
   trained to tell its own ink from background, whatever the two colours are. It
   stands in for the web-scale CLIP that real E4T uses: its tokens describe the
   digit's strokes and ignore the colours that captions already state. It uses no
   labels. Objectives read from the [CLS] token (the digit's 8x8 glyph, its whole
   ink map, or contrastive matching of two renders of one digit) stayed at their
   chance level for 300-1,200 steps: at 16 tokens the [CLS] token did not learn to
   gather spatial detail in the steps this CPU affords, so the digits encoder reads
   the patch tokens (see :func:`e4t_jax.e4t.encoder` backbones).
3. ``base``: the U-Net and the CLIP text encoder, trained together on attribute
   captions (10% dropped for classifier-free guidance), with an exponential moving
   average of the weights.

Each stage writes ``OUT/<stage>/`` (checkpoints, ``metrics.jsonl``) and, when done,
``OUT/<stage>/final.safetensors``; :func:`write_model` assembles ``OUT/model``.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from e4t_jax import conditioning, digits, presets, schedulers, weights
from e4t_jax.diffusion import text_to_image_loss
from e4t_jax.e4t.vision import resize_and_normalize
from e4t_jax.models.clip import (CLIP_MEAN, CLIP_STD, CLIPTextConfig, CLIPTextTransformer, CLIPVisionConfig,
                                 CLIPVisionTransformer)
from e4t_jax.models.unet import UNet2DConditionModel, UNetConfig
from e4t_jax.models.vae import AutoencoderKL, VAEConfig, sample_latents
from e4t_jax.tokenizer import Tokenizer, build_tiny_vocab, make_tiny_tokenizer_files
from e4t_jax.training import checkpoint, steps
from e4t_jax.training.config import OptimizerConfig

PyTree = Any
VOCAB_SIZE = len(build_tiny_vocab(digits.WORDS)[0])

SCHEDULER = {
    "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2",
    "beta_start": 0.0001, "beta_end": 0.02, "prediction_type": "v_prediction", "steps_offset": 0,
    "set_alpha_to_one": False, "clip_sample": False, "timestep_spacing": "trailing",
}
UNET = {
    "_class_name": "UNet2DConditionModel", "sample_size": digits.CANVAS, "in_channels": 4, "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn", "block_out_channels": [32, 64, 64], "layers_per_block": 1,
    "attention_head_dim": 4, "cross_attention_dim": 64, "norm_num_groups": 16, "norm_eps": 1e-5,
    "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu", "use_linear_projection": False,
    "upcast_attention": False, "downsample_padding": 1,
}
VAE = {
    "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"], "up_block_types": ["UpDecoderBlock2D"],
    "block_out_channels": [32], "layers_per_block": 1, "norm_num_groups": 8, "sample_size": digits.CANVAS,
    "scaling_factor": 1.0, "act_fn": "silu", "mid_block_add_attention": False,
}
TEXT = {
    "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 77,
    "vocab_size": VOCAB_SIZE, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 64,
    "bos_token_id": VOCAB_SIZE - 2, "eos_token_id": VOCAB_SIZE - 1, "pad_token_id": VOCAB_SIZE - 1,
}
VISION = {
    "architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model", "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "image_size": digits.CANVAS,
    "patch_size": 4, "num_channels": 3, "hidden_act": "gelu", "layer_norm_eps": 1e-5, "projection_dim": 64,
}


@dataclasses.dataclass(frozen=True)
class Stage:
    """Hyper-parameters of one training stage (AdamW, linear warm-up, then constant)."""

    steps: int
    batch_size: int
    lr: float
    warmup: int = 100
    weight_decay: float = 0.0
    ema: float | None = None
    save_every: int = 250


STAGES = {
    "vae": Stage(steps=800, batch_size=64, lr=1e-3),
    "vision": Stage(steps=1500, batch_size=64, lr=1e-3),
    "base": Stage(steps=6000, batch_size=64, lr=5e-4, warmup=200, ema=0.999),
}


def modules() -> dict[str, nn.Module]:
    """The Flax modules of the four networks."""
    return {"unet": UNet2DConditionModel(UNetConfig.from_diffusers(UNET)),
            "vae": AutoencoderKL(VAEConfig.from_diffusers(VAE)),
            "text": CLIPTextTransformer(CLIPTextConfig.from_dict(TEXT)),
            "vision": CLIPVisionTransformer(CLIPVisionConfig.from_dict(VISION))}


def init_params(name: str, seed: int) -> PyTree:
    """Freshly initialized params of one network (compiled init)."""
    module = modules()[name]
    c = digits.CANVAS
    inputs = {"unet": (jnp.zeros((1, c, c, 4)), jnp.zeros((1,)), jnp.zeros((1, 77, TEXT["hidden_size"]))),
              "vae": (jnp.zeros((1, c, c, 3)),), "text": (jnp.zeros((1, 77), jnp.int32),),
              "vision": (jnp.zeros((1, c, c, 3)),)}[name]
    return jax.jit(module.init)(jax.random.key(seed), *inputs)["params"]


# ----------------------------------------------------------------------------- losses


def vae_loss(params: PyTree, frozen: PyTree, batch: dict, key: jax.Array, *, kl_weight: float = 1e-4):
    """Reconstruction MSE of a posterior sample + ``kl_weight`` x KL to N(0, 1)."""
    vae = modules()["vae"]
    mean, logvar = vae.apply({"params": params}, batch["pixels"], method=vae.encode)
    z = sample_latents(mean, logvar, key)
    recon = vae.apply({"params": params}, z, method=vae.decode)
    mse = jnp.mean(jnp.square(recon - batch["pixels"]))
    kl = 0.5 * jnp.mean(jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=-1))
    loss = mse + kl_weight * kl
    return loss, {"loss": loss, "mse": mse, "kl": kl}


def vision_tokens(vision_params: PyTree, pixels: jax.Array) -> jax.Array:
    """``[B, 16, 16, 3]`` in [-1, 1] -> last-layer patch tokens ``[B, patches, D]``."""
    x = resize_and_normalize(pixels, VISION["image_size"], CLIP_MEAN, CLIP_STD)  # as the encoder's backbone sees it
    return modules()["vision"].apply({"params": vision_params}, x).last_hidden_state[:, 1:]


def patch_ink(ink: jax.Array, patch: int) -> jax.Array:
    """``[B, S * S]`` ink maps -> ``[B, (S / patch)^2, patch * patch]``, patches in row-major order."""
    b, side = ink.shape[0], int(round(ink.shape[1] ** 0.5))
    n = side // patch
    return ink.reshape(b, n, patch, n, patch).transpose(0, 1, 3, 2, 4).reshape(b, n * n, patch * patch)


def ink_loss(params: PyTree, frozen: PyTree, batch: dict, key: jax.Array):
    """MSE of each patch token's prediction of its own ink (``patch x patch`` values in [0, 1])."""
    patch = VISION["patch_size"]
    prediction = nn.Dense(patch * patch).apply({"params": params["head"]},
                                               vision_tokens(params["vision"], batch["pixels"]))
    loss = jnp.mean(jnp.square(prediction - patch_ink(batch["ink"], patch)))
    return loss, {"loss": loss}


# ----------------------------------------------------------------------------- data


def batches(stage: str, rng: np.random.Generator, start: int, batch_size: int,
            tokenizer: Tokenizer | None = None) -> Iterator[dict]:
    """Endless host batches of renders of the training split, drawn from ``rng``.

    ``start`` is the step of the first batch: example indices (which seed the noise)
    continue from it on resume.
    """
    glyphs, _ = digits.load_glyphs()
    train = digits.split_indices("train")
    step = start
    while True:
        if stage == "vision":
            scenes = [(glyphs[i], digits.random_attributes(rng)) for i in rng.choice(train, batch_size)]
            pixels = np.stack([digits.render(g, a) for g, a in scenes]).astype(np.float32) / 127.5 - 1.0
            yield {"pixels": pixels, "ink": np.stack([digits.ink(g, a).reshape(-1) for g, a in scenes])}
        else:
            pixels, captions = digits.training_batch(glyphs, rng.choice(train, batch_size), rng)
            batch = {"pixels": pixels, "index": np.arange(step * batch_size, (step + 1) * batch_size, dtype=np.int32)}
            if stage == "base":
                batch["input_ids"] = tokenizer.encode(captions)
            yield batch
        step += 1


# ----------------------------------------------------------------------------- loop


def train_stage(name: str, out: str | os.PathLike, *, loss_fn: Callable, params: PyTree, frozen: PyTree,
                data: Callable[[np.random.Generator, int], Iterator[dict]], stage: Stage, seed: int = 0,
                log_every: int = 50) -> PyTree:
    """Trains ``params`` for ``stage.steps`` steps, resuming from ``out``'s latest checkpoint.

    ``data(rng, start_step)`` is the batch stream; the numpy generator's state is
    checkpointed, so a resumed run sees the same batches as an uninterrupted one.

    Returns:
      the final params (their EMA if ``stage.ema``), also written to ``out/final.safetensors``.
    """
    out = Path(out)
    optimizer = steps.make_optimizer(OptimizerConfig(lr=stage.lr, weight_decay=stage.weight_decay,
                                                     warmup_steps=stage.warmup))
    state = {"train": steps.TrainState.create(params, optimizer, jax.random.key(seed)),
             "ema": params if stage.ema else None}
    manager = checkpoint.open_manager(out / "checkpoints", max_to_keep=2, save_every=stage.save_every)
    rng = np.random.default_rng(seed)
    config = {"stage": name, **dataclasses.asdict(stage)}
    if manager.latest_step() is not None:
        state, data_state, stored = checkpoint.restore(manager, abstract_state=state)
        if {**stored, "steps": stage.steps} != config:  # more steps extend a run
            raise ValueError(f"{out} holds a run of another configuration: {stored} (this run: {config})")
        rng.bit_generator.state = data_state
    start = int(state["train"].step)

    @jax.jit
    def step_fn(state, frozen, batch):
        train, metrics = steps.train_step(state["train"], frozen, batch, loss_fn=loss_fn, optimizer=optimizer)
        ema = state["ema"]
        if ema is not None:
            ema = jax.tree.map(lambda e, p: stage.ema * e + (1 - stage.ema) * p, ema, train.params)
        return {"train": train, "ema": ema}, metrics

    frozen = jax.device_put(frozen)  # once, not with every step
    stream = data(rng, start)
    log = open(out / "metrics.jsonl", "a")
    bar = tqdm(range(start, stage.steps), initial=start, total=stage.steps, desc=name, mininterval=10)
    for step in bar:
        state, metrics = step_fn(state, frozen, next(stream))
        if (step + 1) % log_every == 0 or step + 1 == stage.steps:
            values = {k: float(v) for k, v in metrics.items()}
            if not np.isfinite(values["loss"]):
                raise FloatingPointError(f"{name}: non-finite loss at step {step + 1}; the last checkpoint is kept")
            bar.set_postfix(loss=f"{values['loss']:.4f}")
            log.write(json.dumps({"step": step + 1, **values}) + "\n")
            log.flush()
        if manager.should_save(step + 1) or step + 1 == stage.steps:
            # The stream is lazy: the generator's state now draws the next step's batch.
            checkpoint.save(manager, step + 1, train_state=state, data_state=rng.bit_generator.state,
                            config=config, force=True)
    manager.wait_until_finished()
    log.close()
    final = state["ema"] if stage.ema else state["train"].params
    weights.save_pytree(final, out / "final.safetensors")
    return final


# ----------------------------------------------------------------------------- stages


def digits_tokenizer(folder: str | os.PathLike) -> Tokenizer:
    """The digits tokenizer (every word of :data:`e4t_jax.digits.WORDS` one token), written to ``folder``."""
    return Tokenizer.from_folder(make_tiny_tokenizer_files(folder, words=digits.WORDS))


def run_vae(out: Path, seed: int = 0, stage: Stage = STAGES["vae"]) -> PyTree:
    return train_stage("vae", out / "vae", loss_fn=vae_loss, params=init_params("vae", seed), frozen={},
                       data=lambda rng, start: batches("vae", rng, start, stage.batch_size), stage=stage, seed=seed)


def run_vision(out: Path, seed: int = 0, stage: Stage = STAGES["vision"]) -> PyTree:
    head = jax.jit(nn.Dense(VISION["patch_size"] ** 2).init)(jax.random.key(seed + 1),
                                                             jnp.zeros((1, VISION["hidden_size"])))["params"]
    params = train_stage("vision", out / "vision", loss_fn=ink_loss,
                         params={"vision": init_params("vision", seed), "head": head}, frozen={},
                         data=lambda rng, start: batches("vision", rng, start, stage.batch_size),
                         stage=stage, seed=seed)
    return params["vision"]


def latent_scale(vae_params: PyTree, seed: int = 0, count: int = 2048) -> float:
    """1 / standard deviation of the VAE's posterior means over ``count`` training renders."""
    vae = modules()["vae"]
    pixels = next(batches("vae", np.random.default_rng(seed + 7), 0, count))["pixels"]
    mean, _ = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=vae.encode))(vae_params, pixels)
    return float(1.0 / np.std(np.asarray(mean)))


def base_model(vae_params: PyTree, scaling_factor: float, tokenizer_folder: Path):
    """The static :class:`e4t_jax.pipeline.StableDiffusion` of the digits model."""
    from e4t_jax.pipeline import StableDiffusion

    m = modules()
    vae = AutoencoderKL(VAEConfig.from_diffusers({**VAE, "scaling_factor": scaling_factor}))
    return StableDiffusion(m["unet"], vae, conditioning.CLIPText(m["text"]),
                           schedulers.SchedulerConfig.from_diffusers(SCHEDULER), tokenizer_folder, "digits")


def run_base(out: Path, vae_params: PyTree, scaling_factor: float, seed: int = 0,
             stage: Stage = STAGES["base"]) -> PyTree:
    tokenizer = digits_tokenizer(out / "tokenizer")
    sd = base_model(vae_params, scaling_factor, out / "tokenizer")
    params = {"unet": init_params("unet", seed), "text": init_params("text", seed + 1)}
    loss = lambda p, f, b, k: text_to_image_loss(p, f, b, k, sd=sd)
    return train_stage("base", out / "base", loss_fn=loss, params=params, frozen={"vae": vae_params},
                       data=lambda rng, start: batches("base", rng, start, stage.batch_size, tokenizer),
                       stage=stage, seed=seed)


def write_model(out_dir: str | os.PathLike, params: PyTree, scaling_factor: float) -> Path:
    """Writes the trained model as a diffusers folder (with ``image_encoder/``).

    Args:
      params: ``{"unet", "vae", "text", "vision"}``.
      scaling_factor: the VAE latent scale (:func:`latent_scale`).
    """
    configs = {"unet": UNET, "vae": {**VAE, "scaling_factor": scaling_factor}, "text_encoder": TEXT,
               "image_encoder": VISION, "scheduler": SCHEDULER}
    named = {"unet": params["unet"], "vae": params["vae"], "text_encoder": params["text"],
             "image_encoder": params["vision"]}
    return presets.write_folder(out_dir, configs, jax.device_get(named), preset="digits", words=digits.WORDS)
