"""Domain pre-training: E4T's first stage on an image folder, resumable, on many devices.

:func:`pretrain` composes the method (:func:`e4t_jax.e4t.model.loss`) with the generic
training pieces: the jit driver over a ``(data, fsdp)`` mesh, the grain pipeline of
this host's share of the images, the loop with orbax checkpoints and metrics, and at
the end the domain-encoder export that ``e4t-personalize --encoder`` loads.

A run folder holds ``checkpoints/`` (params, optimizer state, step, input-pipeline
position, and the :class:`PretrainConfig`), ``tb/`` and ``metrics.jsonl``,
``samples/`` and finally ``encoder/``; the checkpoints may go elsewhere instead, such as a
``gs://`` bucket (:attr:`RunOptions.checkpoints`). Resuming checks that the saved config equals
this run's, except the number of steps.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import time
from pathlib import Path

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
from e4t_jax.training import checkpoint, data, loop, parallel, steps
from e4t_jax.training.config import OptimizerConfig, TrainConfig

log = logging.getLogger("e4t.pretrain")
RUN_ENTRIES = frozenset({"checkpoints", "tb", "metrics.jsonl", "samples", "encoder"})  # what a run folder holds


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
      dtype: compute dtype of the frozen modules.
      remat: recompute U-Net blocks in the backward pass (less memory).
      devices_per_host: use only the first N devices of every host.
      fsdp: devices per fsdp group (shards large frozen params).
      log_every, save_every, keep: metrics cadence, checkpoint cadence, checkpoints kept.
      sample_every: write a sample grid every N steps (0: never).
      variant: the base model's weight files (``fp16``; :func:`e4t_jax.pipeline.load_model`).
    """

    out: Path
    checkpoints: str | None = None
    resume: bool = False
    dtype: str = "float32"
    remat: bool = False
    devices_per_host: int | None = None
    fsdp: int = 1
    log_every: int = 10
    save_every: int = 500
    keep: int = 3
    sample_every: int = 0
    variant: str | None = None

    def checkpoint_dir(self) -> str:
        """The checkpoint folder or URL, absolute."""
        return files.absolute(self.checkpoints or Path(self.out) / "checkpoints")


def templates(config: PretrainConfig) -> list[str]:
    """The run's prompt templates: ``data.templates``, else the domain word's."""
    if config.data.templates is not None:
        return data.load_templates(config.data.templates)
    return data.templates_for_domain(config.e4t.model.domain_word)


def check(config: PretrainConfig, options: RunOptions) -> None:
    """Fails fast, before any model is loaded, on inputs that cannot work.

    Raises:
      UserError: bad cadences or templates, an ``out`` that holds what a run does not
        write or overlaps an input, checkpoints in ``out`` without ``resume``, or a resume
        with another config (only ``train.steps`` may change).
      FileNotFoundError: a missing or empty image folder.
    """
    if options.save_every < 1 or options.log_every < 1:
        raise UserError("--save-every and --log-every must be at least 1")
    if not config.data.root:
        raise UserError("no image folder: pass --data")
    files.check_folder(options.out, RUN_ENTRIES, "e4t-pretrain",
                       inputs=[config.data.root, config.e4t.model.base, config.e4t.model.vision_source])
    data.list_images(config.data.root)  # a clear error for a missing or empty folder
    try:
        templates(config)
    except ValueError as error:
        raise UserError(str(error)) from error
    checkpoints = epath.Path(options.checkpoint_dir())
    if not (checkpoints.is_dir() and any(checkpoints.iterdir())):
        return
    if not options.resume:
        raise UserError(f"{checkpoints} already holds checkpoints; pass --resume to continue, or another --out")
    manager = checkpoint.open_manager(options.checkpoint_dir())
    saved = checkpoint.read_config(manager)
    manager.close()
    changed = [path for path in config_lib.differences(saved, config_lib.to_dict(config)) if path != "train.steps"]
    if changed:
        raise UserError(f"{checkpoints} was trained with another config ({', '.join(changed)} differ); "
                        "resume with the same options (only --steps may change), or start a new --out")


