"""SinkGD: stateless Sinkhorn-normalised gradient descent for matrices."""
from __future__ import annotations

from typing import Any, Optional

from ._base import RuleOptimizer
from ._docs import COMMON_ARGS

__all__ = ["SinkGD"]


class SinkGD(RuleOptimizer):
    __doc__ = r"""SinkGD (Scetbon et al., 2025, "Gradient Multi-Normalization for Stateless and Scalable LLM
    Training"): the gradient after ``iters`` alternating row/column normalisations; no optimizer state.

    .. code-block:: text

        X ← g reshaped to (n, m)
        repeat L times:
            X ← X / (‖X_row‖₂ + ε)   [× sqrt(m) if normalization = "sr"]
            X ← X / (‖X_col‖₂ + ε)   [× sqrt(n) if normalization = "sr"]
        θ ← θ · (1 − η λ) − η · scale · X

    Computed as X = diag(r)·G·diag(c) from Q = G⊙G (two mat-vecs per iteration). "sr" equals sqrt(n) ×
    "uniform" (ε aside): a per-matrix learning-rate factor, not only a global one.

    Args:
        params: iterable of parameters with ndim ≥ 2 (trailing dims are flattened), or param groups.
        lr (float): η (required).
        weight_decay (float): decoupled weight decay λ. Default ``1e-2``.
        iters (int): L. Default ``5``.
        scale (float): multiplies the normalised gradient. Default ``1.0`` (the SAGE hybrid uses 10).
        normalization ("uniform" | "sr"): unit norms, or the SinkGD paper's sqrt(m)/sqrt(n) norms.
        eps (float): added to every norm. Default ``1e-8``.
{common_args}

    State: none.
    """.replace("{common_args}", COMMON_ARGS)

    def __init__(self, params: Any, lr: float, weight_decay: float = 1e-2, *, iters: int = 5, scale: float = 1.0,
                 normalization: str = "uniform", eps: float = 1e-8, foreach: Optional[bool] = None,
                 maximize: bool = False, nonfinite: str = "raise", compile: bool = False, fused: Optional[bool] = None,
                 verify_every: Optional[int] = None) -> None:
        hyper = {"lr": lr, "weight_decay": weight_decay, "iters": iters, "scale": scale,
                 "normalization": normalization, "eps": eps}
        super().__init__(params, rule_defaults={"sinkgd": hyper}, allowed_rules=("sinkgd",), default_rule="sinkgd",
                         foreach=foreach, maximize=maximize, nonfinite=nonfinite,
                         compile=compile, verify_every=verify_every, fused=fused)
