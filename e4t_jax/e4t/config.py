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
class PersonalizeConfig:
    """How the concepts of this domain are best tuned: ``e4t-personalize``'s defaults.

    A domain encoder records them because they depend on the domain and on how long
    the encoder was pre-trained (a flag given to ``e4t-personalize`` still wins).

    Attributes:
      steps, batch_size, lr: tuning steps, augmented copies per step, learning rate.
      crop_scale: range of the random crop side, as a fraction of the shortest side.
      flip: random horizontal flips (off where a mirror image is another concept,
        e.g. digits or text).
      templates: prompt templates (a name of
        :data:`e4t_jax.training.data.PROMPT_TEMPLATES` or a file); None: the domain
        word's.
    """

    steps: int = 15
    batch_size: int = 16
    lr: float = 1e-5
    crop_scale: tuple[float, float] = (0.8, 1.0)
    flip: bool = True
    templates: str | None = None

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError(f"personalize: steps, batch_size and lr must be positive, got {self}")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"personalize.crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")


@dataclasses.dataclass(frozen=True)
class E4TConfig:
    """Everything that defines a domain encoder (see the module docstring)."""

    model: ModelConfig = ModelConfig()
    encoder: EncoderConfig = EncoderConfig()
    offsets: OffsetConfig = OffsetConfig()
    loss: LossConfig = LossConfig()
    personalize: PersonalizeConfig = PersonalizeConfig()
