"""SAGE and Lion: one sign-update engine, with and without the damper."""
from __future__ import annotations

from typing import Any, Optional, Union

import torch

from ._base import RuleOptimizer
from ._docs import COMMON_ARGS, STATE_DTYPE_ARG

__all__ = ["SAGE", "Lion"]


class SAGE(RuleOptimizer):
    __doc__ = r"""SAGE: Sign-Adaptive Gradient (Lee & Kim, ACL Findings 2026, arXiv:2604.07663).

    A Lion-style sign update whose step is scaled per column by a bounded damper built from an EMA of
    the mean |gradient| over dim 0, so the extra state is one vector of ``θ.shape[1:]``:

    .. code-block:: text

        θ   ← θ · (1 − η λ)
        s_t = mean_{dim 0} |g|   (ndim ≥ 2),   s_t = |g|   (ndim ≤ 1)
        S_t = β2 S_{t−1} + (1 − β2) s_t,   Ŝ_t = S_t / (1 − β2^t)
        H_t = min(rms(Ŝ_t) / (Ŝ_t + ε),  rms(s_t) / (s_t + ε),  1)
        θ   ← θ − η · sign(β1 m_{t−1} + (1 − β1) g) ⊙ H_t
        m_t = β2 m_{t−1} + (1 − β2) g

    Every element moves by at most η per step (weight decay aside), since 0 ≤ H ≤ 1.

    Args:
        params: iterable of parameters, ``(name, parameter)`` pairs, or param-group dicts.
        lr (float): η. Default ``2e-3``.
        betas (tuple[float, float]): (β1, β2). β1 mixes the sign direction; β2 is the momentum and damper
            EMA rate. Default ``(0.9, 0.99)``.
        eps (float): ε in the damper. Default ``1e-8``.
        weight_decay (float): decoupled weight decay λ. Default ``1e-2``.
        code_compat (bool): update the momentum *before* taking the sign, as the authors' released code does
            (``sign(β1 m_t + (1 − β1) g)``). Default ``False``: the paper's order above.
        instant_damper (bool): include the instantaneous term rms(s_t) / (s_t + ε) in H. Default ``True``.
{state_dtype_arg}
{common_args}

    State (per parameter):
        ``step``: 0-D float32 tensor on the CPU, steps taken.
        ``exp_avg``: m, same shape as θ, dtype ``state_dtype``.
        ``col_ema``: S, shape ``θ.shape[1:]`` (``θ.shape`` for ndim ≤ 1), float32 (float64 for float64 θ).

    Example:
        >>> model = torch.nn.Linear(4, 3)
        >>> opt = SAGE(model.parameters(), lr=2e-3)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step(); opt.zero_grad()
    """.replace("{state_dtype_arg}", STATE_DTYPE_ARG).replace("{common_args}", COMMON_ARGS)

    def __init__(self, params: Any, lr: float = 2e-3, betas: tuple[float, float] = (0.9, 0.99), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, code_compat: bool = False, instant_damper: bool = True,
                 foreach: Optional[bool] = None, maximize: bool = False,
                 state_dtype: Union[torch.dtype, str, None] = None, nonfinite: str = "raise", compile: bool = False, fused: Optional[bool] = None,
                 verify_every: Optional[int] = None) -> None:
        hyper = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "code_compat": code_compat,
                 "instant_damper": instant_damper, "state_dtype": state_dtype}
        super().__init__(params, rule_defaults={"sage": hyper}, allowed_rules=("sage",), default_rule="sage",
                         foreach=foreach, maximize=maximize, nonfinite=nonfinite,
                         compile=compile, verify_every=verify_every, fused=fused)


class Lion(RuleOptimizer):
    __doc__ = r"""Lion (Chen et al., 2023, arXiv:2302.06675): SAGE with the damper fixed to H ≡ 1.

    .. code-block:: text

        θ   ← θ · (1 − η λ) − η · sign(β1 m_{t−1} + (1 − β1) g)
        m_t = β2 m_{t−1} + (1 − β2) g

    It runs SAGE's code with the damper switched off (no copy), and matches ``lion-pytorch`` step for step.

    Args:
        params: iterable of parameters or param-group dicts.
        lr (float): η. Default ``1e-4``.
        betas (tuple[float, float]): (β1, β2). Default ``(0.9, 0.99)``.
        weight_decay (float): decoupled weight decay λ. Default ``0.0`` (as lion-pytorch).
{state_dtype_arg}
{common_args}

    State (per parameter): ``step`` (0-D float32, CPU) and ``exp_avg`` (same shape as θ).
    """.replace("{state_dtype_arg}", STATE_DTYPE_ARG).replace("{common_args}", COMMON_ARGS)

    def __init__(self, params: Any, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, *, foreach: Optional[bool] = None, maximize: bool = False,
                 state_dtype: Union[torch.dtype, str, None] = None, nonfinite: str = "raise", compile: bool = False, fused: Optional[bool] = None,
                 verify_every: Optional[int] = None) -> None:
        hyper = {"lr": lr, "betas": betas, "weight_decay": weight_decay, "state_dtype": state_dtype}
        super().__init__(params, rule_defaults={"lion": hyper}, allowed_rules=("lion",), default_rule="lion",
                         foreach=foreach, maximize=maximize, nonfinite=nonfinite,
                         compile=compile, verify_every=verify_every, fused=fused)
