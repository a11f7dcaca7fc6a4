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
from typing import Literal, Optional, Sequence, Union

import torch
from torch import Tensor

from . import _compiled
from ._common import AllReduceSum, Workspace, as_compute, as_rows, chunks_by_numel, group_by_key, fused_kernels

__all__ = ["sinkgd", "sinkhorn_scalings", "max_abs", "first_pass_maxima", "NORMALIZATIONS"]

Normalization = Literal["uniform", "sr"]
NORMALIZATIONS: tuple[str, ...] = ("uniform", "sr")


def max_abs(matrices: Tensor) -> Tensor:
    """max |G| of an (n, m) matrix (0-D) or of each matrix of a (b, n, m) stack, with 1 for all-zero/empty ones."""
    flat = matrices.reshape(-1) if matrices.ndim == 2 else matrices.reshape(matrices.shape[0], -1)
    if flat.shape[-1] == 0:
        return torch.ones(flat.shape[:-1], dtype=matrices.dtype, device=matrices.device)
    low, high = torch.aminmax(flat, dim=-1) if flat.ndim == 2 else torch.aminmax(flat)
    largest = torch.maximum(low.abs(), high)
    return torch.where(largest > 0, largest, torch.ones_like(largest))


def _limit(dtype: torch.dtype, length: int) -> float:
    # note: the largest squared scaling whose mat-vec with entries ≤ 1 cannot overflow ``dtype``.
    return torch.finfo(dtype).max / (4.0 * max(length, 1))


