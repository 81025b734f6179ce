"""E4T's config tree: the base model and concept word, the encoder, the offsets, the loss.

One :class:`E4TConfig` describes a domain encoder completely. It is written (with
:func:`e4t_jax.config.to_dict`) into encoder folders and concept headers and read back
(with :func:`e4t_jax.config.from_dict`, which checks every field) when they are loaded.
"""
from __future__ import annotations

import dataclasses

from e4t_jax.e4t.encoder import EncoderConfig
from e4t_jax.e4t.losses import LossConfig
from e4t_jax.e4t.offsets import OffsetConfig


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The base model and the words of the concept.

    Attributes:
      base: the base model: a diffusers folder, a Hugging Face id or a preset name
        (:mod:`e4t_jax.presets`). Saved files record it for information; loading checks
        the base model's identity (:func:`e4t_jax.files.base_model_identity`) instead.
      vision_source: where the vision backbone's weights are (a folder or Hub id; for
        the paper's tower ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``); None reads
        ``<base>/image_encoder``.
      domain_word: the coarse class word whose embedding ``v*`` starts from; one token.
      placeholder: the new token that prompts use for the concept.
    """

    base: str = "tiny"
    vision_source: str | None = None
    domain_word: str = "face"
    placeholder: str = "S*"


@dataclasses.dataclass(frozen=True)
class E4TConfig:
    """Everything that defines a domain encoder (see the module docstring)."""

    model: ModelConfig = ModelConfig()
    encoder: EncoderConfig = EncoderConfig()
    offsets: OffsetConfig = OffsetConfig()
    loss: LossConfig = LossConfig()
