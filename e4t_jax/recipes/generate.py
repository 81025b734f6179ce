"""Generation with concept files: prompts in, image files out (what ``e4t-generate`` runs)."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from e4t_jax import files, pipeline
from e4t_jax.e4t import concept as concept_lib
from e4t_jax.e4t.pretrained import encoder_fingerprint, encoder_folder, expected_identity, read_config
from e4t_jax.errors import UserError
from e4t_jax.tokenizer import Tokenizer

log = logging.getLogger("e4t.generate")


def domain_head(encoder: str | os.PathLike, concept: concept_lib.Concept, sd: pipeline.StableDiffusion) -> dict:
    """The head params of the domain encoder folder ``encoder``, which must be the one ``concept`` came from.

    Raises:
      UserError: ``encoder`` is not an encoder for ``sd``, or its fingerprint is not the concept's.
    """
    folder = encoder_folder(encoder)
    config, _ = read_config(folder)
    try:
        head, offsets, _ = files.load_encoder(folder, expected=expected_identity(sd))
    except ValueError as error:
        raise UserError(str(error)) from error
    fingerprint = encoder_fingerprint(config, offsets)
    if fingerprint != concept.fingerprint:
        raise UserError(f"--encoder {encoder} (fingerprint {fingerprint[:12]}) is not the domain encoder that "
                        f"{concept.name} came from ({concept.fingerprint[:12]}); pass that one to --reencode")
    return head


def concept_hooks(concepts: Sequence[concept_lib.Concept], sd: pipeline.StableDiffusion, params: dict,
                  tokenizer: Tokenizer, *, reencode: bool = False, encoder: str | os.PathLike | None = None,
                  seed: int = 0) -> pipeline.Hooks:
    """The sampling hooks of loaded concepts: their token overrides in order, and one
    params transform for all their offsets (:func:`e4t_jax.e4t.concept.offsets_hooks`).

    Args:
      reencode: re-encode each concept image at every denoising step, with the
        concept's own tuned head, else the head of the domain encoder ``encoder``.

    Raises:
      ConceptError: the concepts come from different domain encoders.
    """
    if not reencode:
        return concept_lib.sampling_hooks(concepts)
    overrides = []
    for concept in concepts:
        head = concept.head
        if head is None:
            if encoder is None:
                raise UserError(f"--reencode: {concept.placeholder}'s concept holds no tuned encoder head "
                                "(personalize with --save-encoder) and no --encoder was given")
            head = domain_head(encoder, concept, sd)
        overrides.append(concept_lib.reencoding_override(concept, sd, params["text"], tokenizer, head_params=head,
                                                         seed=seed))
    return pipeline.Hooks(overrides=tuple(overrides)) + concept_lib.offsets_hooks(concepts)


def read_latents(path: str | os.PathLike, shape: tuple[int, int, int, int]) -> np.ndarray:
    """Initial noise from a ``.npy``, in diffusers' ``[B, C, h, w]`` layout (or ``[B, h, w, C]``),
    told apart by where the model's latent channel count is; returned as ``[B, h, w, C]``.

    Args:
      shape: the ``[B, h, w, C]`` that sampling needs.

    Raises:
      UserError: not a .npy array, a shape that fits neither layout or both (``h == w == C``),
        or values that are not finite.
    """
    b, h, w, c = shape
    try:
        latents = np.load(path)
    except (OSError, ValueError) as error:
        raise UserError(f"--init-latents {path} is not a .npy array file ({error})") from error
    channels_first, channels_last = latents.shape == (b, c, h, w), latents.shape == (b, h, w, c)
    if channels_first and channels_last:
        raise UserError(f"--init-latents {path} has shape {latents.shape}: with {h}x{w} latents and {c} channels "
                        "[B, C, h, w] and [B, h, w, C] look alike; choose another --height/--width")
    if not (channels_first or channels_last):
        raise UserError(f"--init-latents {path} has shape {latents.shape}; this run needs [B, C, h, w] = "
                        f"{(b, c, h, w)} (B = prompts x --num-images, C = the model's latent channels, "
                        "h, w = the image size / 8)")
    if not np.isfinite(latents).all():
        raise UserError(f"--init-latents {path} holds NaN or infinite values")
    return latents.transpose(0, 2, 3, 1) if channels_first else latents


def check_out(out: Path, count: int, inputs: Sequence[str | os.PathLike | None], force: bool) -> None:
    """Refuses an ``out`` that is a file, or (without ``force``) one that holds any file about to be written."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; e4t-generate writes a folder of images: choose another --out")
    files.check_outputs(pipeline.output_files(out, count), inputs=inputs, force=force)


