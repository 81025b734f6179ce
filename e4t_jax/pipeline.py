"""Text -> image sampling: one compiled program for the whole denoising loop.

:func:`load_model` reads a diffusers-format Stable Diffusion folder (or a Hub id, or
a preset of :mod:`e4t_jax.presets`) into static modules and a params pytree.
:class:`Generator` owns the compiled sampling programs: prompt ids, negative-prompt
ids, initial noise, guidance and the hooks' arrays are runtime inputs, so new prompts,
seeds and concepts reuse the same program; only the sampler, step count, image size,
batch size and the *structure* of the hooks select a new one.

:class:`Hooks` are how a personalization method changes sampling, without this module
knowing the method:

* :class:`TokenOverride`: the input embedding of a token id is replaced by a vector,
  fixed for the whole loop or computed at every denoising step from the timestep;
* :class:`ParamsTransform`: a function of the params (e.g. adding weight offsets to
  the U-Net), applied once inside the compiled program; the base params are never
  modified.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from e4t_jax import conditioning, files, presets, schedulers, weights
from e4t_jax.errors import UserError
from e4t_jax.models.unet import UNet2DConditionModel, load_unet
from e4t_jax.models.vae import AutoencoderKL, decode_latents, load_vae
from e4t_jax.tokenizer import Tokenizer

PyTree = Any
SAMPLER_ALIASES = {"ddim": "ddim", "euler": "euler", "dpmpp": "dpm++2m", "dpm++2m": "dpm++2m"}


@dataclasses.dataclass(frozen=True, eq=False)
class StableDiffusion:
    """The static half of a Stable Diffusion model (modules and configs, no arrays).

    Attributes:
      unet, vae: Flax modules.
      text: the text conditioner (:class:`e4t_jax.conditioning.TextConditioner`).
      scheduler: the noise schedule from ``scheduler/scheduler_config.json``.
      folder: where it was loaded from.
      model_id: what the user asked for (folder, Hub id or preset name).
    """

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text: conditioning.TextConditioner
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
        return self.text.width

    @property
    def image_size(self) -> int:
        """Default image side in pixels: the U-Net's ``sample_size`` times the VAE factor."""
        return self.unet.config.sample_size * self.downsample_factor


def resolve(path_or_id: str | os.PathLike, variant: str | None = None) -> Path:
    """A model folder for a preset name (``tiny``, ``medium``), a local folder or a Hub id
    (whose pipeline parts are fetched, their ``variant`` weights if given)."""
    if presets.is_preset(str(path_or_id)):
        return presets.preset_dir(str(path_or_id))
    return weights.resolve_model(path_or_id, variant=variant)


def load_model(path_or_id: str | os.PathLike, dtype: Any = jnp.float32, remat: bool = False, *,
               param_dtype: Any = jnp.float32, variant: str | None = None,
               place: bool = True) -> tuple[StableDiffusion, PyTree, Tokenizer]:
    """Loads U-Net, VAE, text encoder, tokenizer and scheduler config of a model folder.

    Args:
      dtype: compute dtype of the modules.
      remat: rematerialize U-Net blocks in the backward pass.
      param_dtype: dtype of the loaded weights (float32, bfloat16 or float16).
      variant: read the weight files of this variant (``fp16``: ``*.fp16.safetensors``,
        diffusers' naming) instead of the plain ones (:func:`e4t_jax.weights.weight_files`).
      place: put the params on the default device; False keeps them in host memory
        (numpy), for a caller that shards them over a mesh.

    Returns:
      ``(model, params, tokenizer)`` with params ``{"unet", "vae", "text"}`` (device
      arrays in ``param_dtype``, placed once so that sampling calls copy nothing).
    """
    folder = resolve(path_or_id, variant)
    for part in weights.PIPELINE_PARTS:
        if not (folder / part).is_dir():
            raise FileNotFoundError(f"{folder} has no {part}/ folder: it is not a diffusers Stable Diffusion model.")
    unet, unet_params = load_unet(folder / "unet", dtype, remat=remat, param_dtype=param_dtype, variant=variant)
    vae, vae_params = load_vae(folder / "vae", dtype, param_dtype=param_dtype, variant=variant)
    text, text_params = conditioning.load(folder / "text_encoder", dtype, param_dtype=param_dtype, variant=variant)
    scheduler = schedulers.SchedulerConfig.from_diffusers(weights.read_config(folder / "scheduler",
                                                                              "scheduler_config.json"))
    model = StableDiffusion(unet, vae, text, scheduler, folder, str(path_or_id))
    params = {"unet": unet_params, "vae": vae_params, "text": text_params}
    params = jax.device_put(params) if place else jax.tree.map(np.asarray, params)
    return model, params, Tokenizer.from_folder(folder)


