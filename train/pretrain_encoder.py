"""Pre-train an E4T domain encoder (faces, cats, art, ...) on a folder of images.

Examples::

    e4t-pretrain --preset tiny --model tiny --data photos/ --domain-word face --steps 100 --out runs/tiny
    e4t-pretrain --preset sd15-faces --model stable-diffusion-v1-5/stable-diffusion-v1-5 --data ffhq/ \
        --out runs/faces --remat --dtype bfloat16
    e4t-pretrain ... --out runs/faces --resume          # continue after a crash or preemption

A SIGTERM (what a TPU or Kubernetes preemption sends) lets the step in progress finish,
saves it, and exits with status 75 (EX_TEMPFAIL), printing how to resume; a checkpoint
that cannot be written (a full disk) stops the run with one line (status 2), the last
good checkpoint kept.

Every ``--save-every`` steps an orbax checkpoint (trainable params, optimizer state,
EMA, step, input-pipeline position, config) lands in ``OUT/checkpoints``; ``--resume``
continues exactly: every config flag not given takes the checkpoint's value (the
preset is not read), and one given with another value is refused, listing each
difference, unless ``--override`` (``--steps`` may always change, to grow the run). Steps, warm-up,
cadences and checkpoints count optimizer steps; ``--batch-size`` is the batch of one
step, also with ``--grad-accum N`` (N micro-batches per step, less memory; it may
change on a resume). Metrics go to TensorBoard (``OUT/tb``) and ``OUT/metrics.jsonl``,
sample grids to ``OUT/samples`` and TensorBoard, and the finished domain encoder (with
``--export-ema``, the ``--ema`` weights), which ``e4t-personalize --encoder`` loads, to
``OUT/encoder`` (``--encoder OUT`` finds it there). ``OUT`` must be new, empty, or a
run folder of e4t-pretrain. Multi-host: on a Cloud TPU pod nothing is needed; elsewhere set
``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` (or pass
``--coordinator`` ...) on every host; each host reads only its share of the images.
"""
from __future__ import annotations

import argparse
import functools
import logging
from pathlib import Path

from e4t_jax import cli
from e4t_jax.errors import UserError

log = logging.getLogger("e4t.pretrain")
REQUIRED_WITHOUT_PRESET = ("domain_word", "steps", "batch_size", "lr")

