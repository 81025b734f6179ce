"""The training config tree: run length, batch, seed and optimizer (plain dataclasses, no JAX)."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with global-norm clipping and an optional linear warm-up.

    Attributes:
      lr: peak learning rate (the paper tunes at ~5e-6 to 1.6e-5).
      weight_decay: AdamW's decoupled weight decay.
      clip_norm: gradients are clipped to this global norm.
      warmup_steps: linear warm-up from 0 to ``lr``; 0 for none.
    """

    lr: float = 1e-5
    weight_decay: float = 1e-2
    clip_norm: float = 1.0
    warmup_steps: int = 0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A training run's length, batch and optimizer (personalization's defaults).

    Attributes:
      steps: optimizer steps (personalization: 5-15).
      batch_size: global batch size (personalization: augmented copies of the image).
      seed: the RNG seed of the train state and the data.
      optimizer: the :class:`OptimizerConfig`.
    """

    steps: int = 15
    batch_size: int = 16
    seed: int = 0
    optimizer: OptimizerConfig = OptimizerConfig()

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch size must be at least 1, got {self.steps} and {self.batch_size}")
