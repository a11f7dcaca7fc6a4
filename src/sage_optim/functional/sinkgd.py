r"""SinkGD as pure functions on lists of tensors (SPEC §3): stateless Sinkhorn-normalised gradients.

For one matrix gradient G (n × m; trailing dims flattened):

.. code-block:: text

    X ← G
    repeat L times:
        X ← X / (‖X_row‖₂ + ε)      [× sqrt(m) when normalization = "sr"]
        X ← X / (‖X_col‖₂ + ε)      [× sqrt(n) when normalization = "sr"]
    θ ← θ · (1 − η λ) − η · scale · X

Computed in diagonal-scaling form: X = diag(r) · G · diag(c), so each iteration updates only the
vectors r and c from Q = G ⊙ G with two mat-vecs:

.. code-block:: text

    ‖X_row‖ = r ⊙ sqrt(Q (c ⊙ c)),      ‖X_col‖ = c ⊙ sqrt(Qᵀ (r ⊙ r))

which equals the rewrite-the-matrix form exactly, ε included. Under ``Shard(0)`` the row norms are
local; the column sums ``Qᵀ (r ⊙ r)`` are all-reduced across shards, once per iteration for all
matrices of a chunk.
"""
from __future__ import annotations

import math
from typing import Literal, Optional, Sequence

import torch
from torch import Tensor

from . import _compiled
from ._common import AllReduceSum, as_compute, chunks_by_numel, group_by_key

__all__ = ["sinkgd", "sinkhorn_scalings", "NORMALIZATIONS"]

Normalization = Literal["uniform", "sr"]
NORMALIZATIONS: tuple[str, ...] = ("uniform", "sr")


def _as_matrix(t: Tensor) -> Tensor:
    # note: explicit column count, not -1: an empty shard (0 local rows under FSDP2) cannot infer it.
    return t.reshape(t.shape[0], math.prod(t.shape[1:]))


def sinkhorn_scalings(squares: Tensor, *, iters: int, eps: float, normalization: Normalization,
                      global_rows: int, all_reduce: Optional[AllReduceSum] = None) -> tuple[Tensor, Tensor]:
    """The row and column scalings r, c with X = diag(r)·G·diag(c), from ``squares`` = G ⊙ G.

    ``squares`` is (n, m) or a stack (b, n, m) of same-shape matrices; r is (…, n), c is (…, m).
    ``global_rows`` is n of the unsharded matrix (used by "sr"); ``all_reduce`` sums the column
    statistics across the shards of dim 0 (None when the matrix is whole).
    """
    *batch, n, m = squares.shape
    rows = torch.ones(*batch, n, dtype=squares.dtype, device=squares.device)
    cols = torch.ones(*batch, m, dtype=squares.dtype, device=squares.device)
    row_target = math.sqrt(m) if normalization == "sr" else 1.0
    col_target = math.sqrt(global_rows) if normalization == "sr" else 1.0
    for _ in range(iters):
        row_sq = torch.matmul(squares, (cols * cols).unsqueeze(-1)).squeeze(-1)
        rows = rows / (rows * row_sq.sqrt() + eps)
        if row_target != 1.0:
            rows = rows * row_target
        col_sq = torch.matmul((rows * rows).unsqueeze(-2), squares).squeeze(-2)
        if all_reduce is not None:
            all_reduce([col_sq])
        cols = cols / (cols * col_sq.sqrt() + eps)
        if col_target != 1.0:
            cols = cols * col_target
    return rows, cols


def _single_tensor_sinkgd(params: list[Tensor], grads: list[Tensor], *, lr: float, weight_decay: float,
                          iters: int, scale: float, normalization: Normalization, eps: float, maximize: bool,
                          all_reduce: Optional[AllReduceSum], sharded: Optional[Sequence[bool]],
                          global_shapes: Optional[Sequence[Sequence[int]]], compiled: bool = False) -> None:
    for i, (param, grad) in enumerate(zip(params, grads)):
        g = _as_matrix(as_compute(grad))
        work = g * g  # Q; its buffer is reused for X, so the step holds one full-size temporary
        reduce = all_reduce if (sharded is not None and sharded[i]) else None
        n_global = global_shapes[i][0] if global_shapes is not None else g.shape[0]
        rows, cols = sinkhorn_scalings(work, iters=iters, eps=eps, normalization=normalization,
                                       global_rows=n_global, all_reduce=reduce)
        if compiled:
            del work
            _compiled.sinkgd_update(param, g, rows, cols, lr=lr, weight_decay=weight_decay,
                                    step_scale=scale * (-1.0 if maximize else 1.0))
            continue
        torch.mul(g, rows.unsqueeze(-1), out=work).mul_(cols)  # X written over Q: no second temporary
        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay)
        step_size = -lr * scale * (-1.0 if maximize else 1.0)
        param.add_(work.view_as(param), alpha=step_size)


