"""Pre-train an E4T domain encoder (faces, cats, art, ...) on a folder of images.

Examples::

    e4t-pretrain --preset tiny --data photos/ --domain-word face --steps 100 --out runs/tiny
    e4t-pretrain --preset sd15-faces --data ffhq/ --out runs/faces --remat --dtype bfloat16
    e4t-pretrain ... --out runs/faces --resume          # continue after a crash or preemption

Every ``--save-every`` steps an orbax checkpoint (trainable params, optimizer state,
step, input-pipeline position, config) lands in ``OUT/checkpoints``; ``--resume``
continues exactly. Metrics go to TensorBoard (``OUT/tb``) and ``OUT/metrics.jsonl``,
sample grids to ``OUT/samples``, and the finished domain encoder, which
``e4t-personalize --encoder`` loads, to ``OUT/encoder``. Multi-host: set
``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` (or pass
``--coordinator`` ...) on every host; each host reads only its share of the images.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import signal
import time
from pathlib import Path

import numpy as np

from e4t_jax import cli

log = logging.getLogger("e4t.pretrain")

PRESETS = {
    # The paper's face setting (512x512, global batch 16, lr 1.6e-5, ~30k steps).
    "sd15-faces": dict(model="runwayml/stable-diffusion-v1-5", clip_vision="laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
                       domain_word="face", steps=30000, batch_size=16, lr=1.6e-5, width=1024),
    "tiny": dict(model="tiny", clip_vision=None, domain_word="face", steps=200, batch_size=4, lr=1e-3, width=64),
}
TEMPLATES_FOR_WORD = {"face": "face", "person": "face", "man": "face", "woman": "face", "cat": "cat",
                      "painting": "art", "art": "art", "style": "art"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="e4t-pretrain", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="defaults for the options below")
    p.add_argument("--model", help="model folder, Hugging Face id, or preset 'tiny' / 'medium'")
    p.add_argument("--clip-vision", help="CLIP vision model (default: MODEL/image_encoder)")
    p.add_argument("--data", type=Path, required=True, help="image folder (recursive: jpg, png, webp, bmp)")
    p.add_argument("--domain-word", help="coarse class word, one token (face, cat, painting)")
    p.add_argument("--templates", default=None, help="generic, face, cat, art, or a file of templates with {}")
    p.add_argument("--placeholder", default="S*")
    p.add_argument("--steps", type=int, help="total training steps")
    p.add_argument("--batch-size", type=int, help="global batch size")
    p.add_argument("--lr", type=float)
    p.add_argument("--width", type=int, help="encoder head width (clip, unet and hidden dims)")
    p.add_argument("--offset-rank", type=int, default=4, help="rank of the low-rank weight offsets")
    p.add_argument("--warmup", type=int, default=0, help="linear warm-up steps")
    p.add_argument("--clip-norm", type=float, default=1.0, help="gradient clipping (global norm)")
    p.add_argument("--size", type=int, default=None, help="training resolution (default: the model's)")
    p.add_argument("--remat", action="store_true", help="recompute U-Net blocks in the backward pass (less memory)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype")
    p.add_argument("--devices-per-host", type=int, default=None, help="use only this many local devices")
    p.add_argument("--fsdp", type=int, default=1, help="devices per fsdp group (shards large frozen params)")
    p.add_argument("--coordinator", default=None, help="multi-host: coordinator address host:port")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--keep", type=int, default=3, help="checkpoints to keep")
    p.add_argument("--sample-every", type=int, default=0, help="write a sample grid every N steps (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--cache-dir", type=Path, default=None, help="persistent compilation cache folder")
    p.add_argument("--out", type=Path, required=True, help="run folder")
    args = p.parse_args(argv)
    defaults = PRESETS.get(args.preset, {})
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    missing = [name for name in ("model", "domain_word", "steps", "batch_size", "lr") if getattr(args, name) is None]
    if missing:
        p.error(f"missing {', '.join('--' + m.replace('_', '-') for m in missing)} (or pass --preset)")
    args.width = args.width or 1024
    args.templates = args.templates or TEMPLATES_FOR_WORD.get(args.domain_word, "generic")
    return args


def _validate(args: argparse.Namespace) -> None:
    from e4t_jax.training.data import list_images, load_templates

    if args.steps < 1 or args.batch_size < 1 or args.save_every < 1 or args.log_every < 1:
        raise cli.UserError("--steps, --batch-size, --save-every and --log-every must be at least 1")
    list_images(args.data)  # a clear error for a missing or empty folder
    try:
        load_templates(args.templates)
    except ValueError as e:
        raise cli.UserError(str(e)) from e
    checkpoints = args.out / "checkpoints"
    if not args.resume and checkpoints.is_dir() and any(checkpoints.iterdir()):
        raise cli.UserError(f"{args.out} already holds checkpoints; pass --resume to continue, or another --out")


def batch_fingerprint(pixels: np.ndarray) -> str:
    """A short hash of a batch's pixels (the metrics log records the data order)."""
    return hashlib.sha1(np.ascontiguousarray(pixels).tobytes()).hexdigest()[:12]