def sinkhorn_scalings(squares: Tensor, *, iters: int, eps: float, normalization: Normalization,
                      global_rows: int, all_reduce: Optional[AllReduceSum] = None,
                      grad_scale: Optional[Tensor] = None, squares_scale: Optional[Tensor] = None,
                      row_sums: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """The row and column scalings r, c with X = diag(r)·(G/s)·diag(c), from ``squares`` = (G/s) ⊙ (G/s).

    ``squares`` is (n, m) or a stack (b, n, m) of same-shape matrices; r is (…, n), c is (…, m), both
    float64. ``grad_scale`` is s (0-D, or (b,) for a stack; default 1): dividing G by its largest |entry|
    keeps Q finite for any finite G, and ε/s in the first row step makes the result that of G, ε included.
    ``global_rows`` is n of the unsharded matrix (used by "sr"); ``all_reduce`` sums the column
    statistics across the shards of dim 0 (None when the matrix is whole).
    ``squares_scale``: q (0-D, or (b,)) when ``squares`` holds q·(G/s)⊙(G/s) — q = s² for G ⊙ G itself
    (every entry ≤ 1) — and each mat-vec is divided by q in float64: the same computation for G/s
    without a pass over the matrix to form it.
    ``row_sums``: ``squares.sum(-1)`` when the caller already has it (the first row step's mat-vec).
    """
    *batch, n, m = squares.shape
    vector = dict(dtype=torch.float64, device=squares.device)
    if iters == 0:
        return torch.ones(*batch, n, **vector), torch.ones(*batch, m, **vector)
    # note: the first row step sees ‖G_i/s‖ = ‖G_i‖/s, so ε/s there makes the result exactly that of G
    # (afterwards X is normalised and scale-free); this is starting r at s without overflowing r·‖…‖.
    first_eps: Union[float, Tensor] = eps
    if grad_scale is not None:
        first_eps = eps / grad_scale.to(torch.float64).reshape(*batch, 1)  # broadcasts over each row vector
    unscale = None if squares_scale is None else squares_scale.to(torch.float64).reshape(*batch, 1)
    col_unscale = None if unscale is None else unscale.to(squares.dtype)  # q ∈ [2⁻⁶⁰, 1]: exact enough in float32

    def norms(sums: Tensor) -> Tensor:  # sqrt of a mat-vec's sums of squares, in float64, as a new tensor
        wide = torch.div(sums, unscale) if unscale is not None else sums.to(torch.float64, copy=True)
        return wide.sqrt_()

    eps64 = torch.tensor(eps, dtype=torch.float64, device=squares.device)

    row_target = math.sqrt(m) if normalization == "sr" else 1.0
    col_target = math.sqrt(global_rows) if normalization == "sr" else 1.0
    # note: an all-zero row (or column) makes its scaling grow by 1/ε per iteration while X's row stays 0;
    # capping the scalings keeps every product and mat-vec finite (0 · cap = 0, never 0 · inf = NaN).
    row_cap, col_cap = math.sqrt(_limit(squares.dtype, n)), math.sqrt(_limit(squares.dtype, m))
    rows = cols = None
    for iteration in range(iters):
        # r ← r / (r ⊙ ‖row of Q·c²‖ + ε) · target, starting from r = c = 1 (written in place: the
        # vector work is most of a small matrix's step)
        if cols is None:
            rows = norms(row_sums if row_sums is not None else squares.sum(-1)).add_(first_eps).reciprocal_()
        else:
            row_sq = torch.matmul(squares, cols.square().to(squares.dtype).unsqueeze(-1)).squeeze(-1)
            rows = rows.div_(torch.addcmul(eps64, norms(row_sq), rows))
        if row_target != 1.0:
            rows.mul_(row_target)
        rows.clamp_(max=row_cap)
        col_sq = torch.matmul(rows.square().to(squares.dtype).unsqueeze(-2), squares).squeeze(-2)
        if unscale is not None:
            # note: before the all-reduce: each shard's squares carry their own q, and only
            # r² ⊙ (G/s)² — what remains after dividing by it — adds up across shards.
            col_sq = col_sq.div_(col_unscale)
        if all_reduce is not None:
            all_reduce([col_sq])
        cols = _column_step(cols, col_sq, eps=eps, eps64=eps64, target=col_target, cap=col_cap)
    return rows, cols


def _column_step(cols: Optional[Tensor], col_sq: Tensor, *, eps: float, eps64: Tensor, target: float,
                 cap: float) -> Tensor:
    """c ← min(c / (c ⊙ sqrt(col_sq) + ε) · target, cap) in float64 (c = 1 when ``None``; in place otherwise)."""
    if cols is None:
        cols = col_sq.to(torch.float64).sqrt_().add_(eps).reciprocal_()
    else:
        cols = cols.div_(torch.addcmul(eps64, col_sq.to(torch.float64).sqrt_(), cols))
    if target != 1.0:
        cols.mul_(target)
    return cols.clamp_(max=cap)


#: Squares of a gradient whose largest row sum s² is in this range are used as they are (no G/s pass):
#: entries ≤ 1 keep the overflow caps valid, and an entry underflows only when it is below 2⁻³³·s.
_RAW_SQUARES_RANGE = (2.0**-60, 1.0)


def _squares_into(out: Tensor, grad: Tensor) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Fill ``out`` with q·(G/s) ⊙ (G/s); return (s, q, the row sums of ``out`` or None), float64 s and q.

    On CPU, where G's range allows, ``out`` is G ⊙ G itself (q = s², s² the largest row sum: any s with
    entries of G/s ≤ 1 gives the same X, and this one costs no extra pass). Otherwise q = 1 and s = max |G|.
    """
    torch.mul(grad, grad, out=out)
    if out.device.type == "cpu" and out.numel():  # note: reading the peak is a device sync, free on CPU only
        row_sums = out.sum(-1)
        peak = row_sums.max()
        if _RAW_SQUARES_RANGE[0] <= float(peak) <= _RAW_SQUARES_RANGE[1]:
            peak = peak.to(torch.float64)
            return peak.sqrt(), peak, row_sums
    grad_scale = max_abs(grad)
    torch.div(grad, grad_scale, out=out).square_()
    return grad_scale.to(torch.float64), torch.ones((), dtype=torch.float64, device=out.device), None


def _apply(param: Tensor, grad: Tensor, work: Tensor, rows: Tensor, cols: Tensor, grad_scale: Tensor, *,
           raw: bool, lr: float, weight_decay: float, step_size: float) -> None:
    """θ ← θ·(1 − ηλ) + step · diag(r)·(G/s)·diag(c), with ``work`` (G's shape) as the one scratch buffer.

    On the raw-squares path (s ≥ 2⁻³⁰, so r/s is finite) G·diag(c) goes into ``work`` and θ takes it
    times r/s row by row (``addcmul``): two passes over the matrix besides θ's own read and write.
    Otherwise G/s is formed first (s may be tiny or huge).
    """
    if raw:
        torch.mul(grad, cols.to(grad.dtype), out=work)
        row_factor = rows / grad_scale
    else:
        torch.div(grad, grad_scale.to(grad.dtype), out=work).mul_(cols.to(grad.dtype))
        row_factor = rows
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    row_factor = row_factor.to(grad.dtype).unsqueeze(-1)
    if param.is_contiguous():
        param.view(grad.shape).addcmul_(work, row_factor, value=step_size)
    else:
        param.add_(work.mul_(row_factor).view_as(param), alpha=step_size)


def _single_tensor_sinkgd(params: list[Tensor], grads: list[Tensor], *, lr: float, weight_decay: float,
                          iters: int, scale: float, normalization: Normalization, eps: float, maximize: bool,
                          all_reduce: Optional[AllReduceSum], sharded: Optional[Sequence[bool]],
                          global_shapes: Optional[Sequence[Sequence[int]]], compiled: bool = False) -> None:
    step_size = -lr * scale * (-1.0 if maximize else 1.0)
    scratch = Workspace()  # one matrix-sized buffer for the whole call: Q, then G·diag(c), of each matrix
    for i, (param, grad) in enumerate(zip(params, grads)):
        g = as_rows(as_compute(grad))
        work = scratch.take(g.numel(), g).view(g.shape)
        grad_scale, squares_scale, row_sums = _squares_into(work, g)
        reduce = all_reduce if (sharded is not None and sharded[i]) else None
        n_global = global_shapes[i][0] if global_shapes is not None else g.shape[0]
        rows, cols = sinkhorn_scalings(work, iters=iters, eps=eps, normalization=normalization,
                                       global_rows=n_global, all_reduce=reduce, grad_scale=grad_scale,
                                       squares_scale=squares_scale, row_sums=row_sums)
        if compiled:
            _compiled.sinkgd_update(param, g, grad_scale.to(g.dtype), rows.to(g.dtype), cols.to(g.dtype), lr=lr,
                                    weight_decay=weight_decay, step_scale=scale * (-1.0 if maximize else 1.0))
        else:
            _apply(param, g, work, rows, cols, grad_scale, raw=row_sums is not None, lr=lr,
                   weight_decay=weight_decay, step_size=step_size)


def first_pass_maxima(grads: list[Tensor]) -> list[Optional[float]]:
    """max |G| of each gradient the fused kernels read in host memory as it is (else None): the first read of a
    fused SinkGD step, done early. Any NaN/Inf in G makes it non-finite, so the optimizer's finite check
    uses it instead of reading G again, and hands it back through ``sinkgd(..., grad_maxima=)``."""
    out: list[Optional[float]] = []
    for grad in grads:
        kernels = fused_kernels(grad.device) if grad.ndim >= 2 else None
        out.append(kernels.max_abs(grad) if kernels is not None and kernels.FIRST_PASS and kernels.first_pass_ok(grad)
                   else None)
    return out


def _fused_sinkgd(params: list[Tensor], grads: list[Tensor], *, lr: float, weight_decay: float, iters: int,
                  scale: float, normalization: Normalization, eps: float, maximize: bool,
                  all_reduce: Optional[AllReduceSum], sharded: Optional[Sequence[bool]],
                  global_shapes: Optional[Sequence[Sequence[int]]],
                  grad_maxima: Optional[Sequence[Optional[float]]] = None) -> None:
    """The kernel path (Triton on CUDA, C on CPU): per Sinkhorn iteration one sweep over G's row blocks (row
    step + column sums, G/s squared on the fly: SPEC §3's single pass), then the O(m) column step here; then
    one pass for θ. Hyperparameters stay on the device, so a CUDA step reads nothing back to the host.
    """
    step_size = -lr * scale * (-1.0 if maximize else 1.0)
    for i, (param, grad) in enumerate(zip(params, grads)):
        g = as_rows(as_compute(grad)).contiguous()
        kernels = fused_kernels(g.device)
        n, m = g.shape
        n_global = global_shapes[i][0] if global_shapes is not None else n
        reduce = all_reduce if (sharded is not None and sharded[i]) else None
        scaling_dtype = kernels.scaling_dtype(g.dtype)
        row_target = math.sqrt(m) if normalization == "sr" else 1.0
        col_target = math.sqrt(n_global) if normalization == "sr" else 1.0
        row_cap, col_cap = (math.sqrt(_limit(kernels.cap_dtype(g.dtype), k)) for k in (n, m))
        target = param if param.is_contiguous() else param.contiguous()
        if reduce is None and kernels.sinkgd_step is not None:  # the whole step in one call
            kernels.sinkgd_step(target.view(n, m), g, iters=iters, eps=eps, row_target=row_target,
                                col_target=col_target, row_cap=row_cap, col_cap=col_cap,
                                decay=1.0 - lr * weight_decay, step=step_size,
                                largest=None if grad_maxima is None else grad_maxima[i])
        else:
            _fused_sinkgd_iterations(kernels, target.view(n, m), g, reduce, iters=iters, eps=eps,
                                     row_target=row_target, col_target=col_target, row_cap=row_cap,
                                     col_cap=col_cap, decay=1.0 - lr * weight_decay, step=step_size,
                                     scaling_dtype=scaling_dtype)
        if target is not param:
            param.copy_(target)


def _fused_sinkgd_iterations(kernels, param: Tensor, g: Tensor, reduce: Optional[AllReduceSum], *,  # type: ignore[no-untyped-def]
                             iters: int, eps: float, row_target: float, col_target: float, row_cap: float,
                             col_cap: float, decay: float, step: float, scaling_dtype: torch.dtype) -> None:
    """One matrix, one kernel sweep per iteration with the column step (and the all-reduce) in between."""
    n, m = g.shape
    on = dict(dtype=scaling_dtype, device=g.device)
    grad_scale = max_abs(g).to(**on)  # s = max |G|: G/s is squared on the fly and cannot overflow
    # [s, ε of this iteration, target, cap]; the first row step uses ε/s (see sinkhorn_scalings)
    row_hparams = torch.tensor([1.0, eps, row_target, row_cap], **on)
    row_hparams[0:1] = grad_scale
    row_hparams[1:2] = eps / grad_scale
    eps64 = torch.tensor(eps, dtype=torch.float64, device=g.device)
    rows = torch.ones(n, **on)
    cols = None
    for iteration in range(iters):
        if iteration == 1:
            row_hparams[1] = eps
        col_squares = torch.ones(m, **on) if cols is None else cols.square().to(scaling_dtype)
        col_sq = kernels.sinkhorn_row_pass(g, rows, col_squares, row_hparams)
        if reduce is not None:
            reduce([col_sq])
        cols = _column_step(cols, col_sq, eps=eps, eps64=eps64, target=col_target, cap=col_cap)
    col_scaling = torch.ones(m, dtype=g.dtype, device=g.device) if cols is None else cols.to(g.dtype)
    apply_hparams = torch.tensor([decay, step, 1.0], **on)
    apply_hparams[2:3] = grad_scale
    kernels.sinkgd_apply(param, g, rows, col_scaling, apply_hparams)


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
        tuple(as_rows(grads[i]).shape), grads[i].device, grads[i].dtype, params[i].dtype,
        n_global[i], is_sharded[i]))
    scratch = Workspace()  # one chunk-sized stack of Q for the whole call, its slots reused by G·diag(c)
    for indices in same_kind.values():
        reduce = all_reduce if is_sharded[indices[0]] else None
        for chunk in chunks_by_numel(indices, numels, budget):
            matrices = [as_rows(as_compute(grads[i])) for i in chunk]
            shape = matrices[0].shape
            work = scratch.take(len(chunk) * math.prod(shape), matrices[0]).view(len(chunk), *shape)
            filled = [_squares_into(slot, g) for slot, g in zip(work, matrices)]  # no stacking copy of G
            grad_scale = torch.stack([f[0] for f in filled])
            row_sums = None if any(f[2] is None for f in filled) else torch.stack([f[2] for f in filled])
            rows, cols = sinkhorn_scalings(work, iters=iters, eps=eps, normalization=normalization,
                                           global_rows=n_global[chunk[0]], all_reduce=reduce, grad_scale=grad_scale,
                                           squares_scale=torch.stack([f[1] for f in filled]), row_sums=row_sums)
            for k, (i, g) in enumerate(zip(chunk, matrices)):
                _apply(params[i], g, work[k], rows[k], cols[k], grad_scale[k], raw=filled[k][2] is not None, lr=lr,
                       weight_decay=weight_decay, step_size=step_size)


def sinkgd(params: list[Tensor], grads: list[Tensor], *, lr: float, weight_decay: float, iters: int = 5,
           scale: float = 1.0, normalization: Normalization = "uniform", eps: float = 1e-8, maximize: bool = False,
           foreach: bool = False, all_reduce: Optional[AllReduceSum] = None, sharded: Optional[Sequence[bool]] = None,
           global_shapes: Optional[Sequence[Sequence[int]]] = None, compiled: bool = False,
           fused: bool = False, grad_maxima: Optional[Sequence[Optional[float]]] = None) -> None:
    r"""Functional SinkGD: ``θ ← θ·(1 − ηλ) − η·scale·Sinkhorn_L(g)`` for each (n, m, …) parameter.

    Args:
        params, grads: parallel lists of tensors with ndim ≥ 2 (trailing dims are flattened).
        lr, weight_decay: η and λ.  iters: L, the number of row/column normalisation rounds.
        scale: multiplies the normalised gradient.  normalization: "uniform" (unit row/column norms)
            or "sr" (norms sqrt(m) and sqrt(n), as in the SinkGD paper; = sqrt(n) × uniform).
        eps: added to each norm.  foreach: stack same-shape matrices and use batched mat-vecs.
        compiled: apply X = diag(r)·G·diag(c) and the update in one ``torch.compile`` kernel per matrix.
        fused: the kernels of :mod:`sage_optim.kernels`, Triton on CUDA and C on CPU (one sweep over G per
            iteration, G ⊙ G never stored; one pass for θ). Overrides ``compiled`` and ``foreach``.
        all_reduce, sharded, global_shapes: for dim-0-sharded parameters (see :func:`sage`).
        grad_maxima: with ``fused``, :func:`first_pass_maxima` of ``grads`` when the caller already read them
            (an entry None: read here).
    """
    if not params:
        return
    kwargs = dict(lr=lr, weight_decay=weight_decay, iters=iters, scale=scale, normalization=normalization, eps=eps,
                  maximize=maximize, all_reduce=all_reduce, sharded=sharded, global_shapes=global_shapes)
    if fused:
        _fused_sinkgd(params, grads, grad_maxima=grad_maxima, **kwargs)
    elif compiled:
        _single_tensor_sinkgd(params, grads, compiled=True, **kwargs)
    elif foreach:
        _foreach_sinkgd(params, grads, **kwargs)
    else:
        _single_tensor_sinkgd(params, grads, **kwargs)
