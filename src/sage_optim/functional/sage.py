r"""SAGE and Lion as pure functions on lists of tensors (SPEC §2).

For one parameter :math:`\theta` with gradient :math:`g` at step :math:`t`:

.. code-block:: text

    θ   ← θ · (1 − η λ)
    s_t = mean_{dim 0} |g|          (θ.ndim ≥ 2)      s_t = |g|   (θ.ndim ≤ 1)
    S_t = β2 S_{t−1} + (1 − β2) s_t,   Ŝ_t = S_t / (1 − β2^t)
    σ   = rms(Ŝ_t),   γ = rms(s_t)
    H_t = min(σ / (Ŝ_t + ε), γ / (s_t + ε), 1)           (the damper, broadcast over dim 0)
    C_t = sign(β1 m_{t−1} + (1 − β1) g)
    θ   ← θ − η · C_t ⊙ H_t
    m_t = β2 m_{t−1} + (1 − β2) g

Lion is the same rule with ``damper=False`` (H ≡ 1, no ``col_ema``).
``code_compat=True`` updates ``m`` before taking the sign, as the authors' released code does.

Sharded parameters (FSDP2 ``Shard(0)``): the only cross-shard quantities are the column sums of
|g| (matrices) and the two sums of squares behind σ and γ (vectors). They are computed locally,
handed to ``all_reduce`` in one list, and divided by the *global* sizes from ``global_shapes``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import _compiled
from ._common import (AllReduceSum, Workspace, as_compute, as_rows, chunks_by_numel, group_by_key, row_blocks,
                      fused_kernels)

__all__ = ["sage", "column_abs_mean", "first_pass_column_sums"]


def column_abs_mean(grad: Tensor) -> Tensor:
    """``s_t``: the mean of |g| over dim 0 (shape ``grad.shape[1:]``), or |g| itself for ndim ≤ 1."""
    g = as_compute(grad)
    return g.abs().mean(0) if g.ndim >= 2 else g.abs()


def first_pass_column_sums(grads: list[Tensor]) -> list[Optional[Tensor]]:
    """This step's Σ_rows |g| / rows of each matrix gradient the fused kernels read in host memory as it is
    (else None): the first read of a fused SAGE step, done early. Any NaN/Inf in g makes it non-finite, so the
    optimizer's finite check uses it instead of reading g again, and hands it back through
    ``sage(..., column_means=)``. (Unsharded gradients only: a shard's sums still need their all-reduce.)"""
    out: list[Optional[Tensor]] = []
    for grad in grads:
        kernels = fused_kernels(grad.device) if grad.ndim >= 2 else None
        if kernels is not None and kernels.FIRST_PASS and kernels.first_pass_ok(grad):
            out.append(kernels.column_abs_sums(as_rows(grad), max(grad.shape[0], 1)).reshape(grad.shape[1:]))
        else:
            out.append(None)
    return out


def _local_statistic(grad: Tensor, col_ema: Tensor, step: float, beta2: float,
                     global_rows: Optional[int] = None, scratch: Optional[Workspace] = None,
                     fused: bool = False) -> Tensor:
    """What this process can compute alone, and what must be summed across shards (float64).

    Matrices: this shard's part of the column means of |g| (Σ_local |g| / global rows).  Vectors: the
    EMA is element-wise, so it is updated here, and the two sums of squares (of Ŝ and of s) behind σ
    and γ are returned.
    """
    g = as_compute(grad)
    if g.ndim >= 2:
        rows = max(g.shape[0] if global_rows is None else global_rows, 1)
        matrix = as_rows(g)
        if fused:
            return fused_kernels(g.device).column_abs_sums(matrix.contiguous(), rows).reshape(g.shape[1:])
        scratch = scratch if scratch is not None else Workspace()
        # note: on CPU the blocks are summed first and the O(d) total divided once, checked afterwards
        # (reading it is free there): a block sum overflows only for |g| near float32's max, and then
        # the division goes first, as it always does elsewhere.
        on_cpu = g.device.type == "cpu"
        total = _column_abs_sums(matrix, scratch, None if on_cpu else rows)
        if on_cpu:
            total /= rows
            if not bool(torch.isfinite(total).all()):
                total = _column_abs_sums(matrix, scratch, rows)
        return total.reshape(g.shape[1:])
    abs_grad = g.abs()
    col_ema.lerp_(abs_grad.to(col_ema.dtype), 1 - beta2)
    ema_hat = col_ema.double() / (1 - beta2**step)
    return torch.stack([ema_hat.square().sum(), abs_grad.double().square().sum()])


def _column_abs_sums(matrix: Tensor, scratch: Workspace, divisor: Optional[int]) -> Tensor:
    """Σ_rows |matrix| (/ ``divisor`` per entry, first, when given) per column, as a float64 vector.

    Blocks are summed in the matrix's dtype (a float64-accumulating sum is ~10x slower on CPU) into a
    float64 total, through one cache-sized scratch block.
    """
    total = torch.zeros(matrix.shape[1], dtype=torch.float64, device=matrix.device)
    for block in row_blocks(*matrix.shape):
        part = torch.abs(matrix[block], out=scratch.take(matrix[block].numel(), matrix).view(matrix[block].shape))
        if divisor is not None:
            part.div_(divisor)
        total += part.sum(0)
    return total


def _damper(grad: Tensor, col_ema: Tensor, statistic: Tensor, global_shape: Sequence[int], step: float,
            *, beta2: float, eps: float, instant_damper: bool) -> Tensor:
    """H_t from the (already all-reduced) statistic; shape ``grad.shape[1:]`` (or ``grad.shape``)."""
    bias_correction = 1 - beta2**step
    if grad.ndim >= 2:
        col_abs_mean = statistic  # already divided by the global row count (an empty dim 0 gives 0)
        col_ema.lerp_(col_abs_mean.to(col_ema.dtype), 1 - beta2)
        ema_hat = col_ema.double() / bias_correction
        # note: for a matrix the d-vector is whole on every rank, so its RMS is local.
        sigma = ema_hat.square().mean().sqrt()
        gamma = col_abs_mean.square().mean().sqrt()
    else:
        col_abs_mean = as_compute(grad).abs().double()
        ema_hat = col_ema.double() / bias_correction
        numel = max(math.prod(global_shape), 1)
        sigma = (statistic[0] / numel).sqrt()
        gamma = (statistic[1] / numel).sqrt()
    damper = sigma / (ema_hat + eps)
    if instant_damper:
        damper = torch.minimum(damper, gamma / (col_abs_mean + eps))
    # note: with eps = 0, an all-zero column gives 0/0; its limit (every ratio is 1) is H = 1.
    return damper.nan_to_num_(nan=1.0).clamp_(max=1.0).to(as_compute(grad).dtype)


def _dampers(grads: list[Tensor], col_emas: list[Optional[Tensor]], state_steps: list[Tensor], *, damper: bool,
             beta2: float, eps: float, instant_damper: bool, all_reduce: Optional[AllReduceSum],
             sharded: Optional[Sequence[bool]],
             global_shapes: Optional[Sequence[Sequence[int]]],
             scratch: Optional[Workspace] = None, fused: bool = False,
             column_means: Optional[Sequence[Optional[Tensor]]] = None) -> list[Optional[Tensor]]:
    """H_t of every parameter (``None`` each when ``damper=False``: Lion), after the step counts were advanced."""
    if not damper:
        return [None] * len(grads)
    steps = [float(s) for s in state_steps]
    shapes = global_shapes if global_shapes is not None else [g.shape for g in grads]
    known = column_means if column_means is not None else [None] * len(grads)
    statistics = [x if x is not None else _local_statistic(g, s, t, beta2, shape[0] if len(shape) else 1, scratch, fused)
                  for g, s, t, shape, x in zip(grads, col_emas, steps, shapes, known)]
    if all_reduce is not None and sharded is not None:
        to_reduce = [x for x, is_sharded in zip(statistics, sharded) if is_sharded]
        if to_reduce:
            all_reduce(to_reduce)  # one batched collective for every sharded parameter of the step
    return [
        _damper(g, s, x, shape, t, beta2=beta2, eps=eps, instant_damper=instant_damper)  # type: ignore[arg-type]
        for g, s, x, shape, t in zip(grads, col_emas, statistics, shapes, steps)
    ]


def _lerp_state_(state: Tensor, grad: Tensor, weight: float, scratch: Optional[Tensor] = None) -> None:
    """``state ← (1 − w)·state + w·g`` computed in the gradient's compute precision.

    Lower-precision state (bf16 momentum) is widened for the update (into ``scratch`` when given) and
    rounded to nearest on store.
    """
    if state.dtype == grad.dtype:
        state.lerp_(grad, weight)
        return
    wide = scratch.copy_(state) if scratch is not None else state.to(grad.dtype)
    state.copy_(wide.lerp_(grad, weight))


def _single_tensor_sage(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                        col_emas: list[Optional[Tensor]], state_steps: list[Tensor], *, lr: float,
                        beta1: float, beta2: float, eps: float, weight_decay: float, damper: bool,
                        instant_damper: bool, code_compat: bool, maximize: bool,
                        all_reduce: Optional[AllReduceSum], sharded: Optional[Sequence[bool]],
                        global_shapes: Optional[Sequence[Sequence[int]]], compiled: bool = False,
                        fused: bool = False, column_means: Optional[Sequence[Optional[Tensor]]] = None,
                        quantized: Optional[Sequence[Optional[tuple[Tensor, Tensor]]]] = None,
                        shard_offsets: Optional[Sequence[int]] = None,
                        all_reduce_max: Optional[AllReduceSum] = None) -> None:
    grads = [as_compute(-g if maximize else g) for g in grads]
    for step in state_steps:
        step += 1
    scratch = Workspace()
    dampers = _dampers(grads, col_emas, state_steps, damper=damper, beta2=beta2, eps=eps,
                       instant_damper=instant_damper, all_reduce=all_reduce, sharded=sharded,
                       global_shapes=global_shapes, scratch=scratch, fused=fused, column_means=column_means)
    hparams = dict(lr=lr, weight_decay=weight_decay, beta1=beta1, beta2=beta2, code_compat=code_compat)
    int8 = _Int8Momenta(quantized, state_steps, shard_offsets, sharded, all_reduce_max)
    for i, (param, grad, exp_avg, h) in enumerate(zip(params, grads, exp_avgs, dampers)):
        kernels = fused_kernels(grad.device) if fused else None
        if int8.has(i):
            int8.update(i, param, grad, exp_avg, h, scratch=scratch, kernels=kernels, **hparams)
        elif kernels is not None and param.is_contiguous() and exp_avg.is_contiguous() \
                and kernels.supports_update(param, grad, exp_avg):
            kernels.sign_update(param, grad.contiguous(), exp_avg, h, **hparams)
        elif compiled:
            _compiled.sage_update(param, grad, exp_avg, h, **hparams)
        else:
            _update_one(param, grad, exp_avg, h, scratch=scratch, **hparams)
    int8.store_vector_shards()


def _foreach_sage(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                  col_emas: list[Optional[Tensor]], state_steps: list[Tensor], *, lr: float, beta1: float,
                  beta2: float, eps: float, weight_decay: float, damper: bool, instant_damper: bool,
                  code_compat: bool, maximize: bool, all_reduce: Optional[AllReduceSum],
                  sharded: Optional[Sequence[bool]], global_shapes: Optional[Sequence[Sequence[int]]],
                  chunk_numel: Optional[int] = None,
                  quantized: Optional[Sequence[Optional[tuple[Tensor, Tensor]]]] = None,
                  shard_offsets: Optional[Sequence[int]] = None,
                  all_reduce_max: Optional[AllReduceSum] = None) -> None:
    grads = [as_compute(g) for g in grads]
    if maximize:
        grads = list(torch._foreach_neg(grads))
    torch._foreach_add_(state_steps, 1)
    dampers = _dampers(grads, col_emas, state_steps, damper=damper, beta2=beta2, eps=eps,
                       instant_damper=instant_damper, all_reduce=all_reduce, sharded=sharded,
                       global_shapes=global_shapes)
    int8 = _Int8Momenta(quantized, state_steps, shard_offsets, sharded, all_reduce_max)
    int8_scratch = Workspace()
    hparams = dict(lr=lr, weight_decay=weight_decay, beta1=beta1, beta2=beta2, code_compat=code_compat)
    numels = [p.numel() for p in params]
    # note: the direction is a temporary as large as its chunk; chunks are capped at the largest
    # parameter so the step never holds more than one largest-parameter-sized buffer of temporaries.
    budget = chunk_numel if chunk_numel is not None else max(numels, default=0)
    same_kind = group_by_key(range(len(params)),
                             lambda i: (params[i].device, params[i].dtype, exp_avgs[i].dtype, grads[i].dtype))
    for indices in same_kind.values():
        for chunk in chunks_by_numel(indices, numels, budget):
            p = [params[i] for i in chunk]
            g = [grads[i] for i in chunk]
            m = [exp_avgs[i] for i in chunk]
            if m[0].dtype != g[0].dtype:  # low-precision state: widened per tensor
                for i in chunk:
                    if int8.has(i):
                        int8.update(i, params[i], grads[i], exp_avgs[i], dampers[i], scratch=int8_scratch,
                                    kernels=None, **hparams)
                    else:
                        _update_one(params[i], grads[i], exp_avgs[i], dampers[i], **hparams)
                continue
            if weight_decay != 0:
                torch._foreach_mul_(p, 1 - lr * weight_decay)
            if code_compat:
                torch._foreach_lerp_(m, g, 1 - beta2)
            directions = torch._foreach_lerp(m, g, 1 - beta1)
            if not code_compat:
                torch._foreach_lerp_(m, g, 1 - beta2)
            torch._foreach_sign_(directions)
            for direction, i in zip(directions, chunk):
                h = dampers[i]
                if h is not None:
                    direction.mul_(h)  # broadcast over dim 0: foreach ops do not broadcast
            torch._foreach_add_(p, directions, alpha=-lr)
            del directions
    int8.store_vector_shards()


class _Int8Momenta:
    """The 8-bit momenta of one step's parameters (``quantized`` entries not None): each is decoded, stepped and
    stored block by block (one C pass where the fused kernels take it), rounding by its element's flat index in
    the whole tensor (``shard_offsets``), so a dim-0 shard stores the codes one process would. A sharded vector
    shares blocks with other ranks: its store waits for :meth:`store_vector_shards` (one max all-reduce)."""

    def __init__(self, quantized: Optional[Sequence[Optional[tuple[Tensor, Tensor]]]], steps: Sequence[Tensor],
                 shard_offsets: Optional[Sequence[int]], sharded: Optional[Sequence[bool]],
                 all_reduce_max: Optional[AllReduceSum]) -> None:
        self.entries = list(quantized) if quantized is not None else []
        self.steps = steps
        self.offsets = shard_offsets
        self.sharded = sharded
        self.all_reduce_max = all_reduce_max
        self.pending: list[tuple[Tensor, Tensor, Tensor, int, int]] = []

    def has(self, i: int) -> bool:
        return i < len(self.entries) and self.entries[i] is not None

    def update(self, i: int, param: Tensor, grad: Tensor, codes: Tensor, damper: Optional[Tensor], *,
               scratch: Workspace, kernels, **hparams) -> None:  # type: ignore[no-untyped-def]
        from ._quant import dequantize_slice_into, rounding_key

        absmax, seed = self.entries[i]  # type: ignore[misc]
        first_index = self.offsets[i] if self.offsets is not None else 0
        key = rounding_key(seed, self.steps[i])
        if grad.ndim <= 1 and self.sharded is not None and self.sharded[i]:
            momentum = dequantize_slice_into(torch.empty_like(grad), codes, absmax, first_index)
            _update_block(param, grad, momentum, damper, torch.empty_like(grad), **hparams)
            self.pending.append((codes, absmax, momentum, key, first_index))
            return
        q8 = getattr(kernels, "sign_update_q8", None)
        if q8 is not None and kernels.supports_q8(param, grad, codes, absmax):
            q8(param, grad.contiguous(), codes, absmax, damper, key=key, first_index=first_index, **hparams)
        else:
            _update_quantized(param, grad, codes, damper, absmax, seed, self.steps[i], scratch=scratch,
                              first_index=first_index, **hparams)

    def store_vector_shards(self) -> None:
        """Store the sharded vectors' momenta: their blocks' maxima, combined across ranks, then their codes."""
        if not self.pending:
            return
        from ._quant import quantize_slice_, slice_block_maxima

        if self.all_reduce_max is None:
            raise RuntimeError("sharded int8 momentum of a vector needs all_reduce_max (its blocks span ranks)")
        maxima = [slice_block_maxima(m, absmax.shape[1], first) for _, absmax, m, _, first in self.pending]
        self.all_reduce_max(maxima)  # one collective for every sharded vector of the step
        for (codes, absmax, momentum, key, first_index), largest in zip(self.pending, maxima):
            absmax[0].copy_(largest)
            quantize_slice_(codes, absmax, momentum, key, first_index)
        self.pending = []


def _update_one(param: Tensor, grad: Tensor, exp_avg: Tensor, damper: Optional[Tensor], *, lr: float,
                weight_decay: float, beta1: float, beta2: float, code_compat: bool,
                scratch: Optional[Workspace] = None) -> None:
    """The element-wise part of one parameter's step: decay, signed direction times H, momentum.

    Runs over row blocks of about ``BLOCK_NUMEL`` elements with one cache-sized scratch block for the
    direction, so θ, g and m are each read once and θ, m written once from memory, and the step holds
    no full-size temporary. Non-contiguous tensors (no 2-D view) are done whole. (8-bit momenta:
    :class:`_Int8Momenta`.)
    """
    hparams = dict(lr=lr, weight_decay=weight_decay, beta1=beta1, beta2=beta2, code_compat=code_compat)
    if not (param.is_contiguous() and exp_avg.is_contiguous()):
        h = None if damper is None else damper.expand_as(grad)
        _update_block(param, grad, exp_avg, h, torch.empty_like(grad), **hparams)
        return
    p, g, m = as_rows(param), as_rows(grad), as_rows(exp_avg)
    h = None if damper is None else damper.reshape(1, -1)  # broadcast over the rows of a block
    scratch = scratch if scratch is not None else Workspace()
    for block in row_blocks(*g.shape):
        direction = scratch.take(g[block].numel(), g).view(g[block].shape)
        _update_block(p[block], g[block], m[block], h, direction, **hparams)


def _update_quantized(param: Tensor, grad: Tensor, codes: Tensor, damper: Optional[Tensor], absmax: Tensor,
                      seed: Tensor, step: Tensor, *, scratch: Workspace, lr: float, weight_decay: float, beta1: float,
                      beta2: float, code_compat: bool, first_index: int = 0) -> None:
    """:func:`_update_one` with an 8-bit momentum: per row block, m is decoded into a scratch block, the block
    takes the float-momentum step (:func:`_update_block`), and m's new value is stored with stochastic rounding
    (element 0 is element ``first_index`` of the whole tensor: the rounding follows the whole tensor's indices)."""
    from ._quant import dequantize_into, quantize_, rounding_key

    target = param if param.is_contiguous() else param.contiguous()
    stored = codes if codes.is_contiguous() else codes.contiguous()
    p, g, m = as_rows(target), as_rows(grad.contiguous()), as_rows(stored)
    h = None if damper is None else damper.reshape(1, -1)
    key = rounding_key(seed, step)
    for block in row_blocks(*g.shape):
        shape, numel = g[block].shape, g[block].numel()
        both = scratch.take(2 * numel, g)
        momentum = dequantize_into(both[:numel].view(shape), m[block], absmax[block])
        _update_block(p[block], g[block], momentum, h, both[numel:].view(shape), lr=lr, weight_decay=weight_decay,
                      beta1=beta1, beta2=beta2, code_compat=code_compat)
        quantize_(m[block], absmax[block], momentum, key, first_index=first_index + block.start * g.shape[1])
    if target is not param:
        param.copy_(target)
    if stored is not codes:
        codes.copy_(stored)


def _update_block(param: Tensor, grad: Tensor, exp_avg: Tensor, damper: Optional[Tensor], direction: Tensor, *,
                  lr: float, weight_decay: float, beta1: float, beta2: float, code_compat: bool) -> None:
    """θ·(1 − ηλ) − η·sign(β1·m + (1 − β1)·g)·H and m's update on one block, ``direction`` as scratch."""
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    if code_compat:
        _lerp_state_(exp_avg, grad, 1 - beta2, scratch=direction)
    if exp_avg.dtype == grad.dtype:
        torch.lerp(exp_avg, grad, 1 - beta1, out=direction)
    else:  # low-precision momentum: widened into the scratch block
        direction.copy_(exp_avg).lerp_(grad, 1 - beta1)
    direction.sign_()
    if damper is None:
        param.add_(direction, alpha=-lr)
    else:
        param.addcmul_(direction, damper, value=-lr)
    if not code_compat:  # after θ's update, so that a widened momentum can reuse the scratch block
        _lerp_state_(exp_avg, grad, 1 - beta2, scratch=direction)


def sage(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], col_emas: list[Optional[Tensor]],
         state_steps: list[Tensor], *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
         damper: bool = True, instant_damper: bool = True, code_compat: bool = False, maximize: bool = False,
         foreach: bool = False, all_reduce: Optional[AllReduceSum] = None, sharded: Optional[Sequence[bool]] = None,
         global_shapes: Optional[Sequence[Sequence[int]]] = None, compiled: bool = False,
         fused: bool = False, column_means: Optional[Sequence[Optional[Tensor]]] = None,
         quantized: Optional[Sequence[Optional[tuple[Tensor, Tensor]]]] = None,
         shard_offsets: Optional[Sequence[int]] = None, all_reduce_max: Optional[AllReduceSum] = None) -> None:
    r"""Functional SAGE (or Lion with ``damper=False``): updates ``params``, ``exp_avgs``, ``col_emas`` and
    ``state_steps`` in place. See the module docstring for the equations.

    Args:
        params, grads, exp_avgs: parallel lists; ``exp_avgs`` may be lower precision than ``params``.
        col_emas: the O(d) EMA of ``column_abs_mean`` per parameter (ignored when ``damper=False``).
        state_steps: 0-D float tensors holding the step count; incremented here.
        lr, beta1, beta2, eps, weight_decay: η, β1, β2, ε, λ.
        instant_damper: include the γ / (s_t + ε) term of H.
        code_compat: update m before taking the sign, as the released code does.
        foreach: batch element-wise work with ``torch._foreach_*`` ops (the for-loop is the reference).
        all_reduce, sharded, global_shapes: for dim-0-sharded parameters, the collective summing the
            listed statistics, which parameters are sharded, and their unsharded shapes.
        compiled: run the element-wise update as one ``torch.compile`` kernel per tensor (reads θ, g, m
            once, writes θ, m once; hyperparameters as 0-D tensors, so no recompiles). Overrides ``foreach``.
        fused: the kernels of :mod:`sage_optim.kernels` (Triton on CUDA, C on CPU): the column statistic in one
            pass over g and the update in one pass over θ, g, m (non-contiguous tensors, and dtype mixes a
            backend lacks, take the for-loop's blocked path).
            Overrides ``compiled`` and ``foreach``.
        column_means: with ``fused``, :func:`first_pass_column_sums` of ``grads`` when the caller already read
            them (an entry None: read here).
        quantized: per parameter, None or (block maxima, seed) of an 8-bit momentum: ``exp_avgs`` then holds
            int8 codes (see :mod:`sage_optim.functional._quant`), decoded and stored block by block.
        shard_offsets, all_reduce_max: for dim-0 shards with an 8-bit momentum, the flat index in the whole
            tensor of each local tensor's first element (its stochastic rounding follows the whole tensor's
            indices) and the collective taking the element-wise max of the listed tensors across the shard
            group (a sharded vector's blocks span ranks).
    """
    if not params:
        return
    kwargs = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, damper=damper,
                  instant_damper=instant_damper, code_compat=code_compat, maximize=maximize, all_reduce=all_reduce,
                  sharded=sharded, global_shapes=global_shapes, quantized=quantized, shard_offsets=shard_offsets,
                  all_reduce_max=all_reduce_max)
    if fused or compiled:
        _single_tensor_sage(params, grads, exp_avgs, col_emas, state_steps, compiled=compiled, fused=fused,
                            column_means=column_means if fused else None, **kwargs)
    elif foreach:
        _foreach_sage(params, grads, exp_avgs, col_emas, state_steps, **kwargs)
    else:
        _single_tensor_sage(params, grads, exp_avgs, col_emas, state_steps, **kwargs)
