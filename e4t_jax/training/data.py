"""Input pipeline for domain pre-training: image folders -> augmented batches + prompts.

Also the single-image batches of personalization (:func:`augmented_batch`) and the
prompt templates of each domain (:func:`templates_for_domain`).

Built on grain: a random-access ``MapDataset`` over the files of this host's shard,
shuffled per epoch, repeated, decoded and augmented in background threads
(``ReadOptions``; optionally worker processes with ``mp_prefetch``), then filtered and
batched. Every batch is a dict::

    {"pixels": float32 [B, size, size, 3] in [-1, 1],
     "prompt": numpy str array [B]}      # a template formatted with the placeholder

Exact resume: the iterator's ``get_state()`` (see :func:`dataset_state`) is a small
JSON-able dict of positions in the shuffled, repeated index space. The augmentation
and the template of an element are drawn from a numpy Generator seeded by (shard
seed, element index), where the index counts epochs (``epoch * n_files + i``), so a
restored iterator reproduces the data exactly, whatever threads or workers read it.

Images are decoded by :func:`decode_image`, the one reader of user images (pre-training
and personalization): any PIL mode (16-bit, CMYK, palette, alpha composited on white),
EXIF orientation applied, the first frame of an animation; a file over
:data:`MAX_IMAGE_PIXELS` is refused from its header, before any pixel is decoded.

Unreadable images: decoding happens before the filter, and an unreadable file is
replaced by a marker that the filter drops (logging ``skipped unreadable image PATH``
once per file and recording it in :class:`SkipStats`). Skipping shifts no seeds and
no positions: it depends only on the files' contents, so a resumed run skips the same
files at the same places, as long as the folder is unchanged. A batch is filled with
the next readable images, so batches stay full. A restored iterator's stats start
empty and count only the files it meets itself.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import struct
import zlib
from pathlib import Path
from typing import Any, Protocol, Sequence

from absl import flags
import grain
import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")

#: The largest image decoded, in pixels (width x height, after a JPEG's reduced-scale
#: draft): 2**26, e.g. 8192 x 8192, 192 MiB as uint8 RGB. Checked on the file's header,
#: whatever PIL's own ``Image.MAX_IMAGE_PIXELS`` is set to (PIL warns from its default,
#: about 89M pixels, and refuses from twice that while opening the file).
MAX_IMAGE_PIXELS = 2**26

# What PIL and its plugins raise on a damaged or hostile file.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, KeyError, struct.error, zlib.error,
                  Image.DecompressionBombError)

PROMPT_TEMPLATES: dict[str, list[str]] = {
    "generic": [
        "a photo of {}", "a close-up photo of {}", "a cropped photo of {}", "a good photo of {}",
        "a bright photo of {}", "a clean photo of {}", "a rendering of {}", "a picture of {}",
        "an image of {}", "a nice photo of {}",
    ],
    "face": [
        "a photo of {}", "a portrait of {}", "a close-up photo of {}", "a headshot of {}",
        "a photo of the face of {}", "a cropped photo of {}", "a selfie of {}",
        "a studio portrait of {}", "a candid photo of {}", "a good photo of {}",
    ],
    "cat": [
        "a photo of {}", "a close-up photo of {}", "a cropped photo of {}", "a cute photo of {}",
        "a photo of {} looking at the camera", "a photo of {} indoors", "a portrait of {}",
        "a bright photo of {}", "a good photo of {}", "a picture of {}",
    ],
    "art": [
        "a painting in the style of {}", "an artwork in the style of {}", "a picture in the style of {}",
        "a painting by {}", "art by {}", "an illustration in the style of {}",
        "a canvas in the style of {}", "a detailed painting in the style of {}",
        "a cropped painting in the style of {}", "a rendition in the style of {}",
    ],
    # The digits mini-domain (e4t_jax.digits): its captions' wording, no attribute named.
    "digits": ["a {}", "the {}", "a picture of a {}", "a drawing of a {}", "an image of a {}", "a photo of a {}",
               "a picture of the {}", "a drawing of the {}"],
}

# Domain word -> its templates in PROMPT_TEMPLATES; other words get "generic".
TEMPLATES_FOR_WORD = {"face": "face", "person": "face", "man": "face", "woman": "face", "cat": "cat",
                      "painting": "art", "art": "art", "style": "art", "digit": "digits"}

#: With ``face_masks``, images are decoded with their shortest side at least this long (when they
#: have it), so that dlib's detector finds faces that the training size would make too small.
FACE_MASK_SIDE = 512

_NUMERIC_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What a pre-training run reads, and how it augments it.

    Attributes:
      root: the image folder (searched recursively); required by a run.
      size: the side of the square training images; None: the model's image size.
      templates: a domain name of :data:`PROMPT_TEMPLATES` or a template file; None:
        the domain word's (:func:`templates_for_domain`).
      crop_scale: range of the random crop side as a fraction of the shortest side.
      flip: random horizontal flips.
      captions: each image's prompt is its sidecar caption ``NAME.txt`` (with ``{}``
        for the placeholder) instead of a template (:func:`read_captions`).
      workers: decoding worker processes (grain ``mp_prefetch``); 0 decodes in this
        process. The data are the same with any number, but the iterator's state is
        shaped by it: a run resumes with the number it was saved with.
      face_masks: each batch also holds ``"mask"``, the loss mask of each image's face
        (:func:`e4t_jax.eval.faces.face_mask`, dlib's landmarks, the ``faces`` extra),
        computed when the image is loaded, at :data:`FACE_MASK_SIDE` pixels or more
        (about 0.4 s of CPU per 512-pixel image: use ``workers``) and cropped and flipped with it; an image without a detectable face
        gets an all-white mask (its whole loss counts) and a warning.
    """

    root: str = ""
    size: int | None = None
    templates: str | None = None
    crop_scale: tuple[float, float] = (0.8, 1.0)
    flip: bool = True
    captions: bool = False
    workers: int = 0
    face_masks: bool = False


