"""DreamBooth and TI+DreamBooth runs: image folder in, a diffusers-format model folder out.

:func:`dreambooth_files` is what ``e4t-dreambooth`` runs: it reads the instance images,
generates (or reuses) the class images of the prior-preservation loss with our own
:class:`e4t_jax.pipeline.Generator`, trains the :mod:`e4t_jax.baselines.dreambooth`
objective with the generic :func:`e4t_jax.training.steps.train_step`, and writes ``OUT``
(atomically) as a full Stable Diffusion folder that ``--model`` and diffusers load:

* ``unet/``: the fine-tuned U-Net (with ``lora_rank``: the base U-Net with the offsets
  merged), diffusers naming, float32, with the base model's ``config.json``;
* ``text_encoder/``: the fine-tuned text encoder (``train_text``), else the base one;
* every other component of the base model (``model_index.json``, ``vae/``,
  ``tokenizer/``, ``scheduler/``, ...), copied;
* with ``lora_rank``: ``lora.safetensors``, the low-rank offsets alone (a few MB for SD
  1.5): ``offsets.apply_offsets(unet, weights.load_pytree(file), "lowrank")`` on the
  base U-Net gives ``unet/`` again;
* with ``textual_inversion``: ``learned_embeds.safetensors`` (diffusers'
  ``load_textual_inversion`` format) and ``concept.safetensors`` (for
  ``e4t-generate --model OUT --concept OUT/concept.safetensors``);
* ``dreambooth.json``: the run (base model, prompts, flags, losses, timings).

Class images are cached under ``$E4T_HOME/class-images/<key>`` (:func:`class_cache_dir`),
keyed by the model's identity, the prompt, the count, the seed, the sampling steps and
the dtype, so a second run with the same ones reuses them.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image

from e4t_jax import config as config_lib, files, pipeline, presets, weights
from e4t_jax.baselines import dreambooth as db
from e4t_jax.e4t import concept as concept_lib
from e4t_jax.e4t import export as export_lib
from e4t_jax.e4t.config import E4TConfig, ModelConfig
from e4t_jax.errors import UserError
from e4t_jax.training import data, steps
from e4t_jax.training.config import OptimizerConfig

log = logging.getLogger("e4t.dreambooth")
INFO_FILE = "dreambooth.json"
LORA_FILE = "lora.safetensors"
CONCEPT_FILE = "concept.safetensors"
TEXT_WEIGHTS = "model.safetensors"
CLASS_GUIDANCE = 7.5


@dataclasses.dataclass(frozen=True)
class DreamBoothConfig:
    """One run. Defaults follow diffusers' DreamBooth example, not numbers of the paper.

    Attributes:
      class_word: the concept's class noun ("dog"); ``placeholder``: its rare identifier.
      steps, batch_size, seed: optimizer steps, instance images per step (as many class
        images are added with prior preservation), the seed of data, noise and offsets.
      lr: learning rate of the U-Net / offsets / text encoder; None: 5e-6 (full) or 1e-4 (LoRA).
      prior_preservation, num_class_images, class_steps, prior_weight: the class loss,
        its images (generated with ``class_steps`` denoising steps) and its weight.
      train_text: also fine-tune the text encoder.
      textual_inversion: TI+DreamBooth: the placeholder is a new token whose embedding
        row (initialized from ``class_word``) is learned too, at ``embedding_lr``.
      lora_rank: 0 fine-tunes the whole U-Net; R > 0 trains rank-R offsets instead.
    """

    class_word: str
    placeholder: str = "S*"
    steps: int = 400
    batch_size: int = 1
    lr: float | None = None
    seed: int = 0
    prior_preservation: bool = False
    num_class_images: int = 100
    class_steps: int = 25
    prior_weight: float = 1.0
    train_text: bool = False
    textual_inversion: bool = False
    embedding_lr: float = 5e-4
    lora_rank: int = 0

    def __post_init__(self):
        if self.prior_preservation and self.num_class_images < 1:
            raise UserError("--prior-preservation needs class images: --num-class-images must be at least 1")
        if self.lora_rank and self.train_text:
            raise UserError("--lora-rank trains offsets of the U-Net only; drop --train-text-encoder (or --lora-rank)")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (1e-4 if self.lora_rank else 5e-6)

    @property
    def instance_prompt(self) -> str:
        return f"a photo of {self.placeholder} {self.class_word}"

    @property
    def class_prompt(self) -> str:
        return f"a photo of a {self.class_word}"


@dataclasses.dataclass(frozen=True)
class Trained:
    """The result of :func:`train`: the trained pytree (host arrays), the instance loss on the
    first batch with fixed noise before and after, and seconds per phase (``compile``, ``train``)."""

    params: dict
    loss_before: float
    loss_after: float
    timings: dict[str, float]


def read_images(folder: str | os.PathLike) -> list[np.ndarray]:
    """Every image of ``folder`` as uint8 ``[H, W, 3]``.

    Raises:
      UserError: no images, or one that is not a readable picture.
    """
    try:
        return [data.read_image(path) for path in data.list_images(folder)]
    except (FileNotFoundError, ValueError) as error:
        raise UserError(f"--data: {error}") from error


def _weight_stamps(folder: Path) -> list[tuple[str, int, int]]:
    """``(path, bytes, mtime_ns)`` of every weight file of the parts sampling reads: a cheap identity of the weights."""
    found = []
    for part in ("unet", "vae", "text_encoder"):
        for file in sorted((folder / part).glob("*.safetensors")):
            stat = file.stat()
            found.append((file.relative_to(folder).as_posix(), stat.st_size, stat.st_mtime_ns))
    return found


def class_cache_dir(sd: pipeline.StableDiffusion, prompt: str, count: int, *, seed: int, steps_count: int,
                    dtype: str) -> Path:
    """``$E4T_HOME/class-images/<sha256[:16]>`` of the model folder, its weight files (names,
    sizes, mtimes), the prompt, count, seed, sampling steps and dtype."""
    key = {"folder": str(sd.folder.resolve()), "weights": _weight_stamps(sd.folder), "prompt": prompt,
           "count": count, "seed": seed, "steps": steps_count, "dtype": dtype, "size": sd.image_size}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return presets.CACHE_ROOT / "class-images" / digest


def class_images(sd: pipeline.StableDiffusion, params: dict, tokenizer, prompt: str, count: int, *, seed: int,
                 steps_count: int, dtype: str, chunk: int = 4, progress: bool = True) -> list[np.ndarray]:
    """``count`` uint8 ``[H, W, 3]`` samples of ``prompt``, read from :func:`class_cache_dir` when there.

    Generated ``chunk`` at a time (chunk ``i`` from seed ``seed + i``), then written as
    one folder of PNGs, atomically: an interrupted run leaves no partial cache.
    """
    from tqdm.auto import tqdm

    folder = class_cache_dir(sd, prompt, count, seed=seed, steps_count=steps_count, dtype=dtype)
    names = [f"{i:05d}.png" for i in range(count)]
    if all((folder / name).is_file() for name in names):
        log.info("reusing %d class images of %r from %s", count, prompt, folder)
        return [data.read_image(folder / name) for name in names]
    chunk = min(chunk, count)
    generator, ids, empty = pipeline.Generator(sd), tokenizer.encode([prompt] * chunk), tokenizer.encode([""] * chunk)
    images = []
    for i in tqdm(range(-(-count // chunk)), desc="class images", unit="batch", disable=not progress):
        images.extend(pipeline.to_uint8(generator(params, ids, empty, seed=seed + i, num_steps=steps_count,
                                                  guidance=CLASS_GUIDANCE)))
    images = images[:count]
    with files.atomic_path(folder) as tmp:
        tmp.mkdir()
        for name, image in zip(names, images):
            Image.fromarray(image).save(tmp / name)
    log.info("wrote %d class images of %r to %s", count, prompt, folder)
    return images


def make_optimizer(config: DreamBoothConfig) -> optax.GradientTransformation:
    """AdamW (:func:`e4t_jax.training.steps.make_optimizer`) at ``learning_rate``; the
    placeholder's row, if learned, at ``embedding_lr``."""
    model = steps.make_optimizer(OptimizerConfig(lr=config.learning_rate), config.steps)
    if not config.textual_inversion:
        return model
    embedding = steps.make_optimizer(OptimizerConfig(lr=config.embedding_lr, weight_decay=0.0), config.steps)
    return optax.multi_transform(
        {"model": model, "embedding": embedding},
        lambda params: {k: jax.tree.map(lambda _: "embedding" if k == "embedding" else "model", v)
                        for k, v in params.items()})