# The config flags: each one's fields of PretrainConfig (dotted paths), which all take its value.
# None marks a flag not given: the field keeps the preset's value (or, on --resume, the stored one).
CONFIG_FLAGS = {
    "model": ("e4t.model.base",),
    "clip_vision": ("e4t.model.vision_source",),
    "domain_word": ("e4t.model.domain_word",),
    "placeholder": ("e4t.model.placeholder",),
    "head_width": ("e4t.encoder.vision_dim", "e4t.encoder.unet_dim", "e4t.encoder.hidden_dim"),
    "vision_backbone": ("e4t.encoder.vision",),
    "offset_rank": ("e4t.offsets.rank",),
    "tune_steps": ("e4t.personalize.steps",),
    "tune_batch_size": ("e4t.personalize.batch_size",),
    "tune_lr": ("e4t.personalize.lr",),
    "flip": ("e4t.personalize.flip", "data.flip"),
    "crop_scale": ("e4t.personalize.crop_scale", "data.crop_scale"),
    "templates": ("e4t.personalize.templates", "data.templates"),
    "steps": ("train.steps",),
    "batch_size": ("train.batch_size",),
    "seed": ("train.seed",),
    "ema": ("train.ema_decay",),
    "lr": ("train.optimizer.lr",),
    "warmup": ("train.optimizer.warmup_steps",),
    "lr_schedule": ("train.optimizer.schedule",),
    "clip_norm": ("train.optimizer.clip_norm",),
    "data": ("data.root",),
    "size": ("data.size",),
    "captions": ("data.captions",),
    "face_masks": ("data.face_masks",),
    "workers": ("data.workers",),
}
FLAG_NAMES = {path: "--" + flag.replace("_", "-") for flag, paths in CONFIG_FLAGS.items() for path in paths}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from e4t_jax.recipes.pretrain import PRESETS, RunOptions
    from e4t_jax.training.config import SCHEDULES, OptimizerConfig
    from e4t_jax.training.data import DataConfig

    p = cli.ArgumentParser(prog="e4t-pretrain", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="defaults for the options below")
    cli.add_model(p)
    p.add_argument("--clip-vision", help="vision tower weights (default: MODEL/image_encoder)")
    p.add_argument("--data", type=Path, required=True, help="image folder (recursive: jpg, png, webp, bmp)")
    p.add_argument("--domain-word", help="coarse class word, one token (face, cat, painting)")
    p.add_argument("--templates", default=None, help="generic, face, cat, art, or a file of templates with {}")
    p.add_argument("--placeholder", default=None, help="the concept's token (default: S*)")
    p.add_argument("--steps", type=cli.POSITIVE, help="total training steps")
    p.add_argument("--batch-size", type=cli.POSITIVE, help="global batch size")
    p.add_argument("--lr", type=cli.LEARNING_RATE)
    p.add_argument("--head-width", type=cli.POSITIVE, help="encoder head width (its vision, U-Net and hidden dims)")
    p.add_argument("--vision-backbone", default=None,
                   help="how the vision tower is read: clip ([CLS] per layer), clip-mean, clip-patches (default clip)")
    p.add_argument("--captions", action=argparse.BooleanOptionalAction, default=None,
                   help="prompts from each image's sidecar NAME.txt (with {} for the placeholder), not templates")
    p.add_argument("--face-masks", action=argparse.BooleanOptionalAction, default=None,
                   help="mask the diffusion loss to each image's face (dlib's 68 landmarks, computed at load; "
                        "pip install \"e4t-jax[faces]\"); an image without a face keeps its whole loss")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="random horizontal flips (default on; off for domains where a mirror image differs)")
    p.add_argument("--crop-scale", type=cli.number(0, 1, above=True), nargs=2, metavar=("MIN", "MAX"), default=None,
                   help="random crop side as a fraction of the shortest side (default 0.8 1.0)")
    p.add_argument("--tune-steps", type=cli.POSITIVE, default=None, help="recorded default of e4t-personalize --steps")
    p.add_argument("--tune-batch-size", type=cli.POSITIVE, default=None,
                   help="recorded default of e4t-personalize --batch-size")
    p.add_argument("--tune-lr", type=cli.LEARNING_RATE, default=None, help="recorded default of e4t-personalize --lr")
    p.add_argument("--offset-rank", type=cli.POSITIVE, default=None, help="rank of the low-rank weight offsets")
    p.add_argument("--warmup", type=cli.NON_NEGATIVE, default=None, help="linear warm-up steps")
    p.add_argument("--lr-schedule", choices=SCHEDULES, default=None,
                   help=f"after the warm-up: stay, or decay linearly or as a cosine to 0 at --steps "
                        f"(default {OptimizerConfig.schedule})")
    p.add_argument("--grad-accum", type=cli.POSITIVE, default=RunOptions.grad_accum,
                   help="micro-batches per step (--batch-size must be a multiple): same update, less memory")
    p.add_argument("--ema", type=cli.number(0, 1, above=True), default=None, metavar="DECAY",
                   help="keep an exponential moving average of the trained weights, e.g. 0.999 (default off)")
    p.add_argument("--export-ema", action="store_true", help="export (and sample) the --ema weights")
    p.add_argument("--clip-norm", type=cli.number(0, above=True), default=None,
                   help="gradient clipping (global norm)")
    p.add_argument("--size", type=cli.PIXELS, default=None, help="training resolution (default: the model's)")
    p.add_argument("--workers", type=cli.NON_NEGATIVE, default=None,
                   help=f"data-loading worker processes (default {DataConfig.workers}: load in this process)")
    p.add_argument("--remat", action="store_true", help="recompute U-Net blocks in the backward pass (less memory)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=RunOptions.dtype,
                   help="compute dtype of the frozen model, and the dtype its weights are stored in (bfloat16 halves them)")
    p.add_argument("--devices-per-host", type=cli.POSITIVE, default=None, help="use only this many local devices")
    p.add_argument("--fsdp", type=cli.POSITIVE, default=RunOptions.fsdp,
                   help="devices per fsdp group: frozen weights and train state are split over it")
    p.add_argument("--fsdp-min-size", type=cli.POSITIVE, default=RunOptions.fsdp_min_size,
                   help="leaves with fewer elements are not split")
    p.add_argument("--coordinator", default=None, help="multi-host: coordinator address host:port")
    p.add_argument("--num-processes", type=cli.POSITIVE, default=None)
    p.add_argument("--process-id", type=cli.NON_NEGATIVE, default=None)
    p.add_argument("--log-every", type=cli.POSITIVE, default=RunOptions.log_every)
    p.add_argument("--save-every", type=cli.POSITIVE, default=RunOptions.save_every)
    p.add_argument("--keep", type=cli.POSITIVE, default=RunOptions.keep, help="checkpoints to keep")
    p.add_argument("--sample-every", type=cli.NON_NEGATIVE, default=RunOptions.sample_every,
                   help="write a sample grid every N steps (0: off)")
    p.add_argument("--seed", type=cli.SEED, default=None)
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --out, with its config for the flags not given")
    p.add_argument("--override", action="store_true",
                   help="with --resume: given flags win over the stored config (a warning, not an error)")
    p.add_argument("--cache-dir", type=Path, default=None, help="persistent compilation cache folder")
    p.add_argument("--out", type=Path, required=True, help="run folder (new, or one of e4t-pretrain's)")
    args = p.parse_args(argv)
    if not args.resume and missing_flags(args):  # a resume may take them from its checkpoint
        p.error(missing_flags(args))
    if args.crop_scale is not None and args.crop_scale[0] > args.crop_scale[1]:
        p.error(f"--crop-scale MIN {args.crop_scale[0]} is above MAX {args.crop_scale[1]}")
    if args.process_id is not None and args.num_processes is not None and args.process_id >= args.num_processes:
        p.error(f"--process-id {args.process_id} must be below --num-processes {args.num_processes}")
    return args


