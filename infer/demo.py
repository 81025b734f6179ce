"""The E4T demo: personalize from one image and generate, with no download.

Runs on the trained ``digits`` preset shipped in the package (a small Stable Diffusion
of 16x16 coloured handwritten digits and its pre-trained domain encoder, trained on
this project's 2-core CPU; see :mod:`e4t_jax.presets`). It renders one HELD-OUT digit,
a digit that no model ever trained on, personalizes on that one image, and draws it
with prompts that ask for new colours and positions.

    e4t-demo --out demo/

Writes ``OUT/input.png`` (the image), ``OUT/concept.safetensors``, ``OUT/images/``
(one PNG per prompt) and ``OUT/grid.png`` (input first, then one picture per prompt,
enlarged 8x with the prompt beneath). ``OUT`` must be new, empty, or a folder this demo
wrote (run again, it replaces its own files); anything else is refused.
"""
from __future__ import annotations

import argparse
import logging
import textwrap
import time
from pathlib import Path

from e4t_jax import cli

log = logging.getLogger("e4t.demo")
WRITES = frozenset({"input.png", "concept.safetensors", "images", "grid.png"})  # what OUT holds
# (digit colour, background, position) of each generated picture.
ASKED = (("red", "white", "left"), ("yellow", "blue", "right"), ("green", "black", "center"),
         ("white", "purple", "left"), ("blue", "yellow", "center"), ("orange", "black", "right"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from e4t_jax.digits import NUM_DIGITS, NUM_TRAIN

    p = cli.ArgumentParser(prog="e4t-demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("e4t-demo"), help="output folder (new, or one this demo wrote)")
    p.add_argument("--digit", type=cli.integer(0, NUM_DIGITS - 1), default=NUM_TRAIN,
                   help=f"which of the {NUM_DIGITS:,} digits to personalize on ({NUM_TRAIN}-{NUM_DIGITS - 1} are "
                        "held out from all training)")
    p.add_argument("--seed", type=cli.SEED, default=0)
    p.add_argument("--cache-dir", type=Path, default=None, help="persistent compilation cache folder")
    return p.parse_args(argv)


def labelled_grid(images, captions, scale: int = 8):
    """``uint8 [N, h, w, 3]`` pictures in a row, enlarged (nearest), each with its caption beneath."""
    from PIL import Image, ImageDraw

    from e4t_jax.digits import upscale

    cell, text = images.shape[1] * scale, 28
    grid = Image.new("RGB", (len(images) * (cell + 4) + 4, cell + text + 8), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, caption) in enumerate(zip(images, captions)):
        x = 4 + i * (cell + 4)
        grid.paste(Image.fromarray(upscale(image, scale)), (x, 4))
        for line, words in enumerate(textwrap.wrap(caption, width=cell // 6)[:2]):
            draw.text((x, cell + 6 + 11 * line), words, fill="black")
    return grid


@cli.main_wrapper
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from e4t_jax import files

    files.check_folder(args.out, WRITES, "e4t-demo")
    cli.reexec_with_fast_malloc()
    import numpy as np
    from PIL import Image

    from e4t_jax import digits, runtime
    from e4t_jax.recipes.generate import generate_files
    from e4t_jax.recipes.personalize import personalize_file

    start = time.perf_counter()
    runtime.enable_compilation_cache(args.cache_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    glyphs, labels = digits.load_glyphs()
    attributes = digits.random_attributes(np.random.default_rng(args.seed + args.digit))
    image = digits.render(glyphs[args.digit], attributes)
    Image.fromarray(image).save(args.out / "input.png")
    held = "held out" if args.digit >= digits.NUM_TRAIN else "from the TRAINING split"
    log.info("[1/3] digit %d (a %d, %s): %s", args.digit, labels[args.digit], held,
             digits.attribute_prompt("digit", attributes.color, attributes.background, attributes.position))
    concept = args.out / "concept.safetensors"
    log.info("[2/3] personalizing the digits preset on %s", args.out / "input.png")
    personalize_file("digits", None, args.out / "input.png", concept, seed=args.seed, preview_prompts=(),
                     force=True)
    log.info("[3/3] generating with the concept")
    prompts = [digits.attribute_prompt("S*", *asked) for asked in ASKED]
    paths = generate_files("digits", prompts, args.out / "images", concepts=[concept], seed=args.seed, force=True)
    pictures = np.stack([image] + [np.asarray(Image.open(p)) for p in paths])
    labelled_grid(pictures, ["input"] + prompts).save(args.out / "grid.png")
    log.info("done in %.0fs: %s", time.perf_counter() - start, args.out / "grid.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