def _sample_rows(images: Sequence[np.ndarray], count: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` random crops/flips of random picks of ``images``: float32 ``[count, size, size, 3]``."""
    return np.stack([data.augment(images[rng.integers(len(images))], rng, size) for _ in range(count)])


def train(sd: pipeline.StableDiffusion, base: dict, config: DreamBoothConfig, instance: Sequence[np.ndarray],
          classes: Sequence[np.ndarray], instance_ids: np.ndarray, class_ids: np.ndarray, *,
          token_id: int | None = None, init_token_id: int | None = None, compute_dtype: Any = jnp.float32,
          progress: bool = True) -> Trained:
    """Trains the DreamBooth objective.

    Args:
      sd, base: the model and its float32 ``{"unet", "vae", "text"}``; the frozen parts
        are cast to ``compute_dtype`` (bfloat16 halves their memory), the trained stay float32.
      instance, classes: uint8 ``[H, W, 3]`` images (``classes`` empty: no prior preservation).
      instance_ids, class_ids: int32 ``[77]`` ids of the instance and class prompts.
      token_id, init_token_id: with ``config.textual_inversion``, the placeholder's id and
        its class word's (whose row initializes the learned one).

    Raises:
      UserError: the loss became NaN or infinite.
    """
    from tqdm.auto import tqdm

    rng, size, b = np.random.default_rng(config.seed), sd.image_size, config.batch_size
    params = db.init_params(base, jax.random.key(config.seed), lora_rank=config.lora_rank,
                            train_text=config.train_text, init_token_id=init_token_id)
    frozen = jax.tree.map(lambda x: jnp.asarray(x, compute_dtype), db.frozen_params(base, params))
    optimizer = make_optimizer(config)
    state = steps.TrainState.create(params, optimizer, jax.random.key(config.seed))
    rows = b + (b if classes else 0)
    fixed = {"input_ids": np.stack([instance_ids] * b + [class_ids] * (rows - b)),
             "index": np.arange(rows, dtype=np.int32), "prior": np.arange(rows) >= b}

    def next_batch():
        pixels = [_sample_rows(instance, b, size, rng)] + ([_sample_rows(classes, b, size, rng)] if classes else [])
        return {"pixels": np.concatenate(pixels), **fixed}

    loss_fn = functools.partial(db.loss, sd=sd, token_id=token_id, prior_weight=config.prior_weight)
    timings, start = {}, time.perf_counter()
    first = next_batch()
    step, evaluate = steps.compile_single_device(loss_fn, optimizer, state, frozen, first)
    timings["compile"] = time.perf_counter() - start

    start = time.perf_counter()
    batch, bar = first, tqdm(range(config.steps), desc="dreambooth", unit="step", disable=not progress)
    for i in bar:
        state, metrics = step(state, frozen, batch)
        batch = next_batch() if i + 1 < config.steps else None  # augment on the host while the step runs
        bar.set_postfix(loss=f"{float(metrics['loss']):.4f}")
        if i == 0:  # the first batch with the noise of step 0: what ``evaluate`` measures after
            loss_before = float(metrics["instance_loss"])
    loss_after = float(evaluate(state, frozen, first)["instance_loss"])
    timings["train"] = time.perf_counter() - start
    if not np.isfinite(loss_after):
        raise UserError("the training loss became NaN/inf; lower --lr")
    return Trained(jax.device_get(state.params), loss_before, loss_after, timings)


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def save(out: Path, sd: pipeline.StableDiffusion, base: dict, config: DreamBoothConfig, trained: Trained,
         run: dict[str, Any]) -> None:
    """Writes ``out`` (layout in the module docstring), atomically; an old ``out`` is replaced only whole."""
    from safetensors.numpy import save_file

    params, folder = trained.params, sd.folder
    unet = jax.device_get(db.unet_params(params, base))
    copied = [c for c in export_lib.pipeline_components(folder) if not (c == "text_encoder" and "text" in params)]
    with files.atomic_path(out) as tmp:
        tmp.mkdir()
        for component in copied:
            shutil.copytree(folder / component, tmp / component)
        shutil.copy2(folder / "model_index.json", tmp / "model_index.json")
        float32 = functools.partial(jax.tree.map, lambda leaf: np.asarray(leaf, np.float32))
        weights.save_safetensors(float32(unet), tmp / "unet" / export_lib.UNET_WEIGHTS, metadata={"format": "pt"})
        shutil.copy2(folder / "unet" / "config.json", tmp / "unet" / "config.json")
        if "text" in params:
            weights.save_safetensors(float32(params["text"]), tmp / "text_encoder" / TEXT_WEIGHTS,
                                     prefix="text_model.", metadata={"format": "pt"})
            shutil.copy2(folder / "text_encoder" / "config.json", tmp / "text_encoder" / "config.json")
        if "lora" in params:
            weights.save_pytree(float32(params["lora"]), tmp / LORA_FILE)
        if "embedding" in params:
            embedding = np.asarray(params["embedding"], np.float32)
            save_file({config.placeholder: embedding.reshape(1, -1)}, str(tmp / export_lib.EMBEDDING_FILE))
            e4t_config = E4TConfig(model=ModelConfig(base=sd.model_id, domain_word=config.class_word,
                                                     placeholder=config.placeholder))
            concept_lib.save_concept(tmp / CONCEPT_FILE, embedding=embedding, config=e4t_config, sd=sd,
                                     run={"method": "ti+dreambooth", "model": str(out)})
        info = {"base_model": sd.model_id, "instance_prompt": config.instance_prompt,
                "class_prompt": config.class_prompt if config.prior_preservation else None,
                "config": config_lib.to_dict(config), "lr": config.learning_rate,
                "instance_loss_before": trained.loss_before, "instance_loss_after": trained.loss_after, **run}
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")


def check_out(out: Path, inputs: Sequence[str | os.PathLike | None], force: bool) -> None:
    """``out`` must be new or empty, or (with ``force``) a folder that e4t-dreambooth wrote.

    Raises:
      UserError: it is a file, overlaps an input, holds what this program did not write
        there, or holds a model and ``force`` is not given.
    """
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; e4t-dreambooth writes a model folder: choose another --out")
    files.check_outputs([out], inputs=inputs, force=True)
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not (out / INFO_FILE).is_file():
        raise UserError(f"--out {out} exists and is not a folder that e4t-dreambooth wrote; choose another --out")
    if not force:
        raise UserError(f"--out {out} already holds a DreamBooth model; pass --force to replace it, "
                        "or choose another --out")


def dreambooth_files(model: str, data_folder: str | os.PathLike, out: str | os.PathLike, config: DreamBoothConfig, *,
                     remat: bool = False, dtype: str = "float32", variant: str | None = None,
                     force: bool = False) -> dict[str, float]:
    """Image folder -> model folder (the module docstring), logging progress, timings and sizes.

    Args:
      model: the base model (folder, Hub id or preset).
      data_folder: 1-N images of the concept.
      out: the model folder to write.
      remat: rematerialize U-Net blocks in the backward pass (less memory).
      dtype: compute dtype, and the storage dtype of the frozen parts.
      variant: the base model's weight files (``fp16``).
      force: replace an earlier output of this program.

    Returns:
      Seconds per phase: ``load``, ``class_images`` (with prior preservation),
      ``compile``, ``train``, ``save``, ``total``.

    Raises:
      UserError, FileNotFoundError: bad inputs or outputs, before any model is loaded.
    """
    out = Path(out)
    check_out(out, [data_folder, model], force)
    instance = read_images(data_folder)
    folder = pipeline.resolve(model, variant)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{folder} has no model_index.json: e4t-dreambooth writes a diffusers "
                                "StableDiffusionPipeline folder and needs one to copy")
    timings, start = {}, time.perf_counter()
    sd, base, tokenizer = pipeline.load_model(model, dtype=jnp.dtype(dtype), remat=remat, variant=variant)
    token_id = init_token_id = None
    if config.textual_inversion:
        try:
            token_id, init_token_id = tokenizer.add_placeholder(config.placeholder, config.class_word)
        except ValueError as error:
            raise UserError(str(error)) from error
    instance_ids, class_ids = tokenizer.encode([config.instance_prompt, config.class_prompt])
    timings["load"] = time.perf_counter() - start
    log.info("%d instance image%s, prompt %r; training %s%s%s", len(instance), "" if len(instance) == 1 else "s",
             config.instance_prompt,
             f"rank-{config.lora_rank} offsets" if config.lora_rank else "the U-Net",
             " + text encoder" if config.train_text else "", " + the placeholder's embedding"
             if config.textual_inversion else "")
    classes = []
    if config.prior_preservation:
        start = time.perf_counter()
        classes = class_images(sd, base, tokenizer, config.class_prompt, config.num_class_images, seed=config.seed,
                               steps_count=config.class_steps, dtype=dtype)
        timings["class_images"] = time.perf_counter() - start
    trained = train(sd, base, config, instance, classes, instance_ids, class_ids, token_id=token_id,
                    init_token_id=init_token_id, compute_dtype=jnp.dtype(dtype))
    timings.update(trained.timings)
    log.info("instance loss on a fixed batch and noise: %.5f -> %.5f", trained.loss_before, trained.loss_after)
    start = time.perf_counter()
    save(out, sd, base, config, trained, {"data": str(data_folder), "images": len(instance), "dtype": dtype,
                                          "timings": timings})
    timings["save"] = time.perf_counter() - start
    log.info("wrote %s (%.1f MiB)%s", out, _folder_bytes(out) / 2**20,
             f"; {LORA_FILE} alone {(out / LORA_FILE).stat().st_size / 2**20:.2f} MiB" if config.lora_rank else "")
    timings["total"] = sum(timings.values())
    log.info("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items())
             + f" (train without compile: {timings['train'] / config.steps:.2f}s/step)")
    return timings