def missing_flags(args: argparse.Namespace) -> str | None:
    """What a run without a preset (or a stored config) lacks, as an error message; None if nothing."""
    missing = [name for name in REQUIRED_WITHOUT_PRESET if args.preset is None and getattr(args, name) is None]
    return f"missing {', '.join('--' + m.replace('_', '-') for m in missing)} (or pass --preset)" if missing else None


def build_config(args: argparse.Namespace, stored=None):
    """The run's :class:`e4t_jax.recipes.pretrain.PretrainConfig`: the given flags over a base.

    The base is ``stored`` (a resumed run's config), else the preset, else the defaults.
    The flags are set in the base's dict, so the config is checked once, with all of them.

    Raises:
      ValueError: a config that cannot work (e.g. a decaying schedule's warm-up not below the steps).
    """
    from e4t_jax import config as config_lib
    from e4t_jax.recipes.pretrain import PRESETS, PretrainConfig

    tree = config_lib.to_dict(stored or (PRESETS[args.preset] if args.preset else PretrainConfig()))
    for flag, paths in CONFIG_FLAGS.items():
        value = getattr(args, flag)
        for path in paths if value is not None else ():
            *parents, name = path.split(".")
            functools.reduce(dict.__getitem__, parents, tree)[name] = str(value) if isinstance(value, Path) else value
    return config_lib.from_dict(PretrainConfig, tree)


@cli.main_wrapper
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from e4t_jax.recipes import pretrain

    options = pretrain.RunOptions(out=args.out, resume=args.resume, dtype=args.dtype, remat=args.remat,
                                  devices_per_host=args.devices_per_host, fsdp=args.fsdp,
                                  fsdp_min_size=args.fsdp_min_size, log_every=args.log_every,
                                  save_every=args.save_every, keep=args.keep, sample_every=args.sample_every,
                                  variant=args.variant, override=args.override, grad_accum=args.grad_accum,
                                  export_ema=args.export_ema)
    stored = pretrain.stored_config(options) if args.resume else None
    if stored is None and missing_flags(args):
        raise UserError(f"{missing_flags(args)}: --resume found no checkpoint in {options.checkpoint_dir()}")
    if stored is not None and args.preset:
        log.info("resuming: the stored config takes the place of --preset %s", args.preset)
    try:
        config = build_config(args, stored)
    except ValueError as error:  # e.g. steps or batch size below 1
        raise UserError(str(error)) from error
    pretrain.check(config, options, names=FLAG_NAMES)
    cli.reexec_with_fast_malloc()
    from e4t_jax import runtime
    from e4t_jax.training import parallel

    parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    runtime.enable_compilation_cache(args.cache_dir)
    encoder = pretrain.pretrain(config, options)
    log.info("done: %s", encoder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
