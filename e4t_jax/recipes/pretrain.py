"""Domain pre-training: E4T's first stage on an image folder, resumable, on many devices.

:func:`pretrain` composes the method (:func:`e4t_jax.e4t.model.loss`) with the generic
training pieces: the jit driver over a ``(data, fsdp)`` mesh, the grain pipeline of
this host's share of the images, the loop with orbax checkpoints and metrics, and at
the end the domain-encoder export that ``e4t-personalize --encoder`` loads.

A run folder holds ``checkpoints/`` (params, optimizer state, EMA, step, input-pipeline
position, and the :class:`PretrainConfig`), ``tb/`` and ``metrics.jsonl``,
``samples/`` (sample grids, also in TensorBoard) and finally ``encoder/``; the checkpoints
may go elsewhere instead, such as a ``gs://`` bucket (:attr:`RunOptions.checkpoints`).

Resuming continues the stored run: :func:`stored_config` reads its config, and
:func:`check` refuses a config that differs from it (:func:`conflicts`; ``train.steps``
may change), or only warns with :attr:`RunOptions.override`. The command line starts from
the stored config, so omitted flags keep their stored values.

Counting: ``train.steps`` (and the warm-up, the cadences and the checkpoint steps)
counts optimizer steps, and ``train.batch_size`` is the global batch of one step, with
or without gradient accumulation (:attr:`RunOptions.grad_accum` micro-batches of
``batch_size / grad_accum`` each, inside the step); changing ``grad_accum`` on a resume
changes memory use, not the run.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import time
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from e4t_jax import config as config_lib, files, pipeline
from e4t_jax.e4t import concept as concept_lib
from e4t_jax.e4t import model as model_lib
from e4t_jax.e4t.config import E4TConfig, ModelConfig, PersonalizeConfig
from e4t_jax.e4t.encoder import EncoderConfig
from e4t_jax.e4t.pretrained import export_encoder
from e4t_jax.errors import UserError
from e4t_jax.eval import faces
from e4t_jax.training import checkpoint, data, loop, parallel, steps
from e4t_jax.training.config import OptimizerConfig, TrainConfig

log = logging.getLogger("e4t.pretrain")
# What a run folder holds (``.encoder.tmp``: an encoder export that a crash interrupted, files.staging_folder).
RUN_ENTRIES = frozenset({"checkpoints", "tb", "metrics.jsonl", "samples", "encoder", ".encoder.tmp"})


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """A pre-training run: the encoder to train, how long, on what."""

    e4t: E4TConfig = E4TConfig()
    train: TrainConfig = TrainConfig()
    data: data.DataConfig = data.DataConfig()


def _preset(base: str, vision_source: str | None, width: int, steps_count: int, batch_size: int,
            lr: float) -> PretrainConfig:
    return PretrainConfig(
        E4TConfig(model=ModelConfig(base=base, vision_source=vision_source, domain_word="face"),
                  encoder=EncoderConfig(vision_dim=width, unet_dim=width, hidden_dim=width)),
        TrainConfig(steps=steps_count, batch_size=batch_size, optimizer=OptimizerConfig(lr=lr)))


PRESETS = {
    # The paper's face setting (512x512, global batch 16, lr 1.6e-5, ~30k steps).
    "sd15-faces": _preset("stable-diffusion-v1-5/stable-diffusion-v1-5", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
                          1024, 30000, 16, 1.6e-5),
    "tiny": _preset("tiny", None, 64, 200, 4, 1e-3),
    # The digits mini-domain (e4t_jax.digits, e4t_jax.recipes.digits): attribute captions,
    # no flips or crops (a mirrored or cropped digit is another digit), the tower's patch
    # tokens (its [CLS] token holds no spatial detail). This is the run that made the
    # shipped encoder; its identity transfer is at chance (bench/RESULTS.md says why).
    "digits": PretrainConfig(
        E4TConfig(model=ModelConfig(base="digits", domain_word="digit"),
                  encoder=EncoderConfig(vision="clip-patches", vision_dim=128, unet_dim=128, hidden_dim=128),
                  personalize=PersonalizeConfig(steps=15, batch_size=8, lr=1e-4, crop_scale=(1.0, 1.0),
                                                flip=False)),
        TrainConfig(steps=1500, batch_size=32, optimizer=OptimizerConfig(lr=3e-4, warmup_steps=100)),
        data.DataConfig(captions=True, crop_scale=(1.0, 1.0), flip=False)),
}


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How a run executes: not part of the saved config, so a resume may change it (e.g. devices).

    Attributes:
      out: the run folder.
      checkpoints: where the orbax checkpoints go: a folder or a ``gs://`` URL (which
        outlives a preempted TPU VM); None: ``out/checkpoints``.
      resume: continue from the latest checkpoint in ``checkpoints``.
      dtype: compute dtype of the frozen modules and the storage dtype of their weights.
      remat: recompute U-Net blocks in the backward pass (less memory).
      devices_per_host: use only the first N devices of every host.
      fsdp: devices per fsdp group: the frozen weights, and with fsdp > 1 the train state,
        are split over the group (leaves of at least ``fsdp_min_size`` elements).
      fsdp_min_size: smaller leaves stay whole on every device.
      log_every, save_every, keep: metrics cadence, checkpoint cadence, checkpoints kept.
      sample_every: write a sample grid every N steps (0: never).
      variant: the base model's weight files (``fp16``; :func:`e4t_jax.pipeline.load_model`).
      override: resume even if the config differs from the stored one (a warning, not an error).
      grad_accum: split every step's batch into this many micro-batches, run one after
        the other (the memory of a smaller batch, the update of the whole one).
      export_ema: export the EMA of the weights (``train.ema_decay``) instead of the last
        weights; the sample grids show what will be exported.
    """

    out: Path
    checkpoints: str | None = None
    resume: bool = False
    dtype: str = "float32"
    remat: bool = False
    devices_per_host: int | None = None
    fsdp: int = 1
    fsdp_min_size: int = parallel.MIN_FSDP_SIZE
    log_every: int = 10
    save_every: int = 500
    keep: int = 3
    sample_every: int = 0
    variant: str | None = None
    override: bool = False
    grad_accum: int = 1
    export_ema: bool = False

    def checkpoint_dir(self) -> str:
        """The checkpoint folder or URL, absolute."""
        return files.absolute(self.checkpoints or Path(self.out) / "checkpoints")


