"""Reading a digits picture back: which digit, which colours, where (from the pixels alone).

Rendering (:func:`e4t_jax.digits.render`) is inverted without any learned model:

* the background colour is the median of the border pixels;
* the ink colour is the mean of the pixels farthest from the background;
* each pixel's ink amount (alpha) is its projection on the background -> ink line;
* the glyph is the alpha cropped to its ink bounding box and resized to 8x8, then
  scaled to unit norm: a feature that ignores colour, position and size.

:class:`DigitReader` classifies that feature with an SVM trained on renders of the
training split only, names the colours by the nearest entry of
:data:`e4t_jax.digits.COLORS`, and the position by the bounding box's centre.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from e4t_jax import digits

GLYPH = 8


@dataclasses.dataclass(frozen=True)
class Reading:
    """What one picture shows. ``glyph``: unit-norm float32 ``[64]`` ink feature."""

    color: str
    background: str
    position: str
    glyph: np.ndarray
    has_ink: bool


def _nearest_color(rgb: np.ndarray) -> str:
    names = list(digits.COLORS)
    table = np.asarray([digits.COLORS[n] for n in names], np.float32)
    return names[int(np.argmin(np.linalg.norm(table - rgb, axis=-1)))]


def read(image: np.ndarray) -> Reading:
    """Inverts one render.

    Args:
      image: ``uint8 [H, W, 3]`` (or float in [0, 1]); any size, read at its own scale.
    """
    pixels = np.asarray(image, np.float32)
    if pixels.max() <= 1.0:
        pixels = pixels * 255.0
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    distance = np.linalg.norm(pixels - background, axis=-1)
    far = distance >= 0.7 * distance.max()
    ink = pixels[far].mean(axis=0)
    direction = ink - background
    span = float(np.dot(direction, direction))
    if span < 40.0 ** 2:  # no visible ink: a flat picture
        return Reading(_nearest_color(ink), _nearest_color(background), "center",
                       np.zeros(GLYPH * GLYPH, np.float32), False)
    alpha = np.clip((pixels - background) @ direction / span, 0.0, 1.0)
    rows, cols = np.nonzero(alpha > 0.25)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    crop = Image.fromarray(alpha[top:bottom, left:right].astype(np.float32), mode="F")
    glyph = np.asarray(crop.resize((GLYPH, GLYPH), Image.Resampling.BILINEAR), np.float32).reshape(-1)
    glyph = glyph / max(float(np.linalg.norm(glyph)), 1e-6)
    centre = (left + right) / 2 * digits.CANVAS / pixels.shape[1]
    third = digits.CANVAS / 2
    position = "left" if centre < third - 1.25 else "right" if centre > third + 1.25 else "center"
    return Reading(_nearest_color(ink), _nearest_color(background), position, glyph, True)


def reference_glyph(glyph: np.ndarray) -> np.ndarray:
    """The feature of a digit itself: white on black, centred, middle size."""
    attributes = digits.Attributes("white", "black", "center", digits.SIZES[len(digits.SIZES) // 2], 3)
    return read(digits.render(glyph, attributes)).glyph


class DigitReader:
    """A digit classifier on :func:`read` glyph features, trained on the training split.

    Args:
      renders: random renders per training digit to fit on.
      seed: seed of those renders.
    """

    def __init__(self, renders: int = 4, seed: int = 0):
        from sklearn.svm import SVC

        glyphs, labels = digits.load_glyphs()
        features, targets = self._renders(glyphs, labels, digits.split_indices("train"), renders, seed)
        self.svm = SVC(C=10.0, gamma="scale").fit(features, targets)

    @staticmethod
    def _renders(glyphs, labels, indices, renders, seed):
        rng = np.random.default_rng(seed)
        features, targets = [], []
        for i in indices:
            for _ in range(renders):
                features.append(read(digits.render(glyphs[i], digits.random_attributes(rng))).glyph)
                targets.append(labels[i])
        return np.stack(features), np.asarray(targets)

    def classify(self, readings: list[Reading]) -> np.ndarray:
        """Digit labels ``int [N]``; -1 where a picture has no ink."""
        labels = self.svm.predict(np.stack([r.glyph for r in readings]))
        return np.where([r.has_ink for r in readings], labels, -1)

    def held_out_accuracy(self, renders: int = 2, seed: int = 1) -> float:
        """Accuracy on random renders of the held-out digits (what the classifier never saw)."""
        glyphs, labels = digits.load_glyphs()
        features, targets = self._renders(glyphs, labels, digits.split_indices("held_out"), renders, seed)
        return float(np.mean(self.svm.predict(features) == targets))


def instance_rank(glyph: np.ndarray, reference: int, candidates: np.ndarray) -> int:
    """Rank (0 = nearest) of the reference digit among candidates by cosine similarity.

    Args:
      glyph: ``[64]`` feature of a generated picture.
      reference: row of ``candidates`` that holds the input digit's feature.
      candidates: ``[N, 64]`` unit-norm features (e.g. every held-out digit's
        :func:`reference_glyph`).
    """
    similarity = candidates @ glyph
    return int(np.sum(similarity > similarity[reference]))