@flax.struct.dataclass
class TokenOverride:
    """Replaces the input embedding of ``token_id`` in every prompt while sampling.

    Either ``embedding`` (fixed for the whole loop) or ``at_timestep`` (called at every
    denoising step) gives the vector.

    Attributes:
      token_id: int32 scalar, the token (e.g. a placeholder ``S*``).
      embedding: ``[D]`` float32, or None with ``at_timestep``.
      state: arrays that ``at_timestep`` reads (runtime inputs of the program).
      at_timestep: static ``fn(state, params, timestep) -> [D]``; ``params`` are the
        model params after every :class:`ParamsTransform`, ``timestep`` the sampler's
        float32 scalar. Must compare equal across calls (a module-level function or a
        frozen dataclass) for the compiled program to be reused.
    """

    token_id: jax.Array
    embedding: jax.Array | None = None
    state: PyTree = None
    at_timestep: Callable | None = flax.struct.field(pytree_node=False, default=None)

    def vector(self, params: PyTree, timestep: jax.Array) -> jax.Array:
        """The ``[D]`` embedding at ``timestep``."""
        return self.embedding if self.at_timestep is None else self.at_timestep(self.state, params, timestep)


@flax.struct.dataclass
class ParamsTransform:
    """``fn(params, state) -> params`` applied to ``{"unet", "vae", "text"}`` inside the program.

    ``fn`` is static (compared across calls like :attr:`TokenOverride.at_timestep`);
    ``state`` holds its arrays (e.g. weight offsets).
    """

    state: PyTree
    fn: Callable = flax.struct.field(pytree_node=False)


