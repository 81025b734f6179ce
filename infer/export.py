"""Export a personalized concept for PyTorch / diffusers users.

Example::

    e4t-export --concept me.safetensors --model stable-diffusion-v1-5/stable-diffusion-v1-5 --out me-diffusers/
    e4t-export --concept me.safetensors --model tiny --out me-pipeline/ --full-pipeline

Writes the textual-inversion embedding (``learned_embeds.safetensors``), the base U-Net
with the concept's weight offsets merged in (``unet/``), ``e4t_concept.json`` and a
``README.md``; with ``--full-pipeline`` a complete diffusers pipeline folder (see
:mod:`e4t_jax.e4t.export`). Nothing is left in ``--out`` when it fails.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from e4t_jax import cli
from e4t_jax.errors import UserError

log = logging.getLogger("e4t.export")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from e4t_jax.e4t.export import DTYPES

    p = cli.ArgumentParser(prog="e4t-export", description=__doc__.split("\n\n")[0])
    p.add_argument("--concept", type=Path, required=True, help="concept file from e4t-personalize")
    cli.add_model(p, "the base model the concept was personalized on: folder, Hugging Face id, or preset")
    p.add_argument("--out", type=Path, required=True, help="output folder (new or empty)")
    p.add_argument("--full-pipeline", action="store_true",
                   help="also copy the base model's other components: a complete diffusers pipeline folder")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the merged U-Net weights")
    p.add_argument("--force", "--overwrite", dest="force", action="store_true",
                   help="replace an earlier export in --out")
    return p.parse_args(argv)


@cli.main_wrapper
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.concept.is_file():
        raise UserError(f"concept file {args.concept} does not exist")
    from e4t_jax.e4t.export import EMBEDDING_FILE, export_concept

    out = export_concept(args.concept, args.model, args.out, full_pipeline=args.full_pipeline, dtype=args.dtype,
                         force=args.force, variant=args.variant)
    log.info("wrote %s (%s)", out, "a full diffusers pipeline" if args.full_pipeline else f"unet/ and {EMBEDDING_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
