"""Generate images from text with a Stable Diffusion model (optionally personalized).

Example::

    e4t-generate --model tiny --prompt "a photo of a cat" --num-images 4 --out out/
    e4t-generate --model runwayml/stable-diffusion-v1-5 --prompt "an oil painting of S*" \
        --concept me.safetensors --steps 25 --sampler dpmpp --out out/

Writes one PNG per image, ``grid.png`` and ``prompts.txt``, and prints timings.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from e4t_jax import cli
from e4t_jax.errors import UserError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="e4t-generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="model folder, Hugging Face id, or preset 'tiny' / 'medium'")
    p.add_argument("--prompt", action="append", required=True, help="prompt (repeatable)")
    p.add_argument("--negative-prompt", default="", help="negative prompt for classifier-free guidance")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--steps", type=int, default=25, help="denoising steps")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--sampler", default="ddim", help="ddim, euler or dpmpp (DPM-Solver++ 2M)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, default=None, help="pixels, a multiple of 8 (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="pixels, a multiple of 8 (default: the model's)")
    p.add_argument("--init-latents", type=Path, default=None,
                   help="initial noise as .npy in diffusers' layout [B, C, h, w] (B = prompts x num-images)")
    p.add_argument("--concept", type=Path, action="append", default=[],
                   help="personalized concept file from e4t-personalize (repeatable)")
    p.add_argument("--reencode", action="store_true",
                   help="re-encode the concept image at every denoising step (the concept's tuned head, "
                        "else the --encoder's)")
    p.add_argument("--encoder", type=Path, default=None,
                   help="domain encoder folder whose head --reencode uses when the concept holds none")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype")
    p.add_argument("--cache-dir", type=Path, default=None, help="persistent compilation cache folder")
    p.add_argument("--out", type=Path, default=Path("out"), help="output folder")
    return p.parse_args(argv)


def _validate(args: argparse.Namespace) -> None:
    from e4t_jax.pipeline import SAMPLER_ALIASES

    if args.sampler not in SAMPLER_ALIASES:
        raise UserError(f"unknown sampler '{args.sampler}'; choose ddim, euler or dpmpp")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and (value <= 0 or value % 8):
            raise UserError(f"--{name} {value} is not a positive multiple of 8")
    if args.num_images < 1 or args.steps < 1:
        raise UserError("--num-images and --steps must be at least 1")
    if args.init_latents is not None and not args.init_latents.is_file():
        raise UserError(f"--init-latents {args.init_latents} does not exist")
    for concept in args.concept:
        if not concept.is_file():
            raise UserError(f"concept file {concept} does not exist")
    if args.reencode and not args.concept:
        raise UserError("--reencode needs --concept")


@cli.main_wrapper
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _validate(args)
    cli.reexec_with_fast_malloc()
    from e4t_jax import runtime
    from e4t_jax.recipes.generate import generate_files

    runtime.enable_compilation_cache(args.cache_dir)
    generate_files(args.model, args.prompt, args.out, concepts=args.concept, negative_prompt=args.negative_prompt,
                   num_images=args.num_images, init_latents=args.init_latents, reencode=args.reencode,
                   encoder=args.encoder, dtype=args.dtype, seed=args.seed, num_steps=args.steps,
                   guidance=args.guidance, sampler=args.sampler, height=args.height, width=args.width)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
