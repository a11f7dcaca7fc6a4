"""Literal float64 transcriptions of the paper's equations (SPEC §2, §3). Never optimised.

Every faster path in :mod:`sage_optim.functional` is tested against these, the way torch.optim
tests foreach/fused against its for-loop.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ReferenceSAGEState", "reference_sage_step", "reference_sinkhorn", "reference_sinkgd_step"]


@dataclass
class ReferenceSAGEState:
    """m (same shape as θ), S (θ.shape[1:] or θ.shape), t (completed steps)."""
    momentum: Tensor
    col_ema: Tensor
    step: int = 0

    @classmethod
    def zeros_like(cls, param: Tensor) -> "ReferenceSAGEState":
        vec_shape = param.shape[1:] if param.ndim >= 2 else param.shape
        return cls(torch.zeros_like(param, dtype=torch.float64),
                   torch.zeros(vec_shape, dtype=torch.float64))


def _sign(x: Tensor) -> Tensor:
    return torch.sign(x)  # sign(0) = 0


def reference_sage_step(param: Tensor, grad: Tensor, state: ReferenceSAGEState, *, lr: float,
                        beta1: float = 0.9, beta2: float = 0.99, eps: float = 1e-8, weight_decay: float = 0.0,
                        damper: bool = True, instant_damper: bool = True, code_compat: bool = False) -> Tensor:
    """One SAGE step, SPEC §2 line by line, in float64. Returns the new θ; updates ``state``."""
    theta = param.double()
    g = grad.double()
    m = state.momentum
    state.step += 1
    t = state.step

    theta = theta * (1 - lr * weight_decay)
    if theta.ndim >= 2:
        s = g.abs().mean(dim=0)
    else:
        s = g.abs()
    if damper:
        state.col_ema = beta2 * state.col_ema + (1 - beta2) * s
        s_hat = state.col_ema / (1 - beta2**t)
        sigma = torch.sqrt(torch.mean(s_hat**2))
        gamma = torch.sqrt(torch.mean(s**2))
        h = torch.minimum(sigma / (s_hat + eps), torch.ones_like(s_hat))
        if instant_damper:
            h = torch.minimum(h, gamma / (s + eps))
    else:
        h = torch.ones_like(s)
    if code_compat:
        m = beta2 * m + (1 - beta2) * g
        c = _sign(beta1 * m + (1 - beta1) * g)
    else:
        c = _sign(beta1 * m + (1 - beta1) * g)
        m = beta2 * m + (1 - beta2) * g
    theta = theta - lr * c * h  # h broadcasts over dim 0
    state.momentum = m
    return theta


def reference_sinkhorn(grad: Tensor, *, iters: int = 5, eps: float = 1e-8, normalization: str = "uniform") -> Tensor:
    """The rewrite-the-matrix Sinkhorn of SPEC §3 in float64 (the form the fast path must equal)."""
    x = grad.double().reshape(grad.shape[0], -1)
    n, m = x.shape
    for _ in range(iters):
        x = x / (torch.linalg.vector_norm(x, dim=1, keepdim=True) + eps)
        if normalization == "sr":
            x = x * m**0.5
        x = x / (torch.linalg.vector_norm(x, dim=0, keepdim=True) + eps)
        if normalization == "sr":
            x = x * n**0.5
    return x.reshape(grad.shape)


def reference_sinkgd_step(param: Tensor, grad: Tensor, *, lr: float, weight_decay: float = 0.0, iters: int = 5,
                          scale: float = 1.0, normalization: str = "uniform", eps: float = 1e-8) -> Tensor:
    """One SinkGD step in float64: θ·(1 − ηλ) − η·scale·Sinkhorn(g)."""
    x = reference_sinkhorn(grad, iters=iters, eps=eps, normalization=normalization)
    return param.double() * (1 - lr * weight_decay) - lr * scale * x