def templates(config: PretrainConfig) -> list[str]:
    """The run's prompt templates: ``data.templates``, else the domain word's."""
    if config.data.templates is not None:
        return data.load_templates(config.data.templates)
    return data.templates_for_domain(config.e4t.model.domain_word)


def stored_config(options: RunOptions) -> PretrainConfig | None:
    """The config of the latest checkpoint in ``options.checkpoint_dir()``, or None when there is none.

    A folder holding only a save that was cut short (a run killed during its first save) has
    none. Fields that did not exist when it was written take their defaults.
    """
    checkpoints = epath.Path(options.checkpoint_dir())
    if not (checkpoints.is_dir() and any(checkpoints.iterdir())):
        return None
    manager = checkpoint.open_manager(options.checkpoint_dir(), read_only=True)
    try:
        if manager.latest_step() is None:
            return None
        return config_lib.from_dict(PretrainConfig, checkpoint.read_config(manager))
    finally:
        manager.close()


def _field(config: Any, path: str) -> Any:
    for name in path.split("."):
        config = getattr(config, name)
    return config


def conflicts(stored: PretrainConfig, config: PretrainConfig) -> list[tuple[str, Any, Any]]:
    """``(dotted path, stored value, given value)`` where ``config`` differs from ``stored``.

    ``train.steps`` is no conflict: a run may grow to continue (or end where it is).
    """
    paths = config_lib.differences(config_lib.to_dict(stored), config_lib.to_dict(config))
    return [(path, _field(stored, path), _field(config, path)) for path in paths if path != "train.steps"]


def check(config: PretrainConfig, options: RunOptions, names: Mapping[str, str] | None = None) -> None:
    """Fails fast, before any model is loaded, on inputs that cannot work.

    Args:
      names: how the message calls a config field (e.g. ``{"train.optimizer.lr": "--lr"}``);
        by default its dotted path.

    Raises:
      UserError: bad cadences, accumulation or templates, ``export_ema`` without an EMA,
        an ``out`` that holds what a run does not write or overlaps an input,
        checkpoints in ``out`` without ``resume``, or a resume with another config
        (:func:`conflicts`) without ``override``, ``data.face_masks`` without dlib.
      FileNotFoundError: a missing or empty image folder.
    """
    if options.save_every < 1 or options.log_every < 1:
        raise UserError("--save-every and --log-every must be at least 1")
    if options.grad_accum < 1 or config.train.batch_size % options.grad_accum:
        raise UserError(f"--batch-size {config.train.batch_size} is not a multiple of --grad-accum "
                        f"{options.grad_accum}")
    if options.export_ema and config.train.ema_decay is None:
        raise UserError("--export-ema needs an EMA: pass --ema DECAY")
    if not config.data.root:
        raise UserError("no image folder: pass --data")
    files.check_folder(options.out, RUN_ENTRIES, "e4t-pretrain",
                       inputs=[config.data.root, config.e4t.model.base, config.e4t.model.vision_source])
    data.list_images(config.data.root)  # a clear error for a missing or empty folder
    try:
        templates(config)
    except ValueError as error:
        raise UserError(str(error)) from error
    if config.data.face_masks:
        faces.require()  # FacesUnavailable (a UserError) names the install line
    stored = stored_config(options)
    if stored is None:
        return
    if not options.resume:
        raise UserError(f"{options.checkpoint_dir()} already holds checkpoints; pass --resume to continue, "
                        "or another --out")
    names = names or {}
    differences = dict.fromkeys(f"{names.get(path, path)}: stored {a}, given {b}"
                                for path, a, b in conflicts(stored, config))  # one line per flag
    if not differences:
        return
    message = f"{options.checkpoint_dir()} was trained with another config: {'; '.join(differences)}"
    if options.override:
        log.warning("%s (--override: the given values win)", message)
    else:
        raise UserError(f"{message}; omit these flags to keep the stored values, pass --override to change them, "
                        "or start a new --out")


