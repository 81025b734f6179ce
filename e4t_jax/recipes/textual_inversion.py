"""Textual Inversion (the paper's baseline) end to end: an image folder in, a concept file out.

:func:`learn` trains the placeholder's word embedding alone
(:mod:`e4t_jax.baselines.textual_inversion`) with the generic
:func:`e4t_jax.training.steps.train_step`, over random crops and flips of 1-N images and
the prompt templates of the init word's domain. :func:`learn_file` is what ``e4t-ti``
runs: it writes a concept without offsets (``e4t-generate --concept`` samples it) and
beside it the same vector as a diffusers textual-inversion file (:func:`embeds_path`).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

from e4t_jax import config as config_lib, files, pipeline
from e4t_jax.baselines import textual_inversion as ti
from e4t_jax.e4t import concept as concept_lib
from e4t_jax.e4t import export
from e4t_jax.e4t.config import E4TConfig, ModelConfig
from e4t_jax.errors import UserError
from e4t_jax.training import data, steps
from e4t_jax.training.config import OptimizerConfig, TrainConfig

log = logging.getLogger("e4t.textual_inversion")
#: ``e4t-ti``'s run: the paper trains ~5,000 steps; lr 5e-3 as bench/minidomain.py's TI.
DEFAULT_TRAIN = TrainConfig(steps=1000, batch_size=4, optimizer=OptimizerConfig(lr=5e-3))
EVAL_EXAMPLES = 8  # the fixed batch that loss before/after is measured on has at least this many examples


@dataclasses.dataclass(frozen=True)
class Learned:
    """The result of :func:`learn`.

    Attributes:
      embedding: ``[D]`` float32, the placeholder's learned word embedding.
      loss_before, loss_after: the loss on a fixed batch (center crops, fixed noise)
        before and after training.
      timings: seconds: ``compile``, ``train``.
    """

    embedding: np.ndarray
    loss_before: float
    loss_after: float
    timings: dict[str, float]


def learn(sd: pipeline.StableDiffusion, params: dict, token_id: int, word_id: int, images: Sequence[np.ndarray],
          prompt_ids: np.ndarray, train: TrainConfig = DEFAULT_TRAIN, *, progress: bool = True) -> Learned:
    """Learns the embedding at ``token_id``, starting from ``word_id``'s row.

    Args:
      sd, params: the frozen base model (``{"unet", "vae", "text"}``).
      token_id: the placeholder's id; ``word_id``: the init word's.
      images: uint8 ``[H, W, 3]`` each; every step's batch cycles through them, each
        example a random crop (0.8-1.0 of the short side) and flip.
      prompt_ids: int32 ``[T, 77]``, the templates with the placeholder; each example
        draws one.
      train: steps, batch size, seed and optimizer (AdamW over the one row).

    Raises:
      UserError: the loss became NaN or infinite.
    """
    from tqdm.auto import tqdm

    size, rng, count = sd.image_size, np.random.default_rng(train.seed), train.batch_size

    def next_batch(step: int) -> dict[str, np.ndarray]:
        which = (step * count + np.arange(count)) % len(images)
        return {"pixels": np.stack([data.augment(images[k], rng, size) for k in which]),
                "input_ids": prompt_ids[rng.integers(0, len(prompt_ids), count)],
                "index": np.arange(count, dtype=np.int32)}

    examples = max(EVAL_EXAMPLES, len(images))
    fixed = {"pixels": np.stack([data.center_crop_resize(images[i % len(images)], size) for i in range(examples)]),
             "input_ids": prompt_ids[np.arange(examples) % len(prompt_ids)],
             "index": np.arange(examples, dtype=np.int32)}
    optimizer = steps.make_optimizer(train.optimizer, train.steps)
    state = steps.TrainState.create(ti.init_params(params["text"], word_id), optimizer, jax.random.key(train.seed))
    loss_fn = functools.partial(ti.loss, sd=sd, token_id=token_id)
    timings, start = {}, time.perf_counter()
    batch, key = next_batch(0), jax.random.key(1)
    step, _ = steps.compile_single_device(loss_fn, optimizer, state, params, batch)
    # The fixed batch has its own shape (every image at least once), so its loss is its own program.
    evaluate = jax.jit(loss_fn).lower(state.params, params, fixed, key).compile()
    timings["compile"] = time.perf_counter() - start

    start = time.perf_counter()
    loss_before = float(evaluate(state.params, params, fixed, key)[0])
    bar = tqdm(range(train.steps), desc="textual inversion", unit="step", disable=not progress)
    for i in bar:
        state, metrics = step(state, params, batch)
        batch = next_batch(i + 1) if i + 1 < train.steps else None  # augment on the host while the step runs
        bar.set_postfix(loss=f"{float(metrics['loss']):.4f}")
    loss_after = float(evaluate(state.params, params, fixed, key)[0])
    timings["train"] = time.perf_counter() - start
    if not np.isfinite(loss_after):
        raise UserError("the textual-inversion loss became NaN/inf; lower --lr")
    return Learned(np.asarray(state.params["embedding"], np.float32), loss_before, loss_after, timings)


def embeds_path(concept_file: str | os.PathLike) -> Path:
    """The diffusers file beside a concept: ``cat.safetensors`` -> ``cat.learned_embeds.safetensors``."""
    return Path(concept_file).with_suffix(".learned_embeds.safetensors")


def _is_ours(path: Path, concept: bool) -> bool:
    """Whether ``path`` is a concept file (``concept``) or a ``{token: [1, D]}`` embedding file."""
    from safetensors import safe_open

    try:
        if concept:
            return bool(concept_lib.read_concept(path))
        with safe_open(str(path), framework="numpy") as f:
            names = list(f.keys())
            return len(names) == 1 and len(f.get_slice(names[0]).get_shape()) == 2
    except Exception:  # noqa: BLE001 - not a file, not safetensors, not a concept: all mean "not ours"
        return False


def _check_replaceable(outputs: Sequence[Path]) -> None:
    """With ``--force``: an existing output must be a file of the kind this program writes there."""
    for path, concept in zip(outputs, (True, False)):
        if path.exists() and not _is_ours(path, concept):
            kind = "a concept file" if concept else "a textual-inversion embedding file"
            raise UserError(f"{path} exists and is not {kind}; move it or choose another --out")


def _read_images(folder: str | os.PathLike) -> tuple[list[Path], list[np.ndarray]]:
    paths = data.list_images(folder)
    try:
        return paths, [data.read_image(path) for path in paths]
    except data.UnreadableImage as error:
        raise UserError(f"{error}; remove it from {folder}") from error


def learn_file(model: str | os.PathLike, folder: str | os.PathLike, out: str | os.PathLike, *, init_word: str,
               placeholder: str = "S*", train: TrainConfig = DEFAULT_TRAIN, variant: str | None = None,
               force: bool = False) -> dict[str, float]:
    """Image folder -> concept file ``out`` + diffusers embedding (:func:`embeds_path`), logging progress.

    Args:
      model: the base model (folder, Hub id or preset name).
      folder: 1-N images of the concept (:func:`e4t_jax.training.data.list_images`).
      out: the concept file (``.safetensors``).
      init_word: one token whose embedding the placeholder starts from; its domain's
        prompt templates are used (:func:`e4t_jax.training.data.templates_for_domain`).
      placeholder: the new token (``S*``).
      train: as :func:`learn`.
      force: replace outputs written before (never an input, nor a foreign file).

    Returns:
      Seconds per phase: ``load``, ``compile``, ``train``, ``total``.

    Raises:
      UserError, FileNotFoundError: bad inputs or outputs, before anything is written.
    """
    out = Path(out)
    outputs = [out, embeds_path(out)]
    files.check_outputs(outputs, inputs=[folder, model], force=force)
    _check_replaceable(outputs)
    paths, images = _read_images(folder)
    timings, start = {}, time.perf_counter()
    sd, params, tokenizer = pipeline.load_model(model, variant=variant)
    try:
        token_id, word_id = tokenizer.add_placeholder(placeholder, init_word)
    except ValueError as error:
        raise UserError(str(error)) from error
    templates = data.templates_for_domain(init_word)
    prompt_ids = tokenizer.encode([t.format(placeholder) for t in templates])
    timings["load"] = time.perf_counter() - start
    log.info("textual inversion of %s (from %r) on %d image%s of %s: %d steps x %d at lr %g", placeholder,
             init_word, len(images), "" if len(images) == 1 else "s", folder, train.steps, train.batch_size,
             train.optimizer.lr)

    result = learn(sd, params, token_id, word_id, images, prompt_ids, train)
    timings.update(result.timings)
    log.info("loss on a fixed batch and noise: %.5f -> %.5f", result.loss_before, result.loss_after)
    config = E4TConfig(model=ModelConfig(base=str(model), domain_word=init_word, placeholder=placeholder))
    run = {"method": "textual_inversion", "images": [p.name for p in paths], "train": config_lib.to_dict(train),
           "seconds": {k: round(v, 3) for k, v in result.timings.items()},
           "loss_before": result.loss_before, "loss_after": result.loss_after}
    concept_lib.save_concept(out, embedding=result.embedding, config=config, sd=sd, run=run)
    export.save_embedding(outputs[1], placeholder, result.embedding)
    log.info("wrote %s (%.1f KiB) and %s (%d B, for diffusers' load_textual_inversion)", out,
             out.stat().st_size / 1024, outputs[1], outputs[1].stat().st_size)
    timings["total"] = sum(timings.values())
    log.info("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    return timings