@flax.struct.dataclass
class Hooks:
    """Everything a personalization adds to sampling; ``a + b`` applies both (in order)."""

    overrides: tuple[TokenOverride, ...] = ()
    transforms: tuple[ParamsTransform, ...] = ()

    def __add__(self, other: "Hooks") -> "Hooks":
        return Hooks(self.overrides + other.overrides, self.transforms + other.transforms)


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
        """The compiled program for ``key`` and the structure and shapes of ``args`` (compiled once)."""
        shapes = jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), args)
        full_key = key + (jax.tree_util.tree_structure(args), tuple(jax.tree_util.tree_leaves(shapes)))
        if full_key not in self._compiled:
            self._compiled[full_key] = jax.jit(self._build(*key)).lower(*args).compile()
        return self._compiled[full_key]

    def _build(self, sampler_name: str, num_steps: int) -> Callable:
        model = self.model
        sampler = schedulers.make_sampler(model.scheduler, sampler_name, num_steps)

        def run(params, cond_ids, uncond_ids, latents, guidance, hooks):
            self.traces += 1
            for transform in hooks.transforms:
                params = transform.fn(params, transform.state)
            ids = jnp.concatenate([uncond_ids, cond_ids])

            def text_context(timestep):
                overrides = tuple((o.token_id, o.vector(params, timestep)) for o in hooks.overrides)
                return conditioning.encode_text(model.text, params["text"], ids, overrides)

            per_step = any(o.at_timestep is not None for o in hooks.overrides)
            static_context = None if per_step else text_context(sampler.timesteps[0])
            x = latents.astype(jnp.float32) * sampler.init_noise_sigma

            def body(i, carry):
                x, state = carry
                context = static_context if static_context is not None else text_context(sampler.timesteps[i])
                x_in = sampler.scale_model_input(state, x, i)
                out = model.unet.apply({"params": params["unet"]},
                                       jnp.concatenate([x_in, x_in]).astype(model.unet.dtype),
                                       sampler.timesteps[i], context).astype(jnp.float32)
                uncond, cond = jnp.split(out, 2)
                return sampler.step(state, uncond + guidance * (cond - uncond), i, x)

            x, _ = jax.lax.fori_loop(0, sampler.num_steps, body, (x, sampler.init_state(x)))
            images = decode_latents(params["vae"], model.vae, x).astype(jnp.float32)
            return (images + 1) / 2, jnp.isfinite(x).all(axis=(1, 2, 3))

        return run

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        f = self.model.downsample_factor
        return batch, height // f, width // f, self.model.latent_channels

    def _prepare(self, params: PyTree, cond_ids: np.ndarray, uncond_ids: np.ndarray, *, seed: int = 0,
                 latents: np.ndarray | None = None, height: int | None = None, width: int | None = None,
                 num_steps: int = 25, guidance: float = 7.5, sampler: str = "ddim",
                 hooks: Hooks = Hooks()) -> tuple[Any, tuple]:
        """Validates and places the inputs; returns the compiled program and its arguments.

        Args:
          params: ``{"unet", "vae", "text"}``.
          cond_ids, uncond_ids: ``[B, 77]`` int32 token ids of the prompts and the
            negative prompts.
          seed: initial noise seed (ignored when ``latents`` is given).
          latents: optional ``[B, h, w, C]`` initial noise (before ``init_noise_sigma``).
          height, width: image size in pixels (multiples of the VAE factor, 8 for SD);
            default: :attr:`StableDiffusion.image_size`.
          num_steps, guidance, sampler: denoising steps, classifier-free guidance scale,
            ``ddim`` / ``euler`` / ``dpmpp``.
          hooks: token-embedding overrides and params transforms (e.g. personalized
            concepts whose placeholders appear in the prompts).
        """
        if sampler not in SAMPLER_ALIASES:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(set(SAMPLER_ALIASES) - {'dpm++2m'})}")
        f = self.model.downsample_factor
        height, width = height or self.model.image_size, width or self.model.image_size
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
        hooks = jax.tree.map(jnp.asarray, hooks)
        mesh = _mesh()
        data = NamedSharding(mesh, PartitionSpec("data") if batch % mesh.size == 0 else PartitionSpec())
        cond_ids, uncond_ids, latents = jax.device_put((jnp.asarray(cond_ids, jnp.int32),
                                                        jnp.asarray(uncond_ids, jnp.int32),
                                                        jnp.asarray(latents, jnp.float32)), data)
        args = (params, cond_ids, uncond_ids, latents, jnp.float32(guidance), hooks)
        return self._executable((SAMPLER_ALIASES[sampler], num_steps), args), args

    def compile(self, params: PyTree, cond_ids: np.ndarray, uncond_ids: np.ndarray, **kwargs) -> jax.stages.Compiled:
        """Compiles (without running) the program that ``__call__`` with these arguments runs.

        Returns it, e.g. for its ``memory_analysis()``.
        """
        return self._prepare(params, cond_ids, uncond_ids, **kwargs)[0]

    def __call__(self, params: PyTree, cond_ids: np.ndarray, uncond_ids: np.ndarray, **kwargs) -> np.ndarray:
        """Samples images; arguments as :meth:`_prepare`.

        Returns:
          ``[B, H, W, 3]`` float32 images in [0, 1].

        Raises:
          UserError: the final latents or the images hold NaN or infinite values (they
            would be written as black images).
        """
        program, args = self._prepare(params, cond_ids, uncond_ids, **kwargs)
        images, finite_latents = jax.device_get(program(*args))
        finite = finite_latents & np.isfinite(images).all(axis=(1, 2, 3))
        if not finite.all():
            raise UserError(f"sampling produced NaN or infinite values in {np.sum(~finite)} of {len(finite)} images "
                            "(nothing was written); try a lower guidance scale, another sampler, or float32 "
                            "(--dtype float32)")
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


def output_files(out: str | os.PathLike, count: int) -> list[Path]:
    """What :func:`save_images` writes for ``count`` images: ``000.png``..., ``grid.png``, ``prompts.txt``."""
    out = Path(out)
    return [out / f"{i:03d}.png" for i in range(count)] + [out / "grid.png", out / "prompts.txt"]


def save_images(images_uint8: np.ndarray, prompts: list[str], out: str | os.PathLike) -> list[Path]:
    """Writes :func:`output_files` into ``out``, each one atomically (:func:`e4t_jax.files.atomic_path`:
    a crash leaves an old file or a new one, never a partial one); returns the image paths."""
    *paths, grid, prompts_file = output_files(out, len(images_uint8))
    for path, image in zip(paths, images_uint8):
        files.save_image(image, path)
    files.save_image(image_grid(images_uint8), grid)
    with files.atomic_path(prompts_file) as tmp:
        tmp.write_text("".join(f"{p.name}\t{prompt}\n" for p, prompt in zip(paths, prompts)))
    return paths