class RandomAccessImages(Protocol):
    """A random-access image source, e.g. a Hugging Face ``datasets.Dataset``.

    ``source[i]`` returns a dict whose ``"image"`` is a PIL image (or an array
    ``[H, W]``, ``[H, W, 3|4]``).
    """

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


@dataclasses.dataclass
class SkipStats:
    """Unreadable inputs met by a pipeline (in the process that consumes it)."""

    paths: set[str] = dataclasses.field(default_factory=set)

    @property
    def skipped(self) -> int:
        """Number of distinct unreadable files (or source indices)."""
        return len(self.paths)


#: Default stats object used by :func:`make_dataset` when none is passed.
skip_stats = SkipStats()


# ------------------------------------------------------------------------ files, images


def list_images(root: str | os.PathLike) -> list[Path]:
    """All images under ``root`` (recursive), sorted by relative path; hidden files skipped.

    Raises:
      FileNotFoundError: when the folder is missing or holds no image.
    """
    root = Path(root).expanduser()
    files = []
    if root.is_dir():
        files = sorted(
            (path for path in root.rglob("*")
             if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
             and not any(part.startswith(".") for part in path.relative_to(root).parts)),
            key=lambda path: path.relative_to(root).as_posix())
    if not files:
        what = "no images found under" if root.is_dir() else "image folder does not exist:"
        raise FileNotFoundError(f"{what} {root} (looked for {', '.join(IMAGE_SUFFIXES)}, any case, in subfolders too)")
    return files


