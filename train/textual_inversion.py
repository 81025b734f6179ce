"""Textual Inversion (the paper's baseline): learn one word embedding from 1-N images.

Example::

    e4t-ti --model stable-diffusion-v1-5/stable-diffusion-v1-5 --data photos/cat --init-word cat \
        --steps 3000 --out cat.safetensors

Trains the placeholder's embedding alone (the model stays frozen) on random crops and
flips of the images with the init word's prompt templates, then writes a concept file
without weight offsets (``e4t-generate --concept cat.safetensors``) and the same vector
for diffusers beside it (``cat.learned_embeds.safetensors``, for
``pipe.load_textual_inversion(path, token="S*")``). Existing outputs are replaced only
with ``--force``; an input never is.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from e4t_jax import cli


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from e4t_jax.recipes.textual_inversion import DEFAULT_TRAIN

    p = cli.ArgumentParser(prog="e4t-ti", description=__doc__.split("\n\n")[0])
    cli.add_model(p)
    p.add_argument("--data", type=Path, required=True,
                   help="folder of 1-N images of the concept (searched recursively)")
    p.add_argument("--placeholder", default="S*", help="the new token that prompts use for the concept")
    p.add_argument("--init-word", required=True,
                   help="one token the embedding starts from (the coarse class: cat, face, painting); its domain's "
                        "prompt templates are used")
    p.add_argument("--steps", type=cli.POSITIVE, default=DEFAULT_TRAIN.steps, help="optimizer steps")
    p.add_argument("--batch-size", type=cli.POSITIVE, default=DEFAULT_TRAIN.batch_size,
                   help="augmented images per step")
    p.add_argument("--lr", type=cli.LEARNING_RATE, default=DEFAULT_TRAIN.optimizer.lr, help="AdamW learning rate")
    p.add_argument("--seed", type=cli.SEED, default=0)
    p.add_argument("--cache-dir", type=Path, default=None, help="persistent compilation cache folder")
    p.add_argument("--out", type=Path, required=True,
                   help="concept file to write (.safetensors); the diffusers embedding goes beside it "
                        "(NAME.learned_embeds.safetensors)")
    p.add_argument("--force", action="store_true", help="replace the outputs of an earlier run")
    args = p.parse_args(argv)
    if args.out.suffix != ".safetensors":
        p.error(f"--out {args.out} must end in .safetensors")
    return args


@cli.main_wrapper
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cli.reexec_with_fast_malloc()
    import dataclasses

    from e4t_jax import runtime
    from e4t_jax.recipes.textual_inversion import DEFAULT_TRAIN, learn_file

    runtime.enable_compilation_cache(args.cache_dir)
    train = dataclasses.replace(DEFAULT_TRAIN, steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                                optimizer=dataclasses.replace(DEFAULT_TRAIN.optimizer, lr=args.lr))
    learn_file(args.model, args.data, args.out, init_word=args.init_word, placeholder=args.placeholder, train=train,
               variant=args.variant, force=args.force)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