def generate_files(model: str | os.PathLike, prompts: Sequence[str], out: str | os.PathLike, *,
                   concepts: Sequence[str | os.PathLike] = (), negative_prompt: str = "", num_images: int = 1,
                   init_latents: str | os.PathLike | None = None, reencode: bool = False,
                   encoder: str | os.PathLike | None = None, dtype: str = "float32", seed: int = 0,
                   variant: str | None = None, force: bool = False, **sampling) -> list[Path]:
    """Samples ``num_images`` per prompt and writes them (:func:`e4t_jax.pipeline.save_images`).

    Args:
      model: the base model; ``concepts``: concept files for it, of one domain encoder
        (each prompt must name at least one of their placeholders).
      out: the output folder.
      init_latents: a ``.npy`` of initial noise (:func:`read_latents`).
      seed: the initial noise (without ``init_latents``) and the re-encoding noise.
      variant: the model's weight files (``fp16``; :func:`e4t_jax.pipeline.load_model`).
      force: replace images, ``grid.png`` and ``prompts.txt`` that ``out`` already holds.
      sampling: ``num_steps``, ``guidance``, ``sampler``, ``height``, ``width`` of
        :class:`e4t_jax.pipeline.Generator` (its defaults when not given).
      Others: as :func:`concept_hooks`.

    Returns:
      The image paths.

    Raises:
      UserError, FileNotFoundError: bad inputs or outputs (one line says what is wrong);
        ``out`` is checked before any model is loaded.
    """
    prompts = [p for p in prompts for _ in range(num_images)]
    out = Path(out)
    check_out(out, len(prompts), [*concepts, init_latents, encoder, model], force)
    timings, start = {}, time.perf_counter()
    sd, params, tokenizer = pipeline.load_model(model, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(dtype),
                                                variant=variant)
    loaded = concept_lib.load_concepts(concepts, sd, tokenizer)
    placeholders = [c.placeholder for c in loaded]
    try:
        for prompt in prompts:  # each prompt must name at least one of the concepts
            if placeholders and not any(token in prompt for token in placeholders):
                tokenizer.require_placeholder([prompt], " or ".join(placeholders))
    except ValueError as error:
        raise UserError(str(error)) from error
    hooks = concept_hooks(loaded, sd, params, tokenizer, reencode=reencode, encoder=encoder, seed=seed)
    timings["load"] = time.perf_counter() - start

    cond = tokenizer.encode(prompts)
    uncond = tokenizer.encode([negative_prompt] * len(prompts))
    generator = pipeline.Generator(sd)
    if init_latents is not None:
        size = [sampling.get(side) or sd.image_size for side in ("height", "width")]
        init_latents = read_latents(init_latents, generator.latent_shape(len(prompts), *size))
    kwargs = dict(seed=seed, latents=init_latents, hooks=hooks, **sampling)
    try:
        start = time.perf_counter()
        generator.compile(params, cond, uncond, **kwargs)
        timings["compile"] = time.perf_counter() - start
        start = time.perf_counter()
        images = generator(params, cond, uncond, **kwargs)
        timings["sample"] = time.perf_counter() - start
    except ValueError as error:
        raise UserError(str(error)) from error
    paths = pipeline.save_images(pipeline.to_uint8(images), prompts, out)
    log.info("wrote %d image%s and %s", len(paths), "" if len(paths) == 1 else "s", out / "grid.png")
    log.info("timings: " + ", ".join(f"{k} {v:.2f}s" for k, v in timings.items())
             + f" ({len(images) / timings['sample']:.2f} images/s)")
    return paths