def to_rgb(image: Image.Image) -> np.ndarray:
    """Any PIL image -> uint8 ``[H, W, 3]``; transparency is composited on white.

    16-bit grayscale (``I;16*``; ``I`` when it exceeds 255) is scaled to 8 bits, float
    (``F``) is clipped to [0, 255]; CMYK, palette, L, LA are converted by PIL.
    """
    if image.mode in _NUMERIC_GRAY_MODES:
        gray = np.asarray(image, dtype=np.float64)
        if image.mode != "F" and (image.mode != "I" or gray.max() > 255):
            gray = gray / 257.0
        gray = np.clip(np.round(gray), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _shrink(image: Image.Image, size: int) -> Image.Image:
    """Resizes so that the shortest side is ``size``, aspect kept."""
    scale = size / min(image.size)
    target = (max(size, round(image.width * scale)), max(size, round(image.height * scale)))
    return image.resize(target, Image.Resampling.LANCZOS)


class UnreadableImage(ValueError):
    """An image file that cannot be decoded; the message says why."""


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An image file as uint8 ``[H, W, 3]`` (:func:`decode_image`), or an error that says what is wrong.

    Raises:
      FileNotFoundError: no such file.
      UnreadableImage: the file is not a readable picture (empty, damaged, too large...).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    return decode_image(path)


def load_image(path: str | os.PathLike, size: int | None = None) -> np.ndarray | None:
    """:func:`decode_image`, or None when the file cannot be decoded (pre-training skips it)."""
    try:
        return decode_image(path, size)
    except UnreadableImage:
        return None


def decode_image(path: str | os.PathLike, size: int | None = None) -> np.ndarray:
    """Reads an image file as uint8 ``[H, W, 3]``, upright (EXIF orientation applied).

    Any mode PIL opens is converted by :func:`to_rgb`; an animated GIF or WebP gives
    its first frame. The header's size is checked against :data:`MAX_IMAGE_PIXELS`
    before any pixel is decoded.

    Args:
      path: image file.
      size: when given, images whose shortest side is longer are downscaled to it
        (aspect kept; JPEGs are decoded at reduced scale first).

    Raises:
      UnreadableImage: naming the file and why (empty, not an image, damaged, too large).
    """
    try:
        if os.path.getsize(path) == 0:
            raise UnreadableImage("the file is empty (0 bytes)")
        with Image.open(path) as image:
            if size is not None and image.format == "JPEG":
                scale = size / min(image.size)
                image.draft(image.mode, (math.ceil(image.width * scale), math.ceil(image.height * scale)))
            _check_pixels(image.size)
            image = ImageOps.exif_transpose(image)
            return _image_array(image, size)
    except UnreadableImage as error:
        raise UnreadableImage(f"{path} is not a readable picture: {error}") from None
    except _DECODE_ERRORS as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UnreadableImage(f"{path} is not a readable picture (jpg, png, webp, ...): {reason}") from None


def _check_pixels(size: tuple[int, int]) -> None:
    width, height = size
    if width * height > MAX_IMAGE_PIXELS:
        raise UnreadableImage(f"{width}x{height} is {width * height} pixels, over the limit of "
                              f"{MAX_IMAGE_PIXELS} (MAX_IMAGE_PIXELS)")


def _image_array(image: Image.Image | np.ndarray, size: int | None) -> np.ndarray:
    """PIL image or array -> uint8 ``[H, W, 3]``, shortest side at most ``size``.

    Raises:
      UnreadableImage: no pixels, or more than :data:`MAX_IMAGE_PIXELS`.
    """
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if min(image.size) == 0:
        raise UnreadableImage("it has no pixels (0 wide or high)")
    _check_pixels(image.size)
    rgb = to_rgb(image)
    if size is None or min(rgb.shape[:2]) <= size:
        return rgb
    return np.asarray(_shrink(Image.fromarray(rgb), size))


def _to_unit_range(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32) / 127.5 - 1.0


def augment(image: np.ndarray, rng: np.random.Generator, size: int, *,
            crop_scale: tuple[float, float] = DataConfig.crop_scale, flip: bool = DataConfig.flip) -> np.ndarray:
    """Random square crop, resize, horizontal flip.

    Args:
      image: uint8 ``[H, W, 3]``.
      rng: the only source of randomness (same generator state -> same output).
      size: output side.
      crop_scale: range of the crop side as a fraction of the shortest image side;
        (1.0, 1.0) crops the largest square at a random position.
      flip: flip horizontally with probability 1/2.

    Returns:
      float32 ``[size, size, 3]`` in [-1, 1].
    """
    height, width = image.shape[:2]
    side = max(1, round(rng.uniform(*crop_scale) * min(height, width)))
    top = int(rng.integers(0, height - side + 1))
    left = int(rng.integers(0, width - side + 1))
    mirror = flip and rng.random() < 0.5
    crop = Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC,
                                         box=(left, top, left + side, top + side))
    if mirror:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return _to_unit_range(crop)


