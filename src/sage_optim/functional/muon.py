"""Muon (torch.optim.Muon) on a dim-0 shard of a matrix: what FSDP2 needs that torch's step lacks.

Muon's update is the Newton–Schulz orthogonalisation of the whole momentum matrix, a function of every
row, so a shard cannot compute its rows alone. The momentum ``B ← β B + (1 − β) G`` and the Nesterov
mix stay element-wise on the shard; the mixed matrix is gathered whole, orthogonalised on every rank
(the same float operations on the same data give the same result everywhere), and each rank applies
its own rows:

.. code-block:: text

    B   ← lerp(B, G, 1 − β)                 (the shard's rows)
    U   = lerp(G, B, β)   (nesterov)   or   B
    O   = NS₅(gather(U))                    (the whole matrix, torch's coefficients)
    θ   ← θ · (1 − η λ) − η' · O[rows of this shard]
    η'  = η · 0.2 · √max(A, B)   (match_rms_adamw; "original": η · √max(1, A/B); A × B the global shape)

That is torch's ``_single_tensor_muon`` step for one parameter, reorganised around the gather (its
Newton–Schulz iteration and learning-rate adjustment are torch's own, called here). Cost per matrix and
step: one all-gather of the matrix, and the orthogonalisation repeated on every rank.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["muon_shard_"]


def muon_shard_(param: Tensor, grad: Tensor, momentum_buffer: Tensor, *, gather: Callable[[Tensor], Tensor],
                first_row: int, global_shape: Sequence[int], lr: float, weight_decay: float, momentum: float,
                nesterov: bool, ns_coefficients: tuple[float, float, float], ns_steps: int, eps: float,
                adjust_lr_fn: Optional[str]) -> None:
    """One Muon step of a matrix shard (rows ``first_row`` … of a ``global_shape`` matrix), in place.

    ``gather`` turns this shard's rows of a matrix into the whole matrix (a collective: every rank of the
    shard group calls it, in the same order). ``grad`` in the momentum buffer's dtype, already negated for
    ``maximize``.
    """
    from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz

    momentum_buffer.lerp_(grad, 1 - momentum)
    update = grad.lerp(momentum_buffer, momentum) if nesterov else momentum_buffer
    whole = _zeropower_via_newtonschulz(gather(update), ns_coefficients, ns_steps, eps)
    adjusted_lr = _adjust_lr(lr, adjust_lr_fn, torch.Size(global_shape))
    param.mul_(1 - lr * weight_decay)
    param.add_(whole[first_row:first_row + param.shape[0]], alpha=-adjusted_lr)
