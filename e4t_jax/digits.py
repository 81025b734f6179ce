"""The digits mini-domain: real handwritten digits rendered as small colour pictures.

scikit-learn's ``load_digits`` ships 1,797 real 8x8 handwritten digits (values 0-16).
:func:`render` draws one of them on a :data:`CANVAS` x :data:`CANVAS` RGB canvas with a
digit colour, a background colour, a horizontal position and a size; :func:`caption`
describes only those attributes ("a red digit on a blue background, on the left"),
never which digit it is, so a model trained on the captions can learn a digit's
identity only from an image of it: the situation E4T personalization is made for.

The split is fixed: the first :data:`NUM_TRAIN` digits train everything (base model,
vision tower, domain encoder); the last :data:`NUM_HELD_OUT` (297) are held out for
personalization and evaluation, and nothing trains on them.

``python -m e4t_jax.digits --out DIR --renders 16`` writes the training split as PNG
files with caption sidecars (``NAME.txt``, ``{}`` where the concept word goes), the
folder format that ``e4t-pretrain --captions`` reads.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

import numpy as np
from PIL import Image

CANVAS = 16
NUM_DIGITS = 1797
NUM_TRAIN = 1500
NUM_HELD_OUT = NUM_DIGITS - NUM_TRAIN
SIZES = (9, 10, 11)

# Named colours (RGB, uint8) and the words that name them in prompts.
COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 215, 50),
    "white": (245, 245, 245), "black": (20, 20, 20), "purple": (150, 60, 190), "orange": (245, 140, 30),
}
POSITIONS = ("left", "center", "right")
POSITION_PHRASES = {"left": "on the left", "center": "in the center", "right": "on the right"}
# Pairs closer than this (Euclidean RGB distance) are never drawn together: too little contrast.
MIN_CONTRAST = 150.0

# The words of the digits prompts; each is one token of the digits tokenizer.
WORDS = tuple(dict.fromkeys(
    "a an the of on in at with digit number background left right center middle and "
    "photo picture drawing image".split() + list(COLORS)))


def load_glyphs() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits: ``(glyphs float32 [N, 8, 8] in [0, 1], labels int32 [N])``."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.images / 16.0).astype(np.float32), data.target.astype(np.int32)


def split_indices(split: str) -> np.ndarray:
    """Indices of ``train`` (the first 1,500) or ``held_out`` (the last 297) digits."""
    if split == "train":
        return np.arange(NUM_TRAIN)
    if split == "held_out":
        return np.arange(NUM_TRAIN, NUM_DIGITS)
    raise ValueError(f"unknown split {split!r}; choose 'train' or 'held_out'")


def color_pairs() -> list[tuple[str, str]]:
    """Every (digit colour, background colour) pair with enough contrast."""
    rgb = {name: np.asarray(value, np.float32) for name, value in COLORS.items()}
    return [(fg, bg) for fg in COLORS for bg in COLORS
            if fg != bg and np.linalg.norm(rgb[fg] - rgb[bg]) >= MIN_CONTRAST]


@dataclasses.dataclass(frozen=True)
class Attributes:
    """What a caption can say about a render (everything but the digit's identity).

    Attributes:
      color, background: names from :data:`COLORS`.
      position: one of :data:`POSITIONS` (horizontal placement).
      size: side of the digit in pixels, one of :data:`SIZES`.
      row: top row of the digit on the canvas, in ``[0, CANVAS - size]``.
    """

    color: str
    background: str
    position: str
    size: int
    row: int

    def column(self) -> int:
        """Left column of the digit: flush left, centred, or flush right."""
        free = CANVAS - self.size
        return {"left": 0, "center": free // 2, "right": free}[self.position]


def random_attributes(rng: np.random.Generator) -> Attributes:
    """Attributes drawn uniformly: a contrasting colour pair, position, size, row."""
    pairs = color_pairs()
    color, background = pairs[int(rng.integers(len(pairs)))]
    size = int(rng.choice(SIZES))
    return Attributes(color, background, POSITIONS[int(rng.integers(3))], size,
                      int(rng.integers(CANVAS - size + 1)))


def ink(glyph: np.ndarray, attributes: Attributes) -> np.ndarray:
    """The digit's ink on the canvas: float32 ``[CANVAS, CANVAS]`` in [0, 1].

    The 8x8 glyph (``[8, 8]`` in [0, 1], ink = 1) resized bilinearly to
    ``size x size`` and placed at the attributes' row and column.
    """
    size = attributes.size
    glyph_image = Image.fromarray((np.clip(glyph, 0, 1) * 255).astype(np.uint8))
    alpha = np.zeros((CANVAS, CANVAS), np.float32)
    top, left = attributes.row, attributes.column()
    alpha[top:top + size, left:left + size] = np.asarray(
        glyph_image.resize((size, size), Image.Resampling.BILINEAR), np.float32) / 255.0
    return alpha


def render(glyph: np.ndarray, attributes: Attributes) -> np.ndarray:
    """Draws one digit: its :func:`ink` as the alpha of the digit colour over the background.

    Returns:
      ``uint8 [CANVAS, CANVAS, 3]``.
    """
    alpha = ink(glyph, attributes)
    fg = np.asarray(COLORS[attributes.color], np.float32)
    bg = np.asarray(COLORS[attributes.background], np.float32)
    image = bg * (1 - alpha[..., None]) + fg * alpha[..., None]
    return np.round(image).astype(np.uint8)


def caption(attributes: Attributes, rng: np.random.Generator, word: str = "digit") -> str:
    """A prompt that states some of the attributes, with ``word`` for the digit.

    Each attribute is mentioned with probability 0.8, so prompts that name only a
    colour ("a red S*") or only a position are in the distribution too. Pass
    ``word="{}"`` for a template that a placeholder fills later.
    """
    color = f"{attributes.color} " if rng.random() < 0.8 else ""
    background = f" on a {attributes.background} background" if rng.random() < 0.8 else ""
    position = f", {POSITION_PHRASES[attributes.position]}" if rng.random() < 0.8 else ""
    article = "an" if color.startswith("orange") else "a"
    return f"{article} {color}{word}{background}{position}"


def attribute_prompt(word: str, color: str | None = None, background: str | None = None,
                     position: str | None = None) -> str:
    """The prompt for chosen attributes, in the training captions' wording."""
    text = f"{'an' if color == 'orange' else 'a'} {color + ' ' if color else ''}{word}"
    if background:
        text += f" on a {background} background"
    if position:
        text += f", {POSITION_PHRASES[position]}"
    return text


def training_batch(glyphs: np.ndarray, indices: np.ndarray, rng: np.random.Generator,
                   drop_caption: float = 0.1) -> tuple[np.ndarray, list[str]]:
    """Random renders of random ``indices`` with captions (the base model's data).

    Returns:
      ``(pixels float32 [B, CANVAS, CANVAS, 3] in [-1, 1], captions)``; each caption
      is empty with probability ``drop_caption`` (for classifier-free guidance).
    """
    images, captions = [], []
    for i in indices:
        attributes = random_attributes(rng)
        images.append(render(glyphs[i], attributes))
        captions.append("" if rng.random() < drop_caption else caption(attributes, rng))
    return np.stack(images).astype(np.float32) / 127.5 - 1.0, captions


def write_split(out_dir: str | os.PathLike, *, split: str = "train", renders: int = 16, seed: int = 0) -> int:
    """Writes ``renders`` random renders of every digit of ``split`` as PNG + caption.

    Files: ``OUT/DDDD_RR.png`` and ``OUT/DDDD_RR.txt`` (the caption, ``{}`` where the
    placeholder goes). Returns the number of images written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    glyphs, _ = load_glyphs()
    rng = np.random.default_rng(seed)
    count = 0
    for index in split_indices(split):
        for r in range(renders):
            attributes = random_attributes(rng)
            stem = out / f"{index:04d}_{r:02d}"
            Image.fromarray(render(glyphs[index], attributes)).save(stem.with_suffix(".png"))
            stem.with_suffix(".txt").write_text(caption(attributes, rng, word="{}") + "\n")
            count += 1
    return count


def upscale(images: np.ndarray, factor: int = 8) -> np.ndarray:
    """Nearest-neighbour upscaling of ``[..., H, W, C]`` images for display."""
    return np.repeat(np.repeat(images, factor, axis=-3), factor, axis=-2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Render a digits split as PNG files with caption sidecars.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder to write (must not exist)")
    parser.add_argument("--split", choices=["train", "held_out"], default="train")
    parser.add_argument("--renders", type=int, default=16, help="random renders per digit")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.out.exists():
        parser.error(f"{args.out} exists; choose a new folder")
    if args.renders < 1:
        parser.error("--renders must be at least 1")
    print(f"wrote {write_split(args.out, split=args.split, renders=args.renders, seed=args.seed)} "
          f"images to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