def exported_params(state: steps.TrainState, options: RunOptions) -> model_lib.E4TParams:
    """What the run exports (and samples): the EMA with ``options.export_ema``, else the params."""
    return state.ema if options.export_ema else state.params


class SampleWriter:
    """Grids of a held-out image and 3 prompts with ``S*`` from the current encoder.

    Called on every process (reading the trained params is a collective on multi-host
    runs); process 0 samples, from ``frozen``, and writes the grid (uint8
    ``[2 size, 2 size, 3]``) to ``out/STEP.png`` and to TensorBoard (``samples/grid``); samples
    with NaN or infinite values are not written (a warning). The
    embedding function and the sampling program are compiled once, on the first grid.

    Args:
      frozen: the frozen params to sample with: the run's own on one process, a host copy
        on multi-host runs (process 0 cannot run a program on arrays that span hosts).
    """

    PROMPTS = ("a photo of {}", "an oil painting of {}", "{} on the beach")

    def __init__(self, e: model_lib.E4T, frozen: model_lib.FrozenParams, image: np.ndarray, size: int, every: int,
                 out: Path, seed: int, metrics: loop.MetricsLog, options: RunOptions):
        self.e, self.frozen, self.every, self.out, self.seed = e, frozen, every, out, seed
        self.metrics, self.options = metrics, options
        self.pixels = data.center_crop_resize(image, size)
        self.embed = jax.jit(functools.partial(model_lib.embed_image, e.model))
        self.generator = pipeline.Generator(e.sd)
        prompts = [t.format(e.config.model.placeholder) for t in self.PROMPTS]
        self.ids, self.uncond = e.tokenizer.encode(prompts), e.tokenizer.encode([""] * len(prompts))

    def __call__(self, step: int, state: steps.TrainState) -> None:
        if step % self.every:
            return
        params = parallel.fetch(exported_params(state, self.options))
        if jax.process_index() == 0:
            self.write(step, params)
        parallel.barrier(f"e4t-samples-{step}")  # the others wait while process 0 samples

    def write(self, step: int, params: model_lib.E4TParams) -> None:
        e, frozen = self.e, self.frozen
        embedding = np.asarray(self.embed(params, frozen, self.pixels[None])[0])
        concept = concept_lib.Concept(e.config.model.placeholder, e.model.placeholder_id, embedding, e.config,
                                      domain=params.offsets, delta=jax.tree.map(np.zeros_like, params.offsets))
        try:
            images = self.generator(frozen.base, self.ids, self.uncond, seed=self.seed, num_steps=20,
                                    hooks=concept.hooks())
        except UserError as error:  # non-finite samples: no grid this time, the training goes on
            log.warning("no sample grid at step %d: %s", step, error)
            return
        grid = pipeline.image_grid(pipeline.to_uint8(np.concatenate([(self.pixels[None] + 1) / 2, images])))
        files.save_image(grid, self.out / f"{step:07d}.png")
        self.metrics.image(step, "samples/grid", grid)


def _devices(devices_per_host: int | None) -> list:
    """Every device, or the first N of every host."""
    devices = jax.devices()
    if devices_per_host:
        devices = [d for host in range(jax.process_count())
                   for d in [d for d in devices if d.process_index == host][:devices_per_host]]
    return devices


