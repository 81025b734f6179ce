"""CLIP-I and CLIP-T, the paper's image- and text-similarity metrics, with e4t-jax's own CLIP.

* **CLIP-I**: cosine similarity of the CLIP image embeddings of a generated image and of
  the input (concept) image: how much of the concept the generation keeps.
* **CLIP-T**: cosine similarity of a generated image's CLIP embedding and its prompt's
  CLIP embedding, the placeholder (``S*``) replaced by the domain's class word
  ("a photo of S* as a knight" -> "a photo of face as a knight"): how well the
  generation follows the prompt.

Both read any transformers ``CLIPModel`` checkpoint folder (``config.json``, safetensors
weights, tokenizer files), e.g. ``openai/clip-vit-large-patch14`` downloaded once, with
:func:`e4t_jax.models.clip.load_clip_text` / :func:`~e4t_jax.models.clip.load_clip_vision`
(``with_projection``). Images are preprocessed by
:func:`e4t_jax.models.clip.preprocess_images` (CLIPImageProcessor's shortest-side resize,
center crop and CLIP mean/std, in JAX; the E4T encoder's vision branch uses it too).
Embeddings are the projected ``text_embeds`` / ``image_embeds`` of transformers'
``get_text_features`` / ``get_image_features``; scores are raw cosines in [-1, 1] (some
papers report ``100 * max(cos, 0)``; multiply yourself).

Example::

    scorer = ClipScorer.from_folder("clip-vit-large-patch14")
    scorer.clip_i(generated, concept_image)                      # float
    scorer.clip_t(generated, "a photo of S* on the moon", class_word="face")
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from e4t_jax.models import clip
from e4t_jax.tokenizer import Tokenizer


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity along the last axis (float64 arithmetic): ``[..., E], [..., E] -> [...]``."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _is_one_image(images) -> bool:
    return hasattr(images, "shape") and len(images.shape) == 3


def _image_list(images: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
    """One ``[H, W, 3]`` image, a batch ``[B, H, W, 3]`` or a list of images (sizes may differ)."""
    if isinstance(images, np.ndarray) or hasattr(images, "shape"):
        images = np.asarray(images)
        if images.ndim == 3:
            return [images]
        if images.ndim == 4:
            return list(images)
        raise ValueError(f"images must be [H, W, 3] or [B, H, W, 3], got shape {images.shape}")
    return [np.asarray(image) for image in images]


class ClipScorer:
    """A CLIP model (both towers with their projections) and its tokenizer.

    Attributes:
      text_module, text_params: the text tower (:class:`e4t_jax.models.clip.CLIPTextTransformer`,
        ``with_projection``).
      vision_module, vision_params: the vision tower, ``with_projection``.
      tokenizer: :class:`e4t_jax.tokenizer.Tokenizer` of the checkpoint.
    """

    def __init__(self, text: tuple[clip.CLIPTextTransformer, dict], vision: tuple[clip.CLIPVisionTransformer, dict],
                 tokenizer: Tokenizer):
        self.text_module, self.text_params = text
        self.vision_module, self.vision_params = vision
        self.tokenizer = tokenizer
        self._text = jax.jit(lambda p, ids: self.text_module.apply({"params": p}, ids).text_embeds)
        self._image = jax.jit(lambda p, pixels: self.vision_module.apply({"params": p}, pixels).image_embeds)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, tokenizer_folder: str | os.PathLike | None = None) -> "ClipScorer":
        """Loads a transformers ``CLIPModel`` folder (its tokenizer from the same folder unless given).

        Raises:
          CheckpointError: weights that do not fit the config (missing projections included).
          FileNotFoundError: no tokenizer files.
        """
        folder = Path(folder)
        return cls(clip.load_clip_text(folder, with_projection=True), clip.load_clip_vision(folder, with_projection=True),
                   Tokenizer.from_folder(tokenizer_folder or folder))

    def image_embeds(self, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """Images -> float32 ``[B, projection_dim]`` (not normalized), as ``get_image_features``.

        Args:
          images: uint8 ``[H, W, 3]`` (or float in [0, 1]), a batch ``[B, H, W, 3]``, or a
            list of images of any sizes; each is preprocessed by
            :func:`e4t_jax.models.clip.preprocess_images` at the tower's ``image_size``.
        """
        size = self.vision_module.config.image_size
        pixels = jnp.concatenate([clip.preprocess_images(image[None], size) for image in _image_list(images)])
        return np.asarray(self._image(self.vision_params, pixels), np.float32)  # one tower call for all

    def text_embeds(self, prompts: str | Sequence[str]) -> np.ndarray:
        """Prompts -> float32 ``[B, projection_dim]`` (not normalized), as ``get_text_features``.

        Prompts are tokenized as the diffusion pipeline does (padded to the tokenizer's
        length, at most the text tower's ``max_position_embeddings``, truncated with a warning).
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        length = min(self.tokenizer.model_max_length, self.text_module.config.max_position_embeddings)
        ids = self.tokenizer.encode(prompts, max_length=length)
        return np.asarray(self._text(self.text_params, jnp.asarray(ids)), np.float32)

    def clip_i(self, generated: np.ndarray | Sequence[np.ndarray], reference: np.ndarray) -> float | np.ndarray:
        """CLIP-I: cosine of the image embeddings of ``generated`` and the input image ``reference``.

        Args:
          generated: one image ``[H, W, 3]`` (-> a float) or several (-> float64 ``[B]``).
          reference: the concept image ``[H, W, 3]``.
        """
        scores = cosine(self.image_embeds(generated), self.image_embeds(reference))
        return float(scores[0]) if _is_one_image(generated) else scores

    def clip_t(self, generated: np.ndarray | Sequence[np.ndarray], prompts: str | Sequence[str], *,
               class_word: str, placeholder: str = "S*") -> float | np.ndarray:
        """CLIP-T: cosine of each image's embedding and its prompt's, ``placeholder`` -> ``class_word``.

        Args:
          generated: one image ``[H, W, 3]`` with one prompt (-> a float), or ``B`` images
            with ``B`` prompts (or one prompt for all) (-> float64 ``[B]``).
          prompts: the generation prompts, with the placeholder in them.
          class_word: the domain's coarse word that replaces the placeholder ("face", "cat").
          placeholder: the concept's placeholder token.
        """
        single = isinstance(prompts, str) and _is_one_image(generated)
        images = _image_list(generated)
        prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        texts = [prompt.replace(placeholder, class_word) for prompt in prompts]
        scores = cosine(self.image_embeds(images), self.text_embeds(texts))
        return float(scores[0]) if single else scores