def augmented_batch(image: np.ndarray, *, size: int, batch_size: int, rng: np.random.Generator,
                    mask: np.ndarray | None = None, crop_scale: tuple[float, float] = (0.8, 1.0),
                    flip: bool = True) -> dict[str, np.ndarray]:
    """``batch_size`` random crops/flips of ONE image (and of its mask, identically).

    Args:
      image: uint8 ``[H, W, 3]``.
      size: output side.
      rng: the only source of randomness.
      mask: optional uint8 ``[H, W, 3]`` mask image (white = keep).
      crop_scale, flip: see :func:`augment`.

    Returns:
      ``{"pixels": float32 [B, size, size, 3] in [-1, 1], "index": int32 [B]}`` and,
      with a mask, ``"mask"``: float32 ``[B, size, size]`` in [0, 1].

    Raises:
      ValueError: a mask whose height and width are not the image's (its crops would
        not line up with the image's).
    """
    if mask is not None and np.shape(mask)[:2] != np.shape(image)[:2]:
        raise ValueError(f"the mask is {np.shape(mask)[1]}x{np.shape(mask)[0]} pixels but the image "
                         f"{np.shape(image)[1]}x{np.shape(image)[0]}: a mask must have its image's size")
    pixels, masks = [], []
    for _ in range(batch_size):
        state = rng.bit_generator.state
        pixels.append(augment(image, rng, size, crop_scale=crop_scale, flip=flip))
        if mask is not None:
            twin = np.random.default_rng()
            twin.bit_generator.state = state
            masks.append((augment(mask, twin, size, crop_scale=crop_scale, flip=flip)[..., 0] + 1) / 2)
    batch = {"pixels": np.stack(pixels), "index": np.arange(batch_size, dtype=np.int32)}
    if mask is not None:
        batch["mask"] = np.stack(masks)
    return batch


