"""The E4T demo: personalize from one photo and generate, with no download.

Runs on the embedded tiny model (:mod:`e4t_jax.presets`), a tiny domain encoder built
in seconds, and the astronaut photo that scikit-image ships (Eileen Collins, NASA). The
tiny model has random weights: the demo shows the mechanics end to end (tuning, the
concept file, generation with ``S*``), not image quality.

    e4t-demo --out demo/
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from e4t_jax import cli

log = logging.getLogger("e4t.demo")
PROMPTS = ("a photo of S*", "an oil painting of S*", "S* on the beach", "a pencil sketch of S*")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="e4t-demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("e4t-demo"), help="output folder")
    p.add_argument("--steps", type=int, default=15, help="personalization steps")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--cache-dir", type=Path, default=None, help="persistent compilation cache folder")
    return p.parse_args(argv)


@cli.main_wrapper
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cli.reexec_with_fast_malloc()
    import skimage.data
    from PIL import Image

    from e4t_jax import presets, runtime
    from e4t_jax.e4t.pretrained import preset_encoder_dir
    from e4t_jax.recipes.generate import generate_files
    from e4t_jax.recipes.personalize import personalize_file
    from e4t_jax.training.config import OptimizerConfig, TrainConfig

    start = time.perf_counter()
    runtime.enable_compilation_cache(args.cache_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    photo = args.out / "astronaut.png"
    Image.fromarray(skimage.data.astronaut()).save(photo)
    log.info("[1/3] tiny model and domain encoder (built once, cached)")
    presets.preset_dir("tiny")
    encoder = preset_encoder_dir("tiny", "face")
    log.info("[2/3] personalizing on %s", photo)
    concept = args.out / "astronaut.safetensors"
    train = TrainConfig(steps=args.steps, batch_size=args.batch_size, optimizer=OptimizerConfig(lr=1e-3))
    personalize_file("tiny", encoder, photo, concept, train=train, preview_prompts=())
    log.info("[3/3] generating with the concept")
    generate_files("tiny", PROMPTS, args.out / "images", concepts=[concept], num_steps=20)
    log.info("done in %.0fs: %s", time.perf_counter() - start, args.out / "images" / "grid.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