class SampleWriter:
    """Grids of a held-out image and 3 prompts with ``S*`` from the current encoder.

    The embedding function and the sampling program are compiled once, on the first grid.
    """

    PROMPTS = ("a photo of {}", "an oil painting of {}", "{} on the beach")

    def __init__(self, e: model_lib.E4T, image: np.ndarray, size: int, every: int, out: Path, seed: int):
        self.e, self.every, self.out, self.seed = e, every, out, seed
        self.pixels = data.center_crop_resize(image, size)
        self.embed = jax.jit(functools.partial(model_lib.embed_image, e.model))
        self.generator = pipeline.Generator(e.sd)
        prompts = [t.format(e.config.model.placeholder) for t in self.PROMPTS]
        self.ids, self.uncond = e.tokenizer.encode(prompts), e.tokenizer.encode([""] * len(prompts))

    def __call__(self, step: int, state: steps.TrainState) -> None:
        if step % self.every:
            return
        from PIL import Image

        e, params = self.e, jax.device_get(state.params)
        embedding = np.asarray(self.embed(params, e.frozen, self.pixels[None])[0])
        concept = concept_lib.Concept(e.config.model.placeholder, e.model.placeholder_id, embedding, e.config,
                                      domain=params.offsets, delta=jax.tree.map(np.zeros_like, params.offsets))
        images = self.generator(e.frozen.base, self.ids, self.uncond, seed=self.seed, num_steps=20,
                                hooks=concept.hooks())
        grid = pipeline.image_grid(pipeline.to_uint8(np.concatenate([(self.pixels[None] + 1) / 2, images])))
        path = self.out / f"{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid).save(path)


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
                        variant=options.variant)
    size = config.data.size or e.sd.image_size
    log.info("%s (loaded in %.1fs)", e.describe(), time.perf_counter() - start)

    devices, train = _devices(options.devices_per_host), config.train
    if train.batch_size % len(devices):
        raise UserError(f"--batch-size {train.batch_size} is not a multiple of the {len(devices)} devices")
    mesh = parallel.make_mesh(data=len(devices) // options.fsdp, fsdp=options.fsdp, devices=devices)
    optimizer = steps.make_optimizer(train.optimizer)
    state = steps.TrainState.create(e.params, optimizer, jax.random.PRNGKey(train.seed))
    step_fn = functools.partial(steps.train_step, loss_fn=functools.partial(model_lib.loss, model=e.model),
                                optimizer=optimizer)
    driver = parallel.JitDriver(step_fn, mesh, jax.eval_shape(lambda: state), jax.eval_shape(lambda: e.frozen),
                                fsdp=options.fsdp > 1)
    state, frozen = driver.place_state(state), driver.place_frozen(e.frozen)

    per_host = train.batch_size // jax.process_count()
    placeholder = config.e4t.model.placeholder
    dataset = data.make_dataset(config.data.root, size=size, batch_size=per_host, seed=train.seed,
                                templates=templates(config), placeholder=placeholder,
                                crop_scale=config.data.crop_scale, flip=config.data.flip,
                                captions=config.data.captions,
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
                   "index": np.arange(offset, offset + per_host, dtype=np.int32)}
            step += 1

    hooks = []
    if options.sample_every and jax.process_index() == 0:
        first_image = data.load_image(data.list_images(config.data.root)[0])
        hooks.append(SampleWriter(e, first_image, size, options.sample_every, options.out / "samples", train.seed))
    try:
        state = loop.run(driver, state, frozen, host_batches(int(state.step)), steps=train.steps,
                         global_batch_size=train.batch_size, manager=manager,
                         data_state=lambda: data.dataset_state(dataset), config=config_lib.to_dict(config),
                         out=options.out, log_every=options.log_every, on_step=hooks)
    except FloatingPointError as error:
        raise UserError(f"{error}; lower --lr or raise --warmup and --resume") from error
    encoder_dir = options.out / "encoder"
    if jax.process_index() == 0:
        export_encoder(e, encoder_dir, jax.device_get(state.params), pretrained_steps=int(state.step))
        log.info("domain encoder (step %d) written to %s", int(state.step), encoder_dir)
    return encoder_dir