class Metrics:
    """TensorBoard + JSON-lines metrics, written by process 0 only."""

    def __init__(self, out: Path, enabled: bool):
        self.enabled = enabled
        if enabled:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(out / "tb"))
            self.lines = open(out / "metrics.jsonl", "a", encoding="utf-8")

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        for key, value in values.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(f"train/{key}", value, step)
        self.lines.write(json.dumps({"step": step, **values}) + "\n")
        self.lines.flush()

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.lines.close()


class SampleWriter:
    """Grids of the held-out image and 3 prompts with ``S*`` from the current encoder.

    The embedding function and the sampling program are compiled once, on the first grid.
    """

    PROMPTS = ("a photo of {}", "an oil painting of {}", "{} on the beach")

    def __init__(self, e, image: np.ndarray, size: int, seed: int):
        from e4t_jax import pipeline
        from e4t_jax.training.data import center_crop_resize
        from infer.personalize import concept_embedder

        self.e, self.seed = e, seed
        self.pixels = center_crop_resize(image, size)
        self.embed = concept_embedder(e)
        self.generator = pipeline.Generator(e.sd)
        prompts = [t.format(e.placeholder) for t in self.PROMPTS]
        self.ids, self.uncond = e.tokenizer.encode(prompts), e.tokenizer.encode([""] * len(prompts))

    def __call__(self, params, path: Path) -> None:
        from PIL import Image

        from e4t_jax import pipeline

        e = self.e
        concept = pipeline.Concept(e.model.placeholder_id, self.embed(params, self.pixels), params["offsets"],
                                   e.model.offsets.kind)
        images = self.generator(e.base_params, self.ids, self.uncond, seed=self.seed, num_steps=20,
                                concepts=(concept,))
        grid = pipeline.image_grid(pipeline.to_uint8(np.concatenate([(self.pixels[None] + 1) / 2, images])))
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid).save(path)


