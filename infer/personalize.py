"""Personalize Stable Diffusion from ONE image with a pre-trained E4T domain encoder.

Example::

    e4t-personalize --model stable-diffusion-v1-5/stable-diffusion-v1-5 --encoder runs/faces \
        --image me.jpg --steps 15 --batch-size 16 --out me.safetensors

Tunes the encoder head and the U-Net weight offsets for a few steps on augmented
copies of the image, then writes a small concept file (``v*``, the encoder's offsets and
their tuned change) and a preview grid beside it (``me.preview.png``), and prints a
timing breakdown. Existing outputs are replaced only with ``--force``; an input never is.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from e4t_jax import cli
from e4t_jax.errors import UserError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.ArgumentParser(prog="e4t-personalize", description=__doc__.split("\n\n")[0])
    cli.add_model(p)
    p.add_argument("--encoder", type=Path, default=None,
                   help="pre-trained domain encoder: an e4t-pretrain run folder or its encoder/ (default: a trained "
                        "preset's own)")
    p.add_argument("--image", type=Path, required=True, help="the one image of the concept")
    p.add_argument("--mask", type=str, default=None,
                   help="optional loss mask: an image of the same size (white = the concept), or 'auto' for a face "
                        "mask from dlib's 68 face landmarks (pip install \"e4t-jax[faces]\"; ./auto for a file "
                        "named auto)")
    p.add_argument("--steps", type=cli.POSITIVE, default=None,
                   help="tuning steps (default: the encoder's recorded value)")
    p.add_argument("--batch-size", type=cli.POSITIVE, default=None,
                   help="augmented copies of the image per step (default: the encoder's recorded value)")
    p.add_argument("--lr", type=cli.LEARNING_RATE, default=None,
                   help="learning rate (default: the encoder's recorded value; the paper tunes at ~5e-6 to 1.6e-5)")
    p.add_argument("--tune-encoder", action=argparse.BooleanOptionalAction, default=True,
                   help="tune the encoder head too, or the weight offsets only")
    p.add_argument("--save-encoder", action="store_true", help="also store the tuned encoder head in the concept")
    p.add_argument("--placeholder", default=None, help="placeholder token (default: the encoder's, usually S*)")
    p.add_argument("--clip-vision", default=None, help="vision tower weights (default: the encoder's)")
    p.add_argument("--preview-prompt", action="append", default=None,
                   help="prompt for the preview grid, with {} for the placeholder (repeatable; default: 4 styles)")
    p.add_argument("--preview-steps", type=cli.integer(1, 1000), default=None,
                   help="denoising steps of the preview (default 25)")
    p.add_argument("--no-preview", action="store_true", help="skip the preview grid")
    p.add_argument("--seed", type=cli.SEED, default=0)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute dtype of the frozen model, and the dtype its weights are stored in (bfloat16 halves them)")
    p.add_argument("--grad-accum", type=cli.POSITIVE, default=1,
                   help="micro-batches per step (--batch-size must be a multiple): the same update, less memory")
    p.add_argument("--remat", action="store_true", help="recompute U-Net blocks in the backward pass (less memory)")
    p.add_argument("--cache-dir", type=Path, default=None, help="persistent compilation cache folder")
    p.add_argument("--out", type=Path, required=True,
                   help="concept file to write (.safetensors); the preview goes beside it (NAME.preview.png)")
    p.add_argument("--force", action="store_true", help="replace an existing concept file and preview")
    args = p.parse_args(argv)
    if args.out.suffix != ".safetensors":
        p.error(f"--out {args.out} must end in .safetensors")
    if args.no_preview:
        args.preview_prompt = ()
    return args


@cli.main_wrapper
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cli.reexec_with_fast_malloc()
    if not args.image.is_file():
        raise UserError(f"image {args.image} does not exist")
    from e4t_jax import runtime
    from e4t_jax.recipes.personalize import personalize_file

    runtime.enable_compilation_cache(args.cache_dir)
    personalize_file(args.model, args.encoder, args.image, args.out, steps_count=args.steps, batch_size=args.batch_size,
                     lr=args.lr, seed=args.seed, tune_encoder=args.tune_encoder, save_encoder=args.save_encoder,
                     mask_path=args.mask, placeholder=args.placeholder, vision_source=args.clip_vision,
                     preview_prompts=args.preview_prompt, preview_steps=args.preview_steps, dtype=args.dtype,
                     variant=args.variant, grad_accum=args.grad_accum, remat=args.remat, force=args.force)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
