"""Generate images from text with a Stable Diffusion model (optionally personalized).

Example::

    e4t-generate --model tiny --prompt "a photo of a cat" --num-images 4 --out out/
    e4t-generate --model runwayml/stable-diffusion-v1-5 --prompt "an oil painting of S*" \
        --concept me.safetensors --steps 25 --sampler dpmpp --out out/

Writes one PNG per image, ``grid.png`` and ``prompts.txt``, and prints timings.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
from PIL import Image

from e4t_jax import cli

log = logging.getLogger("e4t.generate")


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
        raise cli.UserError(f"unknown sampler '{args.sampler}'; choose ddim, euler or dpmpp")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and (value <= 0 or value % 8):
            raise cli.UserError(f"--{name} {value} is not a positive multiple of 8")
    if args.num_images < 1 or args.steps < 1:
        raise cli.UserError("--num-images and --steps must be at least 1")
    if args.init_latents is not None and not args.init_latents.is_file():
        raise cli.UserError(f"--init-latents {args.init_latents} does not exist")
    for concept in args.concept:
        if not concept.is_file():
            raise cli.UserError(f"concept file {concept} does not exist")
    if args.reencode and not args.concept:
        raise cli.UserError("--reencode needs --concept")


def save_images(images_uint8: np.ndarray, prompts: list[str], out: Path) -> list[Path]:
    """Writes ``000.png``..., ``grid.png`` and ``prompts.txt`` into ``out``; returns the image paths."""
    from e4t_jax.pipeline import image_grid

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images_uint8):
        paths.append(out / f"{i:03d}.png")
        Image.fromarray(image).save(paths[-1])
    Image.fromarray(image_grid(images_uint8)).save(out / "grid.png")
    (out / "prompts.txt").write_text("".join(f"{p.name}\t{prompt}\n" for p, prompt in zip(paths, prompts)))
    return paths


def _reencoding(loaded, args: argparse.Namespace, model, params, tokenizer):
    """The concept with per-step re-encoding: its own tuned head, else the --encoder's."""
    from e4t_jax.e4t import concept as concept_lib

    head, encoder_config = loaded.head, loaded.header.get("encoder")
    if head is None:
        if args.encoder is None:
            raise cli.UserError(f"--reencode: {loaded.placeholder}'s concept holds no tuned encoder head "
                                "(personalize with --save-encoder) and no --encoder was given")
        from e4t_jax.training.checkpoint import load_encoder

        head, _, config = load_encoder(args.encoder, expected=concept_lib.model_identity(model))
        encoder_config = config["encoder"]
    return concept_lib.with_reencoding(loaded, head_params=head, encoder_config=encoder_config,
                                       text_params=params["text"], tokenizer=tokenizer, seed=args.seed)


@cli.main_wrapper
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _validate(args)
    cli.reexec_with_fast_malloc()
    cli.enable_compilation_cache(args.cache_dir)
    import jax.numpy as jnp

    from e4t_jax import pipeline
    from e4t_jax.e4t import concept as concept_lib

    timings = {}
    start = time.perf_counter()
    model, params, tokenizer = pipeline.load_model(args.model, dtype=jnp.dtype(args.dtype))
    prompts = [p for p in args.prompt for _ in range(args.num_images)]
    try:  # a foreign concept file (ConceptError) or a prompt without the placeholder
        loaded = [concept_lib.load_concept(path, model, tokenizer) for path in args.concept]
        placeholders = [c.placeholder for c in loaded]
        for prompt in prompts:  # each prompt must name at least one of the concepts
            if placeholders and not any(token in prompt for token in placeholders):
                tokenizer.require_placeholder([prompt], " or ".join(placeholders))
        concepts = [_reencoding(c, args, model, params, tokenizer) if args.reencode else c.concept for c in loaded]
    except ValueError as e:
        raise cli.UserError(str(e)) from e
    timings["load"] = time.perf_counter() - start

    latents = None
    if args.init_latents is not None:
        latents = np.load(args.init_latents)
        if latents.ndim != 4:
            raise cli.UserError(f"--init-latents must hold a [B, C, h, w] array; got shape {latents.shape}")
        latents = latents.transpose(0, 2, 3, 1)
    cond = tokenizer.encode(prompts)
    uncond = tokenizer.encode([args.negative_prompt] * len(prompts))
    generator = pipeline.Generator(model)
    kwargs = dict(seed=args.seed, latents=latents, height=args.height, width=args.width, num_steps=args.steps,
                  guidance=args.guidance, sampler=args.sampler, concepts=tuple(concepts))
    try:
        start = time.perf_counter()
        generator.compile(params, cond, uncond, **kwargs)
        timings["compile"] = time.perf_counter() - start
        start = time.perf_counter()
        images = generator(params, cond, uncond, **kwargs)
        timings["sample"] = time.perf_counter() - start
    except ValueError as e:
        raise cli.UserError(str(e)) from e
    paths = save_images(pipeline.to_uint8(images), prompts, args.out)
    log.info("wrote %d images and %s", len(paths), args.out / "grid.png")
    log.info("timings: " + ", ".join(f"{k} {v:.2f}s" for k, v in timings.items())
             + f" ({len(images) / timings['sample']:.2f} images/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