def _foreach_sinkgd(params: list[Tensor], grads: list[Tensor], *, lr: float, weight_decay: float, iters: int,
                    scale: float, normalization: Normalization, eps: float, maximize: bool,
                    all_reduce: Optional[AllReduceSum], sharded: Optional[Sequence[bool]],
                    global_shapes: Optional[Sequence[Sequence[int]]], chunk_numel: Optional[int] = None) -> None:
    # note: chunk by global sizes when sharded: local sizes differ across ranks (uneven shards), and
    # ranks that chunk differently issue different all-reduces (a collective mismatch).
    numels = [math.prod(s) for s in global_shapes] if global_shapes is not None else [p.numel() for p in params]
    budget = chunk_numel if chunk_numel is not None else max(numels, default=0)
    step_size = -lr * scale * (-1.0 if maximize else 1.0)
    n_global = [s[0] for s in global_shapes] if global_shapes is not None else [g.shape[0] for g in grads]
    is_sharded = list(sharded) if sharded is not None else [False] * len(params)
    # Same local shape, device, dtype, global rows and sharding → one stacked Sinkhorn (batched mat-vecs).
    same_kind = group_by_key(range(len(params)), lambda i: (
        tuple(_as_matrix(grads[i]).shape), grads[i].device, grads[i].dtype, params[i].dtype,
        n_global[i], is_sharded[i]))
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    for indices in same_kind.values():
        reduce = all_reduce if is_sharded[indices[0]] else None
        for chunk in chunks_by_numel(indices, numels, budget):
            matrices = [_as_matrix(as_compute(grads[i])) for i in chunk]
            work = torch.stack(matrices)
            work.square_()
            rows, cols = sinkhorn_scalings(work, iters=iters, eps=eps, normalization=normalization,
                                           global_rows=n_global[chunk[0]], all_reduce=reduce)
            for k, matrix in enumerate(matrices):  # X = diag(r)·G·diag(c), written over Q's buffer
                torch.mul(matrix, rows[k].unsqueeze(-1), out=work[k]).mul_(cols[k])
            torch._foreach_add_([params[i] for i in chunk], [x.view_as(params[i]) for x, i in zip(work, chunk)],
                                alpha=step_size)
            del work


def sinkgd(params: list[Tensor], grads: list[Tensor], *, lr: float, weight_decay: float, iters: int = 5,
           scale: float = 1.0, normalization: Normalization = "uniform", eps: float = 1e-8, maximize: bool = False,
           foreach: bool = False, all_reduce: Optional[AllReduceSum] = None, sharded: Optional[Sequence[bool]] = None,
           global_shapes: Optional[Sequence[Sequence[int]]] = None, compiled: bool = False) -> None:
    r"""Functional SinkGD: ``θ ← θ·(1 − ηλ) − η·scale·Sinkhorn_L(g)`` for each (n, m, …) parameter.

    Args:
        params, grads: parallel lists of tensors with ndim ≥ 2 (trailing dims are flattened).
        lr, weight_decay: η and λ.  iters: L, the number of row/column normalisation rounds.
        scale: multiplies the normalised gradient.  normalization: "uniform" (unit row/column norms)
            or "sr" (norms sqrt(m) and sqrt(n), as in the SinkGD paper; = sqrt(n) × uniform).
        eps: added to each norm.  foreach: stack same-shape matrices and use batched mat-vecs.
        compiled: apply X = diag(r)·G·diag(c) and the update in one ``torch.compile`` kernel per matrix.
        all_reduce, sharded, global_shapes: for dim-0-sharded parameters (see :func:`sage`).
    """
    if not params:
        return
    kwargs = dict(lr=lr, weight_decay=weight_decay, iters=iters, scale=scale, normalization=normalization, eps=eps,
                  maximize=maximize, all_reduce=all_reduce, sharded=sharded, global_shapes=global_shapes)
    if compiled:
        _single_tensor_sinkgd(params, grads, compiled=True, **kwargs)
    elif foreach:
        _foreach_sinkgd(params, grads, **kwargs)
    else:
        _single_tensor_sinkgd(params, grads, **kwargs)
