"""Triton kernels: SAGE/Lion's element-wise update, SAGE's column statistic, SinkGD's passes.

Each kernel reads the full-size tensors it needs once per call and writes its outputs once:

- :func:`sign_update`: θ, g, m read once, θ and m written once (the update the issue's GPU target
  compares with a device copy of the same bytes). bf16 momentum is stored as its bit pattern (int16
  view) and widened/rounded here, round-to-nearest-even like ``Tensor.copy_``: Triton's interpreter
  does not load bf16 correctly, and the bit form is exact on both.
- :func:`column_abs_sums`: Σ_rows |g| / rows per column; per-program partial sums (no atomics, so
  the result is deterministic) summed in float64 by the caller.
- :func:`sinkhorn_row_pass`: one Sinkhorn iteration's row step and the column sums it feeds, in one
  sweep over row blocks (SPEC §3): a block's row norms with the current c, its new r, and its
  contribution r²·(G/s)² to the column sums — G squared on the fly, Q never stored.
- :func:`sinkgd_apply`: θ ← θ·(1 − ηλ) + step·r_i·(G_ij/s)·c_j.

Hyperparameters are read from a small tensor (not baked into the compiled kernel), so learning-rate
schedules never recompile and float64 runs keep float64 hyperparameters.

Known limit: Sinkhorn's r and c are kept in the gradient's dtype here. For a float32 gradient whose
max |G| is subnormal (< 1.2e-38, a gradient that is zero for any practical purpose) the first row step's
ε/s (~1e31) makes r² underflow, and the step differs from the for-loop's (which keeps r, c in float64;
so do the C kernels). Normal magnitudes, including max |G| near float32's largest, match it.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..functional._common import as_rows

_ELEMENTWISE_BLOCK = 1024
#: Programs per launch the statistic aims for: a few per streaming multiprocessor of a large GPU.
_TARGET_PROGRAMS = 512


@triton.jit
def _sign_update_kernel(param_ptr, grad_ptr, exp_avg_ptr, damper_ptr, hparams_ptr, numel, n_cols,
                        HAS_DAMPER: tl.constexpr, CODE_COMPAT: tl.constexpr, MOMENTUM_BITS16: tl.constexpr,
                        BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    lr = tl.load(hparams_ptr)
    decay = tl.load(hparams_ptr + 1)
    weight1 = tl.load(hparams_ptr + 2)  # 1 − β1
    weight2 = tl.load(hparams_ptr + 3)  # 1 − β2
    grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0)
    param = tl.load(param_ptr + offsets, mask=mask, other=0.0).to(grad.dtype)
    if MOMENTUM_BITS16:
        bits = tl.load(exp_avg_ptr + offsets, mask=mask, other=0).to(tl.uint16, bitcast=True)
        momentum = (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        momentum = tl.load(exp_avg_ptr + offsets, mask=mask, other=0.0).to(grad.dtype)
    # lerp as torch computes it for weights below 1/2: start + w·(end − start)
    if CODE_COMPAT:
        momentum = momentum + weight2 * (grad - momentum)
        direction = momentum + weight1 * (grad - momentum)
    else:
        direction = momentum + weight1 * (grad - momentum)
        momentum = momentum + weight2 * (grad - momentum)
    step = tl.where(direction > 0, lr, tl.where(direction < 0, -lr, 0.0 * lr))
    if HAS_DAMPER:
        step = step * tl.load(damper_ptr + offsets % n_cols, mask=mask, other=0.0)
    param = param * decay - step
    tl.store(param_ptr + offsets, param.to(param_ptr.dtype.element_ty), mask=mask)
    if MOMENTUM_BITS16:
        wide = momentum.to(tl.uint32, bitcast=True)
        rounded = (wide + (0x7FFF + ((wide >> 16) & 1))) >> 16  # round to nearest, ties to even
        tl.store(exp_avg_ptr + offsets, rounded.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
    else:
        tl.store(exp_avg_ptr + offsets, momentum.to(exp_avg_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _column_abs_sum_kernel(grad_ptr, partial_ptr, hparams_ptr, n_rows, n_cols, rows_per_program,
                           BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    row_program = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < n_cols
    inv_rows = tl.load(hparams_ptr)
    start = row_program * rows_per_program
    end = tl.minimum(start + rows_per_program, n_rows)
    total = tl.zeros([BLOCK_C], dtype=inv_rows.dtype)
    for first in range(start, end, BLOCK_R):
        rows = first + tl.arange(0, BLOCK_R)
        mask = (rows < end)[:, None] & col_mask[None, :]
        tile = tl.load(grad_ptr + rows.to(tl.int64)[:, None] * n_cols + cols[None, :], mask=mask, other=0.0)
        # note: divided before summing, so the sum cannot overflow for any finite gradient
        total += tl.sum(tl.abs(tile.to(inv_rows.dtype)) * inv_rows, axis=0)
    tl.store(partial_ptr + row_program.to(tl.int64) * n_cols + cols, total, mask=col_mask)


@triton.jit
def _sinkhorn_row_pass_kernel(grad_ptr, rows_ptr, col_squares_ptr, partial_ptr, hparams_ptr, n_rows, n_cols,
                              BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    program = tl.program_id(0)
    grad_scale = tl.load(hparams_ptr)
    eps = tl.load(hparams_ptr + 1)
    target = tl.load(hparams_ptr + 2)
    cap = tl.load(hparams_ptr + 3)
    rows = program * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    row_offsets = rows.to(tl.int64)[:, None] * n_cols
    row_squares = tl.zeros([BLOCK_R], dtype=grad_scale.dtype)
    for first in range(0, n_cols, BLOCK_C):
        cols = first + tl.arange(0, BLOCK_C)
        col_mask = cols < n_cols
        x = tl.load(grad_ptr + row_offsets + cols[None, :], mask=row_mask[:, None] & col_mask[None, :],
                    other=0.0).to(grad_scale.dtype) / grad_scale
        col_squares = tl.load(col_squares_ptr + cols, mask=col_mask, other=0.0)
        row_squares += tl.sum(x * x * col_squares[None, :], axis=1)
    scaling = tl.load(rows_ptr + rows, mask=row_mask, other=1.0)
    scaling = tl.minimum(scaling / (scaling * tl.sqrt(row_squares) + eps) * target, cap)
    tl.store(rows_ptr + rows, scaling, mask=row_mask)
    scaling_sq = tl.where(row_mask, scaling * scaling, 0.0)
    for first in range(0, n_cols, BLOCK_C):
        cols = first + tl.arange(0, BLOCK_C)
        col_mask = cols < n_cols
        x = tl.load(grad_ptr + row_offsets + cols[None, :], mask=row_mask[:, None] & col_mask[None, :],
                    other=0.0).to(grad_scale.dtype) / grad_scale
        tl.store(partial_ptr + program.to(tl.int64) * n_cols + cols, tl.sum(x * x * scaling_sq[:, None], axis=0),
                 mask=col_mask)


@triton.jit
def _sinkgd_apply_kernel(param_ptr, grad_ptr, rows_ptr, cols_ptr, hparams_ptr, n_rows, n_cols,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    decay = tl.load(hparams_ptr)
    step = tl.load(hparams_ptr + 1)
    grad_scale = tl.load(hparams_ptr + 2)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_mask = rows < n_rows
    col_mask = cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]
    offsets = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(decay.dtype)
    param = tl.load(param_ptr + offsets, mask=mask, other=0.0).to(decay.dtype)
    row_scaling = tl.load(rows_ptr + rows, mask=row_mask, other=0.0)
    col_scaling = tl.load(cols_ptr + cols, mask=col_mask, other=0.0)
    param = param * decay + step * (row_scaling[:, None] * (grad / grad_scale) * col_scaling[None, :])
    tl.store(param_ptr + offsets, param.to(param_ptr.dtype.element_ty), mask=mask)


def _hparams(values: list[float], like: Tensor) -> Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device)


def sign_update(param: Tensor, grad: Tensor, exp_avg: Tensor, damper: Optional[Tensor], *, lr: float,
                weight_decay: float, beta1: float, beta2: float, code_compat: bool) -> None:
    """SAGE's (or, with ``damper=None``, Lion's) element-wise step of one contiguous tensor, in place.

    ``grad`` is in the compute dtype (float32 or float64); ``damper`` has ``grad.shape[1:]``'s numel
    (or ``grad``'s for a vector) and is broadcast over dim 0.
    """
    numel = grad.numel()
    if numel == 0:
        return
    bits16 = exp_avg.dtype == torch.bfloat16
    momentum = exp_avg.view(torch.int16) if bits16 else exp_avg
    n_cols = as_rows(grad).shape[1]
    h = damper.reshape(-1).to(grad.dtype) if damper is not None else grad  # grad: an unused placeholder
    hparams = _hparams([lr, 1.0 - lr * weight_decay, 1.0 - beta1, 1.0 - beta2], grad)
    grid = (triton.cdiv(numel, _ELEMENTWISE_BLOCK),)
    _sign_update_kernel[grid](param, grad, momentum, h, hparams, numel, n_cols, HAS_DAMPER=damper is not None,
                              CODE_COMPAT=code_compat, MOMENTUM_BITS16=bits16, BLOCK=_ELEMENTWISE_BLOCK)


def column_abs_sums(matrix: Tensor, divisor: int) -> Tensor:
    """Σ_rows |matrix| / ``divisor`` per column of a contiguous (n, m) matrix, as a float64 m-vector."""
    n_rows, n_cols = matrix.shape
    if matrix.numel() == 0:
        return torch.zeros(n_cols, dtype=torch.float64, device=matrix.device)
    block_r, block_c = 32, 64
    col_programs = triton.cdiv(n_cols, block_c)
    row_programs = max(1, min(triton.cdiv(n_rows, block_r), _TARGET_PROGRAMS // col_programs))
    rows_per_program = triton.cdiv(triton.cdiv(n_rows, row_programs), block_r) * block_r
    row_programs = triton.cdiv(n_rows, rows_per_program)
    partial = torch.empty(row_programs, n_cols, dtype=matrix.dtype, device=matrix.device)
    _column_abs_sum_kernel[(row_programs, col_programs)](matrix, partial, _hparams([1.0 / divisor], matrix),
                                                         n_rows, n_cols, rows_per_program,
                                                         BLOCK_R=block_r, BLOCK_C=block_c)
    return partial.sum(0, dtype=torch.float64)


#: Rows per program of the Sinkhorn row pass: partial column sums are (n / BLOCK_R, m), so this trades
#: their extra traffic (1/BLOCK_R of G's) against the number of programs (n / BLOCK_R). Untuned.
_SINKHORN_BLOCK_R = 16


def sinkhorn_row_pass(grad: Tensor, rows: Tensor, col_squares: Tensor, hparams: Tensor) -> Tensor:
    """r ← min(r / (r ⊙ sqrt((G/s)² (c²)) + ε) · target, cap) in place; return Σ_i r_i² (G_ij/s)² (float64).

    ``rows`` (n), ``col_squares`` = c² (m) and ``hparams`` = [s, ε, target, cap] are in ``grad``'s dtype
    and on its device (so nothing is read back to the host); one sweep over G's row blocks.
    """
    n_rows, n_cols = grad.shape
    if grad.numel() == 0:
        return torch.zeros(n_cols, dtype=torch.float64, device=grad.device)
    programs = triton.cdiv(n_rows, _SINKHORN_BLOCK_R)
    partial = torch.empty(programs, n_cols, dtype=grad.dtype, device=grad.device)
    _sinkhorn_row_pass_kernel[(programs,)](grad, rows, col_squares, partial, hparams, n_rows, n_cols,
                                           BLOCK_R=_SINKHORN_BLOCK_R, BLOCK_C=64)
    return partial.sum(0, dtype=torch.float64)


def sinkgd_apply(param: Tensor, grad: Tensor, rows: Tensor, cols: Tensor, hparams: Tensor) -> None:
    """θ ← θ·decay + step·r_i·(G_ij/s)·c_j on a contiguous (n, m) ``param``, in place.

    ``hparams`` = [decay, step, s] in ``grad``'s dtype and device; ``rows``/``cols`` in ``grad``'s dtype.
    """
    n_rows, n_cols = grad.shape
    if grad.numel() == 0:
        return
    block_r, block_c = 16, 64
    grid = (triton.cdiv(n_rows, block_r), triton.cdiv(n_cols, block_c))
    _sinkgd_apply_kernel[grid](param, grad, rows, cols, hparams, n_rows, n_cols, BLOCK_R=block_r, BLOCK_C=block_c)


def supports_update(param: Tensor, grad: Tensor, exp_avg: Tensor) -> bool:
    """Every floating dtype combination: the kernel converts on load and store."""
    del param, grad, exp_avg
    return True


def scaling_dtype(grad_dtype: torch.dtype) -> torch.dtype:
    """Sinkhorn's r and c are kept in the gradient's compute dtype inside the kernels."""
    return grad_dtype


def cap_dtype(grad_dtype: torch.dtype) -> torch.dtype:
    """The dtype whose range bounds r and c (the kernels' arithmetic dtype)."""
    return grad_dtype


#: No whole-step kernel here: on CUDA the per-iteration launches are asynchronous, so the host-side column step
#: overlaps the device work (the C backend's whole-step call exists because CPU calls are synchronous).
sinkgd_step = None
#: The optimizer's finite check does not read these kernels' statistics: that would sync the device per tensor.
FIRST_PASS = False
