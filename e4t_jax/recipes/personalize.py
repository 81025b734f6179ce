"""Personalization: tune E4T on ONE image for a few steps, then write the concept file.

:func:`personalize` is the method's second stage as a function: the encoder head and
the weight offsets (or the offsets only) trained by the generic
:func:`e4t_jax.training.steps.train_step` on E4T's loss, over augmented copies of the
image; then ``v*`` predicted from the clean image. :func:`personalize_file` is what
``e4t-personalize`` and ``e4t-demo`` run: files in, a concept file and a preview out.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from e4t_jax import files, pipeline
from e4t_jax.e4t import concept as concept_lib
from e4t_jax.e4t import model as model_lib
from e4t_jax.e4t.pretrained import default_encoder, encoder_fingerprint, encoder_folder, load_pretrained, read_config
from e4t_jax.errors import UserError
from e4t_jax.eval import faces
from e4t_jax.training import data, steps
from e4t_jax.training.config import OptimizerConfig, TrainConfig

log = logging.getLogger("e4t.personalize")
#: ``mask_path`` value (``e4t-personalize --mask auto``) that computes a face mask from the image
#: (:func:`e4t_jax.eval.faces.face_mask`) instead of reading a file; ``./auto`` reads a file named auto.
AUTO_MASK = "auto"
DEFAULT_PREVIEW = ("a photo of {}", "an oil painting of {}", "a watercolor painting of {}", "a pencil sketch of {}")


@dataclasses.dataclass(frozen=True)
class Personalized:
    """The result of :func:`personalize`.

    Attributes:
      params: the tuned head and offsets (the head as loaded when it was held fixed).
      embedding: ``[D]`` float32 ``v*`` of the clean image.
      image: ``{"layers": [T, Dv], "latents": [h, w, c]}`` float32 of the clean image.
      loss_before, loss_after: the loss on the first batch with fixed noise, before and
        after tuning.
      train: the run's :class:`e4t_jax.training.TrainConfig`.
      tune_encoder: whether the head was tuned.
      timings: seconds: ``compile``, ``tune``.
    """

    params: model_lib.E4TParams
    embedding: np.ndarray
    image: dict[str, np.ndarray]
    loss_before: float
    loss_after: float
    train: TrainConfig
    tune_encoder: bool
    timings: dict[str, float]


def default_train(e: model_lib.E4T, steps_count: int | None = None, batch_size: int | None = None,
                  lr: float | None = None, seed: int = 0) -> TrainConfig:
    """The tuning run that the encoder records for its domain (``e.config.personalize``),
    with any of its values replaced."""
    recorded = e.config.personalize
    return TrainConfig(steps=steps_count or recorded.steps, batch_size=batch_size or recorded.batch_size,
                       seed=seed, optimizer=OptimizerConfig(lr=lr or recorded.lr))


def check_grad_accum(copies: int, grad_accum: int) -> None:
    """A :class:`UserError` unless a batch of ``copies`` splits into ``grad_accum`` micro-batches."""
    if grad_accum < 1 or copies % grad_accum:
        raise UserError(f"the batch of {copies} copies is not a multiple of --grad-accum {grad_accum}; "
                        "pass a --batch-size that is")


def personalize(e: model_lib.E4T, image: np.ndarray, train: TrainConfig | None = None, *,
                tune_encoder: bool = True, mask: np.ndarray | None = None, grad_accum: int = 1,
                progress: bool = True) -> Personalized:
    """Tunes ``e`` on one image.

    Augmentation (crops, flips) and prompt templates are the encoder's recorded ones
    (``e.config.personalize``).

    Args:
      e: E4T with a pre-trained domain encoder.
      image: uint8 ``[H, W, 3]``.
      train: steps, batch size (augmented copies per step), seed and optimizer; None:
        :func:`default_train`.
      tune_encoder: tune the head too, or the weight offsets only.
      mask: optional uint8 ``[H, W, 3]`` loss mask (white = the concept).
      grad_accum: run each step's batch as this many micro-batches, one after the
        other (the same update, the activations of one micro-batch).
      progress: show a progress bar.

    Raises:
      UserError: the loss became NaN or infinite, or the batch size is not a multiple
        of ``grad_accum``.
    """
    from tqdm.auto import tqdm

    train = train or default_train(e)
    check_grad_accum(train.batch_size, grad_accum)
    size, rng = e.sd.image_size, np.random.default_rng(train.seed)
    config, recorded = e.config.model, e.config.personalize
    templates = (data.load_templates(recorded.templates) if recorded.templates
                 else data.templates_for_domain(config.domain_word))
    input_ids = e.tokenizer.encode(data.prompts_for(templates, config.placeholder, train.batch_size))
    trainable, frozen = e.split(tune_encoder)
    optimizer = steps.make_optimizer(train.optimizer, train.steps)
    trainable = jax.tree.map(jnp.array, trainable)  # a copy: the step donates the state, ``e`` keeps its params
    state = steps.TrainState.create(trainable, optimizer, jax.random.PRNGKey(train.seed))
    frozen = jax.device_put(frozen)

    def next_batch():
        return {**data.augmented_batch(image, size=size, batch_size=train.batch_size, rng=rng, mask=mask,
                                       crop_scale=recorded.crop_scale, flip=recorded.flip),
                "input_ids": input_ids}

    timings, start = {}, time.perf_counter()
    first = next_batch()
    loss_fn = functools.partial(model_lib.loss, model=e.model)
    step, evaluate = steps.compile_single_device(loss_fn, optimizer, state, frozen, first, grad_accum=grad_accum)
    timings["compile"] = time.perf_counter() - start

    start = time.perf_counter()
    bar = tqdm(range(train.steps), desc="personalizing", unit="step", disable=not progress)
    batch = first
    for i in bar:
        state, metrics = step(state, frozen, batch)
        batch = next_batch() if i + 1 < train.steps else None  # augment on the host while the step runs
        bar.set_postfix(loss=f"{float(metrics['loss']):.4f}")
        if i == 0:  # the first batch with the noise of step 0: what ``evaluate`` measures after
            loss_before = float(metrics["loss"])
    loss_after = float(evaluate(state, frozen, first)["loss"])
    timings["tune"] = time.perf_counter() - start
    if not np.isfinite(loss_after):
        raise UserError("the tuning loss became NaN/inf; lower --lr")

    tuned = state.params.merge(frozen.fixed)
    clean = jnp.asarray(data.center_crop_resize(image, size))[None]
    embedding = jax.jit(functools.partial(model_lib.embed_image, e.model))(tuned, frozen, clean)[0]
    features = jax.jit(functools.partial(model_lib.image_features, e.model))(frozen, clean)
    return Personalized(params=tuned, embedding=np.asarray(embedding, np.float32),
                        image={k: np.asarray(v[0], np.float32) for k, v in features.items()},
                        loss_before=loss_before, loss_after=loss_after, train=train, tune_encoder=tune_encoder,
                        timings=timings)


def tuned_concept(e: model_lib.E4T, result: Personalized) -> concept_lib.Concept:
    """The tuned concept, as if loaded from its file (for sampling right away, or re-encoding):
    ``e``'s offsets as the domain's, and the change that tuning made to them."""
    domain = jax.device_get(e.params.offsets)
    return concept_lib.Concept(e.config.model.placeholder, e.model.placeholder_id, result.embedding, e.config,
                               domain=domain, delta=concept_lib.offsets_change(result.params.offsets, domain),
                               image=result.image)


def save(path: str | os.PathLike, e: model_lib.E4T, result: Personalized, *, save_encoder: bool = False,
         run: dict[str, Any] | None = None) -> Path:
    """Writes the concept file (:func:`e4t_jax.e4t.concept.save_concept`): ``e``'s offsets as the
    domain offsets and the tuned ones' change of them.

    Args:
      save_encoder: also store the tuned head (only when it was tuned).
      run: more facts for the header's ``run`` (e.g. the image's file name).
    """
    concept = tuned_concept(e, result)
    facts = {"steps": result.train.steps, "lr": result.train.optimizer.lr, "loss_before": result.loss_before,
             "loss_after": result.loss_after, **(run or {})}
    head = jax.device_get(result.params.head) if save_encoder and result.tune_encoder else None
    return concept_lib.save_concept(path, embedding=concept.embedding, config=concept.config, sd=e.sd,
                                    domain=concept.domain, delta=concept.delta, head=head, image=concept.image,
                                    run=facts)


def preview(e: model_lib.E4T, result: Personalized, image: np.ndarray, prompts: Sequence[str], *,
            steps_count: int = 25, seed: int = 0) -> np.ndarray:
    """A uint8 grid: the input image, then one sample per prompt (with the placeholder)."""
    generator = pipeline.Generator(e.sd)
    images = generator(e.frozen.base, e.tokenizer.encode(prompts), e.tokenizer.encode([""] * len(prompts)),
                       seed=seed, num_steps=steps_count, hooks=tuned_concept(e, result).hooks())
    photo = (data.center_crop_resize(image, e.sd.image_size)[None] + 1) / 2
    return pipeline.image_grid(pipeline.to_uint8(np.concatenate([photo, images])))


def preview_path(concept_file: str | os.PathLike) -> Path:
    """Where the preview grid of a concept file goes: ``me.safetensors`` -> ``me.preview.png``."""
    return Path(concept_file).with_suffix(".preview.png")


def personalize_file(model: str, encoder: str | os.PathLike | None, image_path: str | os.PathLike,
                     out: str | os.PathLike, *, steps_count: int | None = None, batch_size: int | None = None,
                     lr: float | None = None, seed: int = 0,
                     tune_encoder: bool = True, save_encoder: bool = False, mask_path: str | os.PathLike | None = None,
                     placeholder: str | None = None, vision_source: str | None = None,
                     preview_prompts: Sequence[str] | None = None, preview_steps: int | None = None,
                     dtype: str = "float32", variant: str | None = None, grad_accum: int = 1, remat: bool = False,
                     force: bool = False) -> dict[str, float]:
    """Image file -> concept file (+ a preview grid, :func:`preview_path`), logging progress.

    Args:
      model: the base model; ``encoder``: its pre-trained domain encoder (folder, or the
        run folder of ``e4t-pretrain``; None: the one shipped with a trained preset).
      image_path, mask_path: the concept image and an optional loss mask: an image file of
        the same size (white = the concept), or :data:`AUTO_MASK` (``"auto"``) for the face
        mask that :func:`e4t_jax.eval.faces.face_mask` computes from the image (needs the
        ``faces`` extra, dlib).
      out: the concept file to write (``.safetensors``).
      preview_prompts: templates with ``{}`` for the placeholder (None: :data:`DEFAULT_PREVIEW`;
        empty: no preview); ``preview_steps``: their denoising steps (None: :func:`preview`'s).
      grad_accum, remat: less memory for the same update: micro-batches per step
        (:func:`personalize`), and U-Net blocks recomputed in the backward pass.
      force: replace an existing concept file and preview (never an input).
      Others: as :func:`personalize` and :func:`e4t_jax.e4t.pretrained.load_pretrained`.

    Returns:
      Seconds per phase: ``load``, ``compile``, ``tune``, ``preview`` (if any), ``total``.

    Raises:
      UserError, FileNotFoundError: bad inputs or outputs, before any model is loaded
        (one line says what is wrong): among them a mask whose size is not the image's,
        and, with ``mask_path="auto"``, an image without a detectable face or no dlib.
    """
    out = Path(out)
    auto_mask = mask_path is not None and str(mask_path) == AUTO_MASK
    templates = DEFAULT_PREVIEW if preview_prompts is None else preview_prompts
    outputs = [out] + ([preview_path(out)] if templates else [])
    files.check_outputs(outputs, inputs=[image_path, None if auto_mask else mask_path, encoder, model], force=force)
    encoder = encoder_folder(encoder) if encoder is not None else default_encoder(model)
    if encoder is None:
        raise UserError(f"--model {model} has no shipped encoder: pass --encoder (a run folder of e4t-pretrain)")
    check_grad_accum(batch_size or read_config(encoder)[0].personalize.batch_size, grad_accum)
    try:
        image = data.read_image(image_path)
        mask = data.read_image(mask_path) if mask_path is not None and not auto_mask else None
    except ValueError as error:
        raise UserError(str(error)) from error
    if auto_mask:
        mask = faces.face_mask(image, what=str(image_path))
        log.info("face mask (--mask auto): %.1f%% of the image", 100.0 * float(np.mean(mask[..., 0] > 0)))
    elif mask is not None and mask.shape[:2] != image.shape[:2]:
        raise UserError(f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} pixels but image {image_path} is "
                        f"{image.shape[1]}x{image.shape[0]}: a mask must have its image's size")
    timings, start = {}, time.perf_counter()
    e = load_pretrained(model, encoder, vision_source=vision_source, placeholder=placeholder, dtype=jnp.dtype(dtype),
                        remat=remat, variant=variant)
    token = e.config.model.placeholder
    previews = [p.format(token) for p in templates]
    try:
        e.tokenizer.require_placeholder(previews, token)
    except ValueError as error:
        raise UserError(str(error)) from error
    log.info("%s; tuning %s", e.describe(), "encoder head + offsets" if tune_encoder else "offsets only")
    log.info("domain encoder %s, fingerprint %s", encoder, encoder_fingerprint(e.config, e.params.offsets)[:12])
    timings["load"] = time.perf_counter() - start

    train = default_train(e, steps_count, batch_size, lr, seed)
    log.info("tuning %d steps x %d copies at lr %g", train.steps, train.batch_size, train.optimizer.lr)
    result = personalize(e, image, train, tune_encoder=tune_encoder, mask=mask, grad_accum=grad_accum)
    timings.update(result.timings)
    log.info("tuning loss on a fixed batch and noise: %.5f -> %.5f", result.loss_before, result.loss_after)
    save(out, e, result, save_encoder=save_encoder, run={"image": Path(image_path).name})
    log.info("wrote %s (%.1f KiB)", out, out.stat().st_size / 1024)
    if previews:
        start = time.perf_counter()
        steps_count = {} if preview_steps is None else {"steps_count": preview_steps}
        grid = preview(e, result, image, previews, seed=train.seed, **steps_count)
        files.save_image(grid, preview_path(out))
        timings["preview"] = time.perf_counter() - start
        log.info("preview grid (input image first): %s", preview_path(out))
    timings["total"] = sum(timings.values())
    log.info("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    return timings