@cli.main_wrapper
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _validate(args)
    cli.reexec_with_fast_malloc()
    import jax

    from e4t_jax.training import parallel

    parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    cli.enable_compilation_cache(args.cache_dir)
    import functools

    import jax.numpy as jnp
    from tqdm.auto import tqdm

    from e4t_jax.e4t import model as model_lib
    from e4t_jax.e4t.encoder import EncoderConfig
    from e4t_jax.e4t.offsets import OffsetConfig
    from e4t_jax.training import checkpoint, steps
    from e4t_jax.training.data import dataset_state, list_images, load_image, make_dataset, restore_dataset_state

    start = time.perf_counter()
    e = model_lib.build(args.model, domain_word=args.domain_word, placeholder=args.placeholder,
                        clip_vision=args.clip_vision, dtype=jnp.dtype(args.dtype), remat=args.remat, seed=args.seed,
                        encoder=EncoderConfig(clip_dim=args.width, unet_dim=args.width, hidden_dim=args.width),
                        offsets=OffsetConfig(rank=args.offset_rank))
    size = args.size or e.sd.unet.config.sample_size * e.sd.downsample_factor
    log.info("%s (loaded in %.1fs)", e.describe(), time.perf_counter() - start)

    devices = jax.devices()
    if args.devices_per_host:  # the first N devices of every host
        devices = [d for host in range(jax.process_count())
                   for d in [d for d in devices if d.process_index == host][:args.devices_per_host]]
    if args.batch_size % len(devices):
        raise cli.UserError(f"--batch-size {args.batch_size} is not a multiple of the {len(devices)} devices")
    mesh = parallel.make_mesh(data=len(devices) // args.fsdp, fsdp=args.fsdp, devices=devices)
    optimizer = steps.make_optimizer(args.lr, clip_norm=args.clip_norm, warmup_steps=args.warmup)
    state = steps.TrainState.create(e.trainable, optimizer, jax.random.PRNGKey(args.seed))
    step_fn = functools.partial(steps.pretrain_step, model=e.model, optimizer=optimizer)
    driver = parallel.JitDriver(step_fn, mesh, jax.eval_shape(lambda: state), jax.eval_shape(lambda: e.frozen),
                                fsdp=args.fsdp > 1)
    state, frozen = driver.place_state(state), driver.place_frozen(e.frozen)

    per_host = args.batch_size // jax.process_count()
    dataset = make_dataset(args.data, size=size, batch_size=per_host, seed=args.seed, templates=args.templates,
                           placeholder=args.placeholder, shard_index=jax.process_index(),
                           shard_count=jax.process_count())
    run_config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    manager = checkpoint.open_manager(args.out / "checkpoints", max_to_keep=args.keep, save_every=args.save_every)
    first_step = 0
    if args.resume and manager.latest_step() is not None:
        state, data_state, _ = checkpoint.restore(manager, abstract_state=state)
        restore_dataset_state(dataset, data_state)
        first_step = int(state.step)
        log.info("resumed from step %d", first_step)
    if first_step >= args.steps:
        log.info("already at step %d >= --steps %d", first_step, args.steps)
    metrics_log = Metrics(args.out, jax.process_index() == 0)
    write_sample = (SampleWriter(e, load_image(list_images(args.data)[0]), size, args.seed)
                    if args.sample_every and jax.process_index() == 0 else None)
    crash_after = int(os.environ.get("E4T_CRASH_AFTER_STEP", "0"))  # fault injection for the resume test

    bar = tqdm(range(first_step, args.steps), initial=first_step, total=args.steps, desc="pre-training",
               unit="step", disable=jax.process_index() != 0)
    tick, last_good = time.perf_counter(), None
    for step in bar:
        batch = next(dataset)
        offset = step * args.batch_size + jax.process_index() * per_host
        host_batch = {"pixels": batch["pixels"], "input_ids": e.tokenizer.encode(list(batch["prompt"])),
                      "index": np.arange(offset, offset + per_host, dtype=np.int32)}
        state, metrics = driver(state, frozen, host_batch)
        done = step + 1
        if done % args.log_every == 0 or done == args.steps or done == first_step + 1:
            values = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if not all(math.isfinite(v) for v in values.values()):
                manager.wait_until_finished()
                raise cli.UserError(
                    f"loss became {values['loss']} at step {done}; stopped. The last good checkpoint "
                    f"({manager.latest_step()}) is kept in {args.out / 'checkpoints'}; lower --lr or raise "
                    "--warmup and --resume.")
            elapsed, tick = time.perf_counter() - tick, time.perf_counter()
            values["images_per_s"] = args.batch_size * (args.log_every if done > first_step + 1 else 1) / elapsed
            values["batch"] = batch_fingerprint(batch["pixels"])
            metrics_log.write(done, values)
            bar.set_postfix(loss=f"{values['loss']:.4f}", img_s=f"{values['images_per_s']:.1f}")
        if manager.should_save(done) or done == args.steps:  # the iterator state is gathered only then
            checkpoint.save(manager, done, train_state=state, data_state=dataset_state(dataset), config=run_config,
                            force=True)
            last_good = done
        if write_sample is not None and done % args.sample_every == 0:
            write_sample(jax.device_get(state.params), args.out / "samples" / f"{done:07d}.png")
        if crash_after and done == crash_after:
            manager.wait_until_finished()
            os.kill(os.getpid(), signal.SIGKILL)
    manager.wait_until_finished()
    metrics_log.close()
    if jax.process_index() == 0:
        params = jax.device_get(state.params)
        e.sd = dataclasses.replace(e.sd, model_id=str(args.model))
        model_lib.export_encoder(e, args.out / "encoder", params, pretrained_steps=int(state.step))
        log.info("domain encoder (step %d, last checkpoint %s) written to %s", int(state.step), last_good,
                 args.out / "encoder")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
