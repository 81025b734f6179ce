"""The mini-domain experiment: does E4T personalize from one image, and how does it compare?

For held-out digits that nothing trained on (5 per class by default), each method gets
ONE render of the digit and must then draw that digit in new colours and positions:

* ``domain word``: the prompt says "digit" instead of ``S*`` (no personalization);
* ``TI-15/100/500``: Textual Inversion, snapshots of one 500-step run;
* ``E4T-5/15``: the pre-trained domain encoder, tuned 5 and 15 steps.

Every image is read back from its pixels (:mod:`e4t_jax.eval.digits`):

* identity: the digit classifier (trained on the training split) agrees with the
  input's true label (chance 0.1);
* instance top-5: the input digit is among the 5 held-out digits (of 297) whose glyph
  is most similar to the generated one (chance 0.017): same instance, not just class;
* prompt fidelity: the asked digit colour, background colour and position appear.

Wall time per concept is measured on one concept at a time, with compilation (the
first concept) and without (the median of the others). TI's quality numbers come
from runs that learn ``--ti-group`` concepts side by side in one batched step (each
embedding gets exactly its own gradient); its time is measured alone.

    python bench/minidomain.py --model runs/digits/model --encoder runs/digits-e4t/encoder

writes ``bench/results/minidomain.json``, ``bench/results/minidomain.md`` and the figure
``bench/results/minidomain.png`` (a row per concept: input, domain word, TI-15, TI-500,
E4T-5, E4T-15).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

PROMPTS = (  # (digit colour, background, position) asked for; None = not asked
    ("green", None, None),
    ("yellow", "blue", "left"),
    ("white", "red", "right"),
    ("black", "white", "center"),
)
TEMPLATES = ("a {}", "a picture of a {}", "a drawing of a {}")  # personalization prompts: the image only
COLUMNS = ("input", "domain word", "TI-15", "TI-500", "E4T-5", "E4T-15")


def choose_concepts(per_class: int) -> np.ndarray:
    """The first ``per_class`` held-out digits of each class, in class order."""
    from e4t_jax import digits

    _, labels = digits.load_glyphs()
    held_out = digits.split_indices("held_out")
    return np.concatenate([held_out[labels[held_out] == c][:per_class] for c in range(10)])


def input_render(index: int) -> tuple[np.ndarray, object]:
    """The one image a method gets: the digit with attributes seeded by its index."""
    from e4t_jax import digits

    glyphs, _ = digits.load_glyphs()
    attributes = digits.random_attributes(np.random.default_rng(10_000 + int(index)))
    return digits.render(glyphs[index], attributes), attributes


def score(images: np.ndarray, label: int, reference: int, asked: list[tuple], reader, candidates) -> dict:
    """Per-image metrics of one (concept, method) cell, averaged.

    Args:
      images: ``uint8 [N, 16, 16, 3]``, prompt-major (``asked[i % len(asked)]``).
      label: the input digit's class; reference: its row in ``candidates``.
    """
    from e4t_jax.eval import digits as reading

    readings = [reading.read(image) for image in images]
    predicted = reader.classify(readings)
    ranks = np.asarray([reading.instance_rank(r.glyph, reference, candidates) for r in readings])
    hits = {"color": [], "background": [], "position": []}
    for i, r in enumerate(readings):
        color, background, position = asked[i % len(asked)]
        for name, want, got in (("color", color, r.color), ("background", background, r.background),
                                ("position", position, r.position)):
            if want is not None:
                hits[name].append(want == got)
    return {"identity": float(np.mean(predicted == label)), "instance_top5": float(np.mean(ranks < 5)),
            **{name: float(np.mean(v)) for name, v in hits.items()}}


def markdown_table(summary: dict) -> str:
    """The results table (one row per method)."""
    head = ("| method | steps | identity | instance top-5 | colour | background | position | "
            "s/concept (compile incl.) | s/concept (warm) | artifact |")
    lines = [head, "|" + "---|" * 10]
    for name, row in summary.items():
        lines.append(f"| {name} | {row['steps']} | {row['identity']:.2f} | {row['instance_top5']:.2f} | "
                     f"{row['color']:.2f} | {row['background']:.2f} | {row['position']:.2f} | "
                     f"{row['seconds_first']:.1f} | {row['seconds_warm']:.2f} | {row['artifact']} |")
    return "\n".join(lines)


def figure(rows: list[list[np.ndarray]], path: Path, scale: int = 6) -> None:
    """A row per concept, a column per method (:data:`COLUMNS`), labelled, upscaled."""
    from PIL import Image, ImageDraw

    from e4t_jax import digits

    cell, pad, header = digits.CANVAS * scale, 4, 18
    width = len(COLUMNS) * (cell + pad) + pad
    canvas = Image.new("RGB", (width, header + len(rows) * (cell + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(COLUMNS):
        draw.text((pad + c * (cell + pad) + 2, 3), name, fill="black")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            canvas.paste(Image.fromarray(digits.upscale(image, scale)),
                         (pad + c * (cell + pad), header + pad + r * (cell + pad)))
    canvas.save(path)