def center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Largest central square, resized: uint8 ``[H, W, 3]`` -> float32 ``[size, size, 3]`` in [-1, 1]."""
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    crop = Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC,
                                         box=(left, top, left + side, top + side))
    return _to_unit_range(crop)


# ------------------------------------------------------------------------------ prompts


def _check_templates(templates: Sequence[str], where: str) -> list[str]:
    templates = list(templates)
    if not templates:
        raise ValueError(f"{where} holds no prompt template")
    for number, template in enumerate(templates, 1):
        if "{}" not in template:
            raise ValueError(f"{where}: template {number} {template!r} has no '{{}}' where the placeholder goes "
                             "(e.g. 'a photo of {}')")
    return templates


def load_templates(domain_or_file: str | os.PathLike) -> list[str]:
    """Prompt templates of a domain (``generic``, ``face``, ``cat``, ``art``) or of a text file.

    A file holds one template per line, each with ``{}`` where the placeholder goes;
    blank lines are ignored.

    Raises:
      ValueError: unknown domain, empty file, or a template without ``{}``.
    """
    name = str(domain_or_file)
    if name in PROMPT_TEMPLATES:
        return list(PROMPT_TEMPLATES[name])
    path = Path(name).expanduser()
    if not path.is_file():
        raise ValueError(f"unknown prompt templates {name!r}: expected one of {', '.join(PROMPT_TEMPLATES)} "
                         "or a text file with one template per line")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return _check_templates([line for line in lines if line], f"template file {path}")


def templates_for_domain(domain_word: str) -> list[str]:
    """The prompt templates for a domain word (``face`` -> the face templates, ...)."""
    return load_templates(TEMPLATES_FOR_WORD.get(domain_word, "generic"))


def prompts_for(templates: Sequence[str], placeholder: str, count: int) -> list[str]:
    """``count`` prompts: the templates in turn, with ``placeholder`` at ``{}``."""
    return [templates[i % len(templates)].format(placeholder) for i in range(count)]


# ------------------------------------------------------------------------------ dataset


def _shard_seed(seed: int, shard_index: int) -> int:
    return int(np.random.SeedSequence([seed, shard_index]).generate_state(1)[0])


@dataclasses.dataclass(frozen=True)
class _ReadFile:
    """Image file path -> uint8 ``[H, W, 3]`` (shortest side at most ``size``) or None."""

    size: int

    def __call__(self, path: str) -> np.ndarray | None:
        return load_image(path, self.size)

    def describe(self, path: str) -> str:
        return path


@dataclasses.dataclass(frozen=True)
class _ReadSource:
    """Index of a random-access source -> uint8 ``[H, W, 3]`` or None."""

    source: RandomAccessImages
    size: int

    def __call__(self, index: int) -> np.ndarray | None:
        try:
            image = self.source[index]["image"]
            return None if image is None else _image_array(image, self.size)
        except _DECODE_ERRORS:  # UnreadableImage is a ValueError
            return None

    def describe(self, index: int) -> str:
        return f"hf_dataset[{index}]"


@dataclasses.dataclass(frozen=True)
class _Example:
    """Decodes one item, augments it and picks its prompt (a grain RandomMap)."""

    read: _ReadFile | _ReadSource
    size: int
    crop_scale: tuple[float, float]
    flip: bool
    prompts: tuple[str, ...]
    captions: dict[str, str] | None = None
    face_masks: bool = False

    def __call__(self, key: Any, rng: np.random.Generator) -> dict[str, Any]:
        image = self.read(key)
        if image is None:
            return {"unreadable": self.read.describe(key)}
        state = rng.bit_generator.state
        pixels = augment(image, rng, self.size, crop_scale=self.crop_scale, flip=self.flip)
        prompt = self.prompts[int(rng.integers(len(self.prompts)))]
        example = {"pixels": pixels, "prompt": prompt if self.captions is None else self.captions[key]}
        if self.face_masks:  # the same crop and flip as the image: a twin generator in the same state
            twin = np.random.Generator(type(rng.bit_generator)())  # grain's generator is not PCG64
            twin.bit_generator.state = state
            mask = augment(_face_mask(image, self.read.describe(key)), twin, self.size,
                           crop_scale=self.crop_scale, flip=self.flip)
            example["mask"] = (mask[..., 0] + 1.0) / 2.0
        return example


_warned_faceless: set[str] = set()


def _face_mask(image: np.ndarray, name: str) -> np.ndarray:
    """uint8 ``[H, W, 3]`` face mask of ``image``; all white (and a warning once) without a face."""
    from e4t_jax.eval import faces

    try:
        return faces.face_mask(image, what=name)
    except faces.NoFaceError:
        if name not in _warned_faceless:
            _warned_faceless.add(name)
            logging.warning("no face found in %s: its loss is not masked", name)
        return np.full_like(image, 255)


@dataclasses.dataclass
class _KeepReadable:
    """Filter predicate: drops unreadable markers, logs each file once, records it in ``stats``."""

    stats: SkipStats
    total: int
    seen: set[str] = dataclasses.field(default_factory=set)

    def __call__(self, element: dict[str, Any]) -> bool:
        path = element.get("unreadable")
        if path is None:
            return True
        if path not in self.seen:
            logging.warning("skipped unreadable image %s", path)
            self.seen.add(path)
            self.stats.paths.add(path)
        if len(self.seen) >= self.total:
            raise RuntimeError(f"all {self.total} images of this shard are unreadable")
        return False


def read_captions(paths: Sequence[str | os.PathLike], placeholder: str) -> dict[str, str]:
    """Each image's sidecar caption (``NAME.txt`` beside ``NAME.png``), placeholder filled in.

    A caption is one line with ``{}`` where the placeholder goes, like a template.

    Raises:
      FileNotFoundError / ValueError: naming the first image without a usable caption.
    """
    captions = {}
    for path in paths:
        sidecar = Path(path).with_suffix(".txt")
        if not sidecar.is_file():
            raise FileNotFoundError(f"{path} has no caption file {sidecar.name}; --captions needs one per image")
        text = sidecar.read_text(encoding="utf-8", errors="replace").strip()
        captions[str(path)] = _check_templates([text], f"caption {sidecar}")[0].replace("{}", placeholder)
    return captions


def make_dataset(
    root: str | os.PathLike | None = None,
    *,
    size: int,
    batch_size: int,
    seed: int,
    templates: str | Sequence[str] = "generic",
    placeholder: str = "S*",
    shard_index: int = 0,
    shard_count: int = 1,
    num_epochs: int | None = None,
    crop_scale: tuple[float, float] = DataConfig.crop_scale,
    flip: bool = DataConfig.flip,
    read_threads: int = 8,
    prefetch: int = 2,
    workers: int = DataConfig.workers,
    hf_dataset: RandomAccessImages | None = None,
    stats: SkipStats | None = None,
    captions: bool = False,
    face_masks: bool = False,
) -> grain.DatasetIterator:
    """A resumable iterator of augmented batches from this host's shard of the images.

    Args:
      root: image folder (searched recursively); or None with ``hf_dataset``.
      size: output side of the square images.
      batch_size: per-host batch size B (the global batch divided by the host count).
      seed: data seed (shuffle, crops, flips, template choice); in [0, 2**32).
      templates: a domain name or a template file (see :func:`load_templates`), or
        a list of templates with ``{}``.
      placeholder: the token that replaces ``{}`` in the prompts.
      shard_index, shard_count: this host's share, files ``shard_index::shard_count``
        (use ``jax.process_index()``, ``jax.process_count()``).
      num_epochs: None repeats forever; else a partial last batch is dropped.
      crop_scale, flip: see :func:`augment`.
      read_threads: background threads decoding images (grain ``ReadOptions``).
      prefetch: batches decoded ahead of the consumer.
      workers: worker processes (grain ``mp_prefetch``); 0 decodes in this process.
      hf_dataset: instead of ``root``, any random-access source whose items are
        ``{"image": PIL image}`` (a Hugging Face ``datasets.Dataset`` works; the
        ``datasets`` package is not needed otherwise). Index ``i`` belongs to shard
        ``i % shard_count``; unreadable items are reported as ``hf_dataset[i]``.
      stats: records unreadable inputs; defaults to the module's ``skip_stats``.
      captions: prompts from each image's sidecar caption (:func:`read_captions`)
        instead of ``templates``; image folders only.
      face_masks: also yield ``"mask"``, float32 ``[B, size, size]`` in [0, 1] (white =
        face), see :class:`DataConfig`; raises ``FacesUnavailable`` here without dlib.

    Returns:
      A grain ``DatasetIterator`` yielding ``{"pixels": float32 [B, size, size, 3],
      "prompt": str array [B]}`` (and ``"mask"``), with ``get_state()`` / ``set_state()``.
    """
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index must be in [0, {shard_count}), got {shard_index}")
    if isinstance(templates, (str, os.PathLike)):
        templates = load_templates(templates)
    prompts = tuple(t.replace("{}", placeholder) for t in _check_templates(templates, "templates"))
    load_size = math.ceil(size / crop_scale[0])
    if face_masks:  # faces are found at a resolution where they are some 40 pixels wide or more
        load_size = max(load_size, FACE_MASK_SIDE)
    if hf_dataset is not None:
        keys = grain.MapDataset.range(len(hf_dataset))[shard_index::shard_count]
        read = _ReadSource(hf_dataset, load_size)
    elif root is not None:
        keys = grain.MapDataset.source([str(p) for p in list_images(root)])[shard_index::shard_count]
        read = _ReadFile(load_size)
    else:
        raise ValueError("make_dataset needs an image folder (root) or an hf_dataset")
    if captions and hf_dataset is not None:
        raise ValueError("captions are read from sidecar files: pass an image folder, not an hf_dataset")
    caption_of = read_captions([keys[i] for i in range(len(keys))], placeholder) if captions else None
    if len(keys) == 0:
        raise FileNotFoundError(f"shard {shard_index} of {shard_count} holds no image: fewer images than shards")
    if face_masks:  # fail now, not in a worker: dlib and its weights are there
        from e4t_jax.eval import faces

        faces.require()
    shard_seed = _shard_seed(seed, shard_index)
    examples = (keys.shuffle(seed=shard_seed).repeat(num_epochs)
                .random_map(_Example(read, size, tuple(crop_scale), flip, prompts, caption_of, face_masks),
                            seed=shard_seed))
    dataset = examples.to_iter_dataset(grain.ReadOptions(
        num_threads=read_threads, prefetch_buffer_size=max(prefetch * batch_size, read_threads, 1)))
    if workers > 0:
        if not flags.FLAGS.is_parsed():  # grain 0.2.18 reads an absl flag here (google/grain#1355)
            flags.FLAGS.mark_as_parsed()
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    dataset = dataset.filter(_KeepReadable(skip_stats if stats is None else stats, len(keys)))
    return iter(dataset.batch(batch_size, drop_remainder=True))


def dataset_state(iterator: grain.DatasetIterator) -> dict[str, Any]:
    """The iterator's position, a JSON-able dict (store it with the train state)."""
    return iterator.get_state()


def restore_dataset_state(iterator: grain.DatasetIterator, state: dict[str, Any]) -> None:
    """Moves a fresh iterator, built with the same arguments and files, to ``state``."""
    iterator.set_state(state)
