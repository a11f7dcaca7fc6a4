"""8-bit block-quantised momentum (``state_dtype="int8"``): codes, their decoding and stochastic rounding.

A momentum tensor viewed as rows (dim 0 × the rest) is cut into blocks of ``QUANT_BLOCK`` consecutive
elements of a row. Each block keeps its largest magnitude ``a`` (float32) and each element an int8 code
``k ∈ [-127, 127]`` standing for

    m = sign(k) · (|k| / 127)² · a

The square spends the codes where momentum values are: most elements of a block are far below its
largest, and a linear code would leave them a handful of levels (0.1·a sits at code 40 here, at 12.7
with a linear code).

Storing rounds **stochastically** between the two neighbouring code values, up with probability equal to
the distance covered, so the stored momentum is unbiased: E[decode(store(m))] = m. Round-to-nearest
would freeze it: SAGE's momentum moves by (1 − β2) = 1% of g per step, less than half a code step for
most elements, and every store would undo the update.

The uniform number of element i (its index in the flattened tensor) at a step is counter-based, not drawn
from a stream: u = (h(i ⊕ key) >> 8) · 2⁻²⁴ with key = h(seed ⊕ h(step)) and h a 32-bit integer hash
(:func:`hash32`), so any block of any tensor can be rounded on its own, in any order, by torch ops or by
the C kernel (``kernels/cpu_kernels.c``), with the same result. ``seed`` is per tensor (kept in the state,
derived from ``torch.initial_seed()``), so a run is reproducible and resumes bit for bit.

Memory: 1 byte per element plus 4 bytes per 256 (1.016 B) — a quarter of float32 momentum, half of bf16.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["QUANT_BLOCK", "LEVELS", "absmax_shape", "dequantize_into", "quantize_", "rounding_key", "hash32",
           "dequantize_slice_into", "slice_block_maxima", "quantize_slice_"]

QUANT_BLOCK = 256
LEVELS = 127


def absmax_shape(shape: Sequence[int]) -> tuple[int, int]:
    """Shape of the per-block maxima of a momentum of ``shape``: (rows, blocks per row)."""
    rows, cols = (shape[0], math.prod(shape[1:])) if len(shape) >= 2 else (1, math.prod(shape))
    return rows, -(-cols // QUANT_BLOCK)


def _per_block(x: Tensor, absmax: Tensor, op: str) -> None:
    """``x`` (rows, cols) multiplied or divided in place by its blocks' entries of ``absmax`` (rows, blocks)."""
    cols = x.shape[1]
    full = cols - cols % QUANT_BLOCK
    fn = Tensor.mul_ if op == "mul" else Tensor.div_
    if full:
        fn(x[:, :full].view(x.shape[0], -1, QUANT_BLOCK), absmax[:, : full // QUANT_BLOCK, None])
    if full < cols:
        fn(x[:, full:], absmax[:, -1:])


def dequantize_into(out: Tensor, codes: Tensor, absmax: Tensor) -> Tensor:
    """``out`` (rows, cols; float) ← the momentum that int8 ``codes`` (rows, cols) and ``absmax`` stand for."""
    out.copy_(codes)
    out.mul_(out.abs()).div_(LEVELS * LEVELS)  # sign(k) · k² / 127²
    _per_block(out, absmax, "mul")
    return out


# note: multipliers below 2^31, so that x · c < 2^63 stays exact in torch's int64 as in C's uint32
_MUL1, _MUL2 = 0x7FEB352D, 0x2C1B3C6D
_MASK = 0xFFFFFFFF


def hash32(x):  # type: ignore[no-untyped-def]
    """A 32-bit integer hash (xor-shift-multiply) of a Python int or an int64 tensor holding values < 2^32."""
    x = x ^ (x >> 16)
    x = (x * _MUL1) & _MASK
    x = x ^ (x >> 15)
    x = (x * _MUL2) & _MASK
    return x ^ (x >> 16)


def rounding_key(seed: Tensor, step: Tensor) -> int:
    """The key of one tensor's stochastic rounding at one step (seed and step are 0-D tensors)."""
    return hash32((int(seed) & _MASK) ^ hash32(int(step) & _MASK))


def uniform(key: int, first_index: int, shape: Sequence[int], device: torch.device) -> Tensor:
    """The uniform numbers in [0, 1) of elements ``first_index``, ``first_index + 1``, ... (float32, ``shape``)."""
    index = torch.arange(first_index, first_index + math.prod(shape), dtype=torch.int64, device=device)
    return (hash32((index & _MASK) ^ key) >> 8).to(torch.float32).mul_(2.0 ** -24).view(*shape)


def quantize_(codes: Tensor, absmax: Tensor, values: Tensor, key: int, first_index: int = 0) -> None:
    """Store ``values`` (rows, cols; float, overwritten as scratch) into ``codes`` and ``absmax`` with unbiased
    stochastic rounding between neighbouring code values; ``first_index``: the flat index of ``values[0, 0]``
    in its tensor. A block of zeros stores a = 0 and codes 0."""
    rows, cols = values.shape
    full = cols - cols % QUANT_BLOCK
    magnitude = values.abs()
    if full:
        absmax[:, : full // QUANT_BLOCK] = magnitude[:, :full].view(rows, -1, QUANT_BLOCK).amax(dim=-1)
    if full < cols:
        absmax[:, -1:] = magnitude[:, full:].amax(dim=-1, keepdim=True)
    sign = values.sign_()  # the values are not needed any more: their buffer holds the sign
    # t = |m| / a ∈ [0, 1], with a as stored (float32): the decoded block maximum is then exactly a
    stored = absmax.to(magnitude.dtype)
    _per_block(magnitude, torch.where(stored > 0, stored, torch.ones_like(stored)), "div")
    _store_ratios(codes, magnitude, sign, key, first_index)


def _store_ratios(codes: Tensor, ratio: Tensor, sign: Tensor, key: int, first_index: int) -> None:
    """``codes`` ← sign · k, k rounded stochastically between the code values around t = ``ratio`` (= |m| / a,
    overwritten as scratch): up to k + 1 with probability (t − (k/127)²) / (((k+1)/127)² − (k/127)²)."""
    lower = ratio.sqrt().mul_(LEVELS).floor_().clamp_(max=LEVELS)  # k with (k/127)² ≤ t (up to rounding)
    low_value = (lower / LEVELS).square_()
    step = ((lower + 1) / LEVELS).square_().sub_(low_value)
    up = ratio.sub_(low_value).div_(step)  # where t lies between the two code values, in [0, 1)
    up = uniform(key, first_index, up.shape, up.device).to(up.dtype) < up
    codes.copy_(lower.add_(up).clamp_(max=LEVELS).mul_(sign))


# ---------------------------------------------------------------------------------------- vector shards
# A vector is one row of blocks, so a dim-0 shard of it (FSDP2) can hold parts of blocks whose other parts
# lie on other ranks. Its shard keeps the codes of its elements and the *whole* vector's block maxima
# (replicated, 1/256 of the vector); storing takes one all-reduce (max) of the blocks' local maxima. The
# operations per element are the ones above, so a sharded run stores the codes one process would.
def _slice_blocks(first_index: int, numel: int, device: torch.device) -> Tensor:
    """The block of each element ``first_index``, ..., ``first_index + numel - 1`` of a vector."""
    return torch.arange(first_index, first_index + numel, device=device).div_(QUANT_BLOCK, rounding_mode="floor")


def dequantize_slice_into(out: Tensor, codes: Tensor, absmax: Tensor, first_index: int) -> Tensor:
    """:func:`dequantize_into` for a slice of a vector: ``out``, ``codes`` 1-D, starting at element
    ``first_index``; ``absmax`` (1, blocks) the whole vector's block maxima."""
    out.copy_(codes)
    out.mul_(out.abs()).div_(LEVELS * LEVELS)
    return out.mul_(absmax[0, _slice_blocks(first_index, out.numel(), out.device)].to(out.dtype))


def slice_block_maxima(values: Tensor, blocks: int, first_index: int) -> Tensor:
    """Largest |value| per block of the whole vector (float32, ``blocks``) among this slice's elements (0 for
    blocks it does not reach): combined across shards by a max all-reduce."""
    maxima = torch.zeros(blocks, dtype=torch.float32, device=values.device)
    index = _slice_blocks(first_index, values.numel(), values.device)
    return maxima.scatter_reduce_(0, index, values.abs().to(torch.float32), "amax")


def quantize_slice_(codes: Tensor, absmax: Tensor, values: Tensor, key: int, first_index: int) -> None:
    """:func:`quantize_` for a slice of a vector whose ``absmax`` (1, blocks) already holds the whole vector's
    new block maxima (:func:`slice_block_maxima`, all-reduced). ``values`` is overwritten as scratch."""
    magnitude = values.abs()
    stored = absmax[0, _slice_blocks(first_index, values.numel(), values.device)].to(magnitude.dtype)
    magnitude.div_(torch.where(stored > 0, stored, torch.ones_like(stored)))
    _store_ratios(codes, magnitude, values.sign_(), key, first_index)
