"""Text -> image sampling: one compiled program for the whole denoising loop.

:func:`load_model` reads a diffusers-format Stable Diffusion folder (or a Hub id, or
the ``tiny`` / ``medium`` presets of :mod:`e4t_jax.tiny`) into static modules and a
params pytree. :class:`Generator` owns the compiled sampling programs: prompt ids,
negative-prompt ids, initial noise and guidance are runtime arrays, so new prompts
and seeds reuse the same program; only the sampler, step count, image size, batch
size and the *structure* of the personalized concepts select a new one.

Personalized concepts (:class:`Concept`) bring a word embedding for a placeholder
token and U-Net weight offsets; both are applied inside the compiled program, the
base params are never modified.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from e4t_jax import schedulers, tiny, weights
from e4t_jax.e4t import offsets as offsets_lib
from e4t_jax.e4t.embedding import encode_text
from e4t_jax.models.clip import CLIPTextTransformer, load_clip_text
from e4t_jax.models.unet import UNet2DConditionModel, load_unet
from e4t_jax.models.vae import AutoencoderKL, load_vae
from e4t_jax.tokenizer import Tokenizer

PyTree = Any
SAMPLER_ALIASES = {"ddim": "ddim", "euler": "euler", "dpmpp": "dpm++2m", "dpm++2m": "dpm++2m"}


@dataclasses.dataclass(frozen=True, eq=False)
class StableDiffusion:
    """The static half of a Stable Diffusion model (modules and configs, no arrays).

    Attributes:
      unet, vae, text: Flax modules.
      scheduler: the noise schedule from ``scheduler/scheduler_config.json``.
      folder: where it was loaded from.
      model_id: what the user asked for (folder, Hub id or preset name).
    """

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text: CLIPTextTransformer
    scheduler: schedulers.SchedulerConfig
    folder: Path
    model_id: str

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def downsample_factor(self) -> int:
        return self.vae.config.downsample_factor

    @property
    def text_dim(self) -> int:
        return self.text.config.hidden_size


def resolve(path_or_id: str | os.PathLike) -> Path:
    """A model folder for a preset name (``tiny``, ``medium``), a local folder or a Hub id."""
    if str(path_or_id) in tiny.PRESETS:
        return tiny.preset_dir(str(path_or_id))
    return weights.resolve_model(path_or_id)


def load_model(path_or_id: str | os.PathLike, dtype: Any = jnp.float32, remat: bool = False, *,
               param_dtype: Any = jnp.float32) -> tuple[StableDiffusion, PyTree, Tokenizer]:
    """Loads U-Net, VAE, text encoder, tokenizer and scheduler config of a model folder.

    Args:
      dtype: compute dtype of the modules.
      remat: rematerialize U-Net blocks in the backward pass.
      param_dtype: dtype of the loaded weights (float32, bfloat16 or float16).

    Returns:
      ``(model, params, tokenizer)`` with params ``{"unet", "vae", "text"}`` (device
      arrays in ``param_dtype``, placed once so that sampling calls copy nothing).
    """
    folder = resolve(path_or_id)
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not (folder / part).is_dir():
            raise FileNotFoundError(f"{folder} has no {part}/ folder: it is not a diffusers Stable Diffusion model.")
    unet, unet_params = load_unet(folder / "unet", dtype, remat=remat, param_dtype=param_dtype)
    vae, vae_params = load_vae(folder / "vae", dtype, param_dtype=param_dtype)
    text, text_params = load_clip_text(folder / "text_encoder", dtype, param_dtype=param_dtype)
    scheduler = schedulers.SchedulerConfig.from_diffusers(weights.read_config(folder / "scheduler",
                                                                              "scheduler_config.json"))
    model = StableDiffusion(unet, vae, text, scheduler, folder, str(path_or_id))
    params = jax.device_put({"unet": unet_params, "vae": vae_params, "text": text_params})
    return model, params, Tokenizer.from_folder(folder)


@dataclasses.dataclass(frozen=True)
class Concept:
    """A personalized concept: ``embedding`` ``[D]`` for ``token_id``, plus U-Net offsets.

    Attributes:
      token_id: the placeholder's id.
      embedding: ``[D]`` the word embedding ``v*``.
      offsets: weight-offset pytree (:func:`e4t_jax.e4t.offsets.init_offsets`) or None.
      offset_kind: its parameterization.
      head: an :class:`e4t_jax.e4t.encoder.EncoderHead` to re-encode the concept at every
        denoising step (the paper's per-step option); None uses ``embedding`` throughout.
      reencode: arrays for re-encoding: ``head`` (params), ``clip_tokens`` ``[1, T, Dv]``
        and ``latents`` ``[1, h, w, c]`` of the concept image, ``noise`` like
        ``latents``, ``class_embedding`` ``[D]``, ``empty_ids`` ``[1, L]`` (the empty prompt). At step ``t`` the U-Net branch sees
        ``add_noise(latents, noise, t)``, as in training.
    """

    token_id: int
    embedding: Any
    offsets: PyTree = None
    offset_kind: str = "lowrank"
    head: Any = None
    reencode: PyTree = None


def _reencoded(model: StableDiffusion, head, arrays: PyTree, unet_params: PyTree, empty_context: jax.Array,
               timestep: jax.Array) -> jax.Array:
    """``v*`` re-encoded at ``timestep``: the head on the noised concept latent (``[D]``)."""
    from e4t_jax.e4t.encoder import pool_features

    t = jnp.clip(jnp.round(timestep), 0, model.scheduler.num_train_timesteps - 1).astype(jnp.int32)[None]
    noisy = schedulers.add_noise(model.scheduler, arrays["latents"], arrays["noise"], t)
    features = model.unet.apply({"params": unet_params}, noisy.astype(model.unet.dtype), t, empty_context,
                                features_only=True)
    offset = head.apply({"params": arrays["head"]}, arrays["clip_tokens"], pool_features(features))
    return arrays["class_embedding"] + head.config.embedding_scale * offset[0]


def _mesh() -> Mesh:
    return Mesh(np.array(jax.local_devices()), ("data",))


class Generator:
    """Compiled text-to-image sampling for one model.

    Example::

        model, params, tok = load_model("tiny")
        gen = Generator(model)
        images = gen(params, tok.encode(["a photo of a cat"]), tok.encode([""]), seed=0)
    """

    def __init__(self, model: StableDiffusion):
        self.model = model
        self.traces = 0  # how many times a sampling program was traced (compiled)
        self._compiled: dict[tuple, Any] = {}

    def _executable(self, key: tuple, args: tuple) -> Any:
        """The compiled program for ``key`` and the shapes of ``args`` (compiled once)."""
        shapes = jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), args)
        full_key = key + (jax.tree_util.tree_structure(args), tuple(jax.tree_util.tree_leaves(shapes)))
        if full_key not in self._compiled:
            self._compiled[full_key] = jax.jit(self._build(*key)).lower(*args).compile()
        return self._compiled[full_key]

    def _build(self, sampler_name: str, num_steps: int, concept_kinds: tuple[str | None, ...],
               heads: tuple[Any, ...]) -> Callable:
        model = self.model
        sampler = schedulers.make_sampler(model.scheduler, sampler_name, num_steps)

        def run(params, cond_ids, uncond_ids, latents, guidance, concepts):
            self.traces += 1
            unet_params = params["unet"]
            for kind, concept in zip(concept_kinds, concepts):
                if kind is not None:
                    unet_params = offsets_lib.apply_offsets(unet_params, concept["offsets"], kind)
            ids = jnp.concatenate([uncond_ids, cond_ids])
            empties = [None if head is None else encode_text(model.text, params["text"], c["reencode"]["empty_ids"])
                       for head, c in zip(heads, concepts)]

            def text_context(i):
                overrides = tuple(
                    (c["token_id"], c["embedding"] if head is None else
                     _reencoded(model, head, c["reencode"], unet_params, empty, sampler.timesteps[i]))
                    for head, c, empty in zip(heads, concepts, empties))
                return encode_text(model.text, params["text"], ids, overrides)

            static_context = None if any(h is not None for h in heads) else text_context(0)
            x = latents.astype(jnp.float32) * sampler.init_noise_sigma

            def body(i, carry):
                x, state = carry
                context = static_context if static_context is not None else text_context(i)
                x_in = sampler.scale_model_input(state, x, i)
                out = model.unet.apply({"params": unet_params}, jnp.concatenate([x_in, x_in]).astype(model.unet.dtype),
                                       sampler.timesteps[i], context).astype(jnp.float32)
                uncond, cond = jnp.split(out, 2)
                return sampler.step(state, uncond + guidance * (cond - uncond), i, x)

            x, _ = jax.lax.fori_loop(0, sampler.num_steps, body, (x, sampler.init_state(x)))
            vae_cfg = model.vae.config
            z = x / vae_cfg.scaling_factor + (vae_cfg.shift_factor or 0.0)
            images = model.vae.apply({"params": params["vae"]}, z.astype(model.vae.dtype), method=model.vae.decode)
            return jnp.clip((images.astype(jnp.float32) + 1) / 2, 0, 1)

        return run

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        f = self.model.downsample_factor
        return batch, height // f, width // f, self.model.latent_channels

    def _prepare(self, params: PyTree, cond_ids: np.ndarray, uncond_ids: np.ndarray, *, seed: int = 0,
                 latents: np.ndarray | None = None, height: int | None = None, width: int | None = None,
                 num_steps: int = 25, guidance: float = 7.5, sampler: str = "ddim",
                 concepts: tuple[Concept, ...] = ()) -> tuple[Any, tuple]:
        """Validates and places the inputs; returns the compiled program and its arguments.

        Args:
          params: ``{"unet", "vae", "text"}``.
          cond_ids, uncond_ids: ``[B, 77]`` int32 token ids of the prompts and the
            negative prompts.
          seed: initial noise seed (ignored when ``latents`` is given).
          latents: optional ``[B, h, w, C]`` initial noise (before ``init_noise_sigma``).
          height, width: image size in pixels (multiples of the VAE factor, 8 for SD);
            default: the U-Net's ``sample_size`` times the factor.
          num_steps, guidance, sampler: denoising steps, classifier-free guidance scale,
            ``ddim`` / ``euler`` / ``dpmpp``.
          concepts: personalized concepts whose placeholders appear in the prompts.
        """
        if sampler not in SAMPLER_ALIASES:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(set(SAMPLER_ALIASES) - {'dpm++2m'})}")
        f = self.model.downsample_factor
        default = self.model.unet.config.sample_size * f
        height, width = height or default, width or default
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of {f}; got {height}x{width}")
        batch = cond_ids.shape[0]
        if uncond_ids.shape != cond_ids.shape:
            raise ValueError(f"prompt ids {cond_ids.shape} and negative-prompt ids {uncond_ids.shape} differ in shape")
        if latents is None:
            latents = jax.random.normal(jax.random.key(seed), self.latent_shape(batch, height, width), jnp.float32)
        elif tuple(latents.shape) != self.latent_shape(batch, height, width):
            raise ValueError(f"initial latents have shape {tuple(latents.shape)}; expected "
                             f"{self.latent_shape(batch, height, width)} ([B, h, w, C])")
        kinds = tuple(None if c.offsets is None else c.offset_kind for c in concepts)
        heads = tuple(c.head for c in concepts)
        concept_arrays = tuple({"token_id": jnp.int32(c.token_id), "embedding": jnp.asarray(c.embedding, jnp.float32),
                                **({"offsets": c.offsets} if c.offsets is not None else {}),
                                **({"reencode": c.reencode} if c.head is not None else {})} for c in concepts)
        mesh = _mesh()
        data = NamedSharding(mesh, PartitionSpec("data") if batch % mesh.size == 0 else PartitionSpec())
        cond_ids, uncond_ids, latents = jax.device_put((jnp.asarray(cond_ids, jnp.int32),
                                                        jnp.asarray(uncond_ids, jnp.int32),
                                                        jnp.asarray(latents, jnp.float32)), data)
        args = (params, cond_ids, uncond_ids, latents, jnp.float32(guidance), concept_arrays)
        return self._executable((SAMPLER_ALIASES[sampler], num_steps, kinds, heads), args), args

    def compile(self, params: PyTree, cond_ids: np.ndarray, uncond_ids: np.ndarray, **kwargs) -> None:
        """Compiles (without running) the program that ``__call__`` with these arguments runs."""
        self._prepare(params, cond_ids, uncond_ids, **kwargs)

    def __call__(self, params: PyTree, cond_ids: np.ndarray, uncond_ids: np.ndarray, **kwargs) -> np.ndarray:
        """Samples images; arguments as :meth:`_prepare`.

        Returns:
          ``[B, H, W, 3]`` float32 images in [0, 1].
        """
        program, args = self._prepare(params, cond_ids, uncond_ids, **kwargs)
        images = program(*args)
        return np.asarray(images)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """``[B, H, W, 3]`` floats in [0, 1] -> uint8, rounding as diffusers' ``numpy_to_pil``."""
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


def image_grid(images: np.ndarray, columns: int | None = None) -> np.ndarray:
    """Tiles ``[B, H, W, 3]`` images into one ``[rows*H, cols*W, 3]`` image."""
    b, h, w, c = images.shape
    columns = columns or int(np.ceil(np.sqrt(b)))
    rows = int(np.ceil(b / columns))
    grid = np.zeros((rows * h, columns * w, c), images.dtype)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = image
    return grid
