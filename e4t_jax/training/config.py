"""The training config tree: run length, batch, seed, optimizer and weight average (plain dataclasses, no JAX)."""
from __future__ import annotations

import dataclasses

SCHEDULES = ("constant", "linear", "cosine")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with global-norm clipping and a learning-rate schedule.

    Attributes:
      lr: peak learning rate (the paper tunes at ~5e-6 to 1.6e-5).
      weight_decay: AdamW's decoupled weight decay.
      clip_norm: gradients are clipped to this global norm.
      warmup_steps: linear warm-up from 0 to ``lr``; 0 for none.
      schedule: after the warm-up, ``constant`` (stays at ``lr``), ``linear`` or
        ``cosine`` (decay to 0 at the run's last step).
    """

    lr: float = 1e-5
    weight_decay: float = 1e-2
    clip_norm: float = 1.0
    warmup_steps: int = 0
    schedule: str = "constant"

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A training run's length, batch, optimizer and weight average (personalization's defaults).

    Attributes:
      steps: optimizer steps (personalization: 5-15).
      batch_size: global batch size of one optimizer step (personalization: augmented
        copies of the image).
      seed: the RNG seed of the train state and the data.
      optimizer: the :class:`OptimizerConfig`.
      ema_decay: keep an exponential moving average of the trained weights with this
        decay in (0, 1) (:func:`e4t_jax.training.steps.train_step`); None: none.
    """

    steps: int = 15
    batch_size: int = 16
    seed: int = 0
    optimizer: OptimizerConfig = OptimizerConfig()
    ema_decay: float | None = None

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch size must be at least 1, got {self.steps} and {self.batch_size}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"the EMA decay must be in (0, 1), got {self.ema_decay}")
        if self.optimizer.schedule != "constant" and self.optimizer.warmup_steps >= self.steps:
            raise ValueError(f"a {self.optimizer.schedule} schedule decays after the warm-up: warm-up "
                             f"{self.optimizer.warmup_steps} must be below the {self.steps} steps")