def pretrain(config: PretrainConfig, options: RunOptions) -> Path:
    """Pre-trains a domain encoder; returns its folder (``out/encoder``).

    Call :func:`e4t_jax.training.parallel.initialize_distributed` first on multi-host runs.
    """
    check(config, options)
    start = time.perf_counter()
    e = model_lib.build(config.e4t, dtype=jnp.dtype(options.dtype), remat=options.remat, seed=config.train.seed,
                        variant=options.variant, on_host=True)  # placed on the mesh below, once
    size = config.data.size or e.sd.image_size
    log.info("%s (loaded in %.1fs)", e.describe(), time.perf_counter() - start)

    devices, train = _devices(options.devices_per_host), config.train
    if train.batch_size % (len(devices) * options.grad_accum):
        raise UserError(f"--batch-size {train.batch_size} is not a multiple of the {len(devices)} devices "
                        f"times --grad-accum {options.grad_accum}")
    mesh = parallel.make_mesh(data=len(devices) // options.fsdp, fsdp=options.fsdp, devices=devices)
    optimizer = steps.make_optimizer(train.optimizer, train.steps)
    state = steps.TrainState.create(e.params, optimizer, jax.random.PRNGKey(train.seed), ema_decay=train.ema_decay)
    step_fn = functools.partial(steps.train_step, loss_fn=functools.partial(model_lib.loss, model=e.model),
                                optimizer=optimizer, grad_accum=options.grad_accum)
    driver = parallel.JitDriver(step_fn, mesh, jax.eval_shape(lambda: state), jax.eval_shape(lambda: e.frozen),
                                fsdp=options.fsdp > 1, min_fsdp_size=options.fsdp_min_size)
    state, frozen = driver.place_state(state), driver.place_frozen(e.frozen)
    sample_frozen = frozen if jax.process_count() == 1 else e.frozen
    # The mesh now holds the only device copies (no whole one beside the shards on device 0).
    e = dataclasses.replace(e, frozen=frozen, params=None)
    first_local = next(d for d in mesh.devices.flat if d.process_index == jax.process_index())
    log.info("the first local device holds %.1f MiB of train state and frozen weights",
             parallel.device_bytes(first_local) / 2**20)

    per_host = train.batch_size // jax.process_count()
    placeholder = config.e4t.model.placeholder
    dataset = data.make_dataset(config.data.root, size=size, batch_size=per_host, seed=train.seed,
                                templates=templates(config), placeholder=placeholder,
                                crop_scale=config.data.crop_scale, flip=config.data.flip,
                                captions=config.data.captions, workers=config.data.workers,
                                face_masks=config.data.face_masks,
                                shard_index=jax.process_index(), shard_count=jax.process_count())
    manager = checkpoint.open_manager(options.checkpoint_dir(), max_to_keep=options.keep,
                                      save_every=options.save_every)
    if options.resume and manager.latest_step() is not None:  # its config was checked by check()
        state, data_state, _ = checkpoint.restore(manager, abstract_state=state)
        data.restore_dataset_state(dataset, data_state)
        log.info("resumed from step %d", int(state.step))
    if int(state.step) >= train.steps:
        log.info("already at step %d >= --steps %d", int(state.step), train.steps)

    def host_batches(step: int):
        while True:
            batch = next(dataset)
            offset = step * train.batch_size + jax.process_index() * per_host
            yield {"pixels": batch["pixels"], "input_ids": e.tokenizer.encode(list(batch["prompt"])),
                   "index": np.arange(offset, offset + per_host, dtype=np.int32),
                   **({"mask": batch["mask"]} if "mask" in batch else {})}
            step += 1

    metrics = loop.MetricsLog(options.out, jax.process_index() == 0)
    hooks = []
    if options.sample_every:
        first_image = next((image for image in map(data.load_image, data.list_images(config.data.root))
                            if image is not None), None)
        if first_image is None:
            raise UserError(f"no readable image in {config.data.root} to draw sample grids from")
        hooks.append(SampleWriter(e, sample_frozen, first_image, size, options.sample_every, options.out / "samples",
                                  train.seed, metrics, options))
    try:
        state = loop.run(driver, state, frozen, host_batches(int(state.step)), steps=train.steps,
                         global_batch_size=train.batch_size, manager=manager,
                         data_state=lambda: data.dataset_state(dataset), config=config_lib.to_dict(config),
                         metrics_log=metrics, log_every=options.log_every, on_step=hooks)
    except FloatingPointError as error:
        raise UserError(f"{error}; lower --lr or raise --warmup and --resume") from error
    finally:
        metrics.close()
    encoder_dir = options.out / "encoder"
    # On every process: fetching split params is a collective, and orbax's save synchronizes
    # the processes (process 0 writes).
    export_encoder(e, encoder_dir, parallel.fetch(exported_params(state, options)), pretrained_steps=int(state.step))
    if jax.process_index() == 0:
        log.info("domain encoder (step %d%s) written to %s", int(state.step),
                 ", EMA" if options.export_ema else "", encoder_dir)
    return encoder_dir
