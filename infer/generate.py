"""Generate images from text with a Stable Diffusion model (optionally personalized).

Example::

    e4t-generate --model tiny --prompt "a photo of a cat" --num-images 4 --out out/
    e4t-generate --model stable-diffusion-v1-5/stable-diffusion-v1-5 --prompt "an oil painting of S*" \
        --concept me.safetensors --steps 25 --sampler dpmpp --out out/

Writes one PNG per image, ``grid.png`` and ``prompts.txt`` into ``--out`` (refusing to
replace any of them without ``--force``), and prints timings.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from e4t_jax import cli
from e4t_jax.errors import UserError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.ArgumentParser(prog="e4t-generate", description=__doc__.split("\n\n")[0])
    cli.add_model(p)
    p.add_argument("--prompt", action="append", required=True, help="prompt (repeatable)")
    p.add_argument("--negative-prompt", default="", help="negative prompt for classifier-free guidance")
    p.add_argument("--num-images", type=cli.POSITIVE, default=1, help="images per prompt")
    p.add_argument("--steps", type=cli.integer(1, 1000), default=25, help="denoising steps")
    p.add_argument("--guidance", type=cli.number(0), default=7.5, help="classifier-free guidance scale")
    p.add_argument("--sampler", choices=["ddim", "euler", "dpmpp"], default="ddim",
                   help="sampler (dpmpp: DPM-Solver++ 2M)")
    p.add_argument("--seed", type=cli.SEED, default=0)
    p.add_argument("--height", type=cli.PIXELS, default=None, help="pixels, a multiple of 8 (default: the model's)")
    p.add_argument("--width", type=cli.PIXELS, default=None, help="pixels, a multiple of 8 (default: the model's)")
    p.add_argument("--init-latents", type=Path, default=None,
                   help="initial noise as .npy in diffusers' layout [B, C, h, w] (B = prompts x num-images; "
                        "[B, h, w, C] is read too)")
    p.add_argument("--concept", type=Path, action="append", default=[],
                   help="personalized concept file from e4t-personalize (repeatable: concepts of one domain "
                        "encoder, each with its own placeholder)")
    p.add_argument("--reencode", action="store_true",
                   help="re-encode the concept image at every denoising step (the concept's tuned head, "
                        "else the --encoder's)")
    p.add_argument("--encoder", type=Path, default=None,
                   help="domain encoder (or e4t-pretrain run folder) whose head --reencode uses when the concept "
                        "holds none")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute dtype of the frozen model, and the dtype its weights are stored in (bfloat16 halves them)")
    p.add_argument("--cache-dir", type=Path, default=None, help="persistent compilation cache folder")
    p.add_argument("--out", type=Path, default=Path("out"), help="output folder")
    p.add_argument("--force", action="store_true", help="replace images that --out already holds")
    return p.parse_args(argv)


def _validate(args: argparse.Namespace) -> None:
    if args.init_latents is not None and not args.init_latents.is_file():
        raise UserError(f"--init-latents {args.init_latents} does not exist")
    for concept in args.concept:
        if not concept.is_file():
            raise UserError(f"concept file {concept} does not exist")
    if args.reencode and not args.concept:
        raise UserError("--reencode needs --concept")
    if args.encoder is not None:
        from e4t_jax.e4t.pretrained import encoder_folder

        encoder_folder(args.encoder)
    from e4t_jax.recipes.generate import check_out

    check_out(args.out, len(args.prompt) * args.num_images,
              [*args.concept, args.init_latents, args.encoder, args.model], args.force)


@cli.main_wrapper
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cli.reexec_with_fast_malloc()
    _validate(args)
    from e4t_jax import runtime
    from e4t_jax.recipes.generate import generate_files

    runtime.enable_compilation_cache(args.cache_dir)
    generate_files(args.model, args.prompt, args.out, concepts=args.concept, negative_prompt=args.negative_prompt,
                   num_images=args.num_images, init_latents=args.init_latents, reencode=args.reencode,
                   encoder=args.encoder, dtype=args.dtype, seed=args.seed, variant=args.variant, force=args.force,
                   num_steps=args.steps, guidance=args.guidance, sampler=args.sampler, height=args.height,
                   width=args.width)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
