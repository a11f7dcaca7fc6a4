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
most elements, and every store would undo the update. The random numbers come from a generator seeded
per tensor and step (``seed``: derived from ``torch.initial_seed()`` and the tensor's order when the state
is created, kept in the state; torch's RNG stream is not consumed), so a run is reproducible and resumes
bit for bit.

Memory: 1 byte per element plus 4 bytes per 256 (1.016 B) — a quarter of float32 momentum, half of bf16.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["QUANT_BLOCK", "LEVELS", "absmax_shape", "dequantize_into", "quantize_", "rounding_generator"]

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


def rounding_generator(seed: Tensor, step: Tensor, device: torch.device) -> torch.Generator:
    """The generator of one tensor's stochastic rounding at one step (seed and step are 0-D CPU tensors)."""
    generator = torch.Generator(device=device)
    generator.manual_seed((int(seed) * 1_000_003 + int(step)) % (1 << 63))
    return generator


def quantize_(codes: Tensor, absmax: Tensor, values: Tensor, generator: torch.Generator) -> None:
    """Store ``values`` (rows, cols; float, overwritten as scratch) into ``codes`` and ``absmax`` with unbiased
    stochastic rounding between neighbouring code values. A block of zeros stores a = 0 and codes 0."""
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
    lower = magnitude.sqrt().mul_(LEVELS).floor_().clamp_(max=LEVELS)  # k with (k/127)² ≤ t (up to rounding)
    low_value = (lower / LEVELS).square_()
    step = ((lower + 1) / LEVELS).square_().sub_(low_value)
    up = magnitude.sub_(low_value).div_(step)  # where t lies between the two code values, in [0, 1)
    up = torch.rand(up.shape, generator=generator, dtype=up.dtype, device=up.device) < up
    codes.copy_(lower.add_(up).clamp_(max=LEVELS).mul_(sign))
