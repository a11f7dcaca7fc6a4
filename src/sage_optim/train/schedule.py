"""Learning-rate schedule: linear warmup, then cosine decay to a floor (a fraction of the peak).

Built as a :class:`torch.optim.lr_scheduler.LambdaLR`, so it scales every param group's own
learning rate (the hybrids' groups may differ), composes with any optimizer, and its state
(``last_epoch``, ``base_lrs``) goes into checkpoints through ``scheduler.state_dict()``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["WarmupCosine", "warmup_cosine_scheduler"]


@dataclass(frozen=True)
class WarmupCosine:
    """Multiplier of the peak learning rate at a 0-based optimizer step.

    A callable object rather than a lambda, so that LambdaLR's ``state_dict`` records its fields.
    """

    warmup_steps: int
    total_steps: int
    floor_fraction: float = 0.0

    def __call__(self, step: int) -> float:
        # 1) linear warmup: (step + 1) / warmup_steps, reaching the peak on the last warmup step
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        # 2) after the schedule (a run continued past total_steps): stay at the floor
        decay_steps = self.total_steps - self.warmup_steps
        if step >= self.total_steps or decay_steps <= 0:
            return self.floor_fraction
        # 3) cosine from 1 down to floor_fraction, which it reaches at step == total_steps
        progress = (step - self.warmup_steps) / decay_steps
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.floor_fraction + (1.0 - self.floor_fraction) * cosine


def warmup_cosine_scheduler(optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int,
                            floor_fraction: float = 0.0) -> LambdaLR:
    """Linear warmup over ``warmup_steps``, cosine to ``floor_fraction`` × peak at ``total_steps``.

    Call ``scheduler.step()`` once after every ``optimizer.step()``.
    """
    if warmup_steps < 0 or total_steps <= 0:
        raise ValueError(f"need warmup_steps >= 0 and total_steps > 0, got {warmup_steps} and {total_steps}")
    if not 0.0 <= floor_fraction <= 1.0:
        raise ValueError(f"floor_fraction must be in [0, 1], got {floor_fraction}")
    return LambdaLR(optimizer, WarmupCosine(warmup_steps, total_steps, floor_fraction))
