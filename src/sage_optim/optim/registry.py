"""Name -> optimizer factory, shared by Python users, the CLI and the tests.

(Placeholder during bring-up: only ``adamw`` exists until the core optimizers land.)
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

__all__ = ["create_optimizer", "available_optimizers", "default_lr"]


def _adamw(model: nn.Module, lr: float, weight_decay: float, **kw: Any) -> torch.optim.Optimizer:
    kw.setdefault("betas", (0.9, 0.999))
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, **kw)


_REGISTRY: dict[str, tuple[Callable[..., torch.optim.Optimizer], float]] = {
    "adamw": (_adamw, 1e-4),
}


def available_optimizers() -> list[str]:
    return list(_REGISTRY)


def default_lr(name: str) -> float:
    return _REGISTRY[name][1]


def create_optimizer(name: str, model: nn.Module, *, lr: float | None = None,
                     weight_decay: float = 0.01, **overrides: Any) -> torch.optim.Optimizer:
    if name not in _REGISTRY:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {available_optimizers()}")
    factory, lr0 = _REGISTRY[name]
    return factory(model, lr=lr0 if lr is None else lr, weight_decay=weight_decay, **overrides)
