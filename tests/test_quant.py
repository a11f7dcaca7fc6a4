"""8-bit block-quantised momentum (state_dtype=torch.int8): the code, its stochastic rounding, and the
optimizer step against a float64 reference written from the definition in functional/_quant.py."""
from __future__ import annotations

import copy

import pytest
import torch

import sage_optim as so
from sage_optim.functional._quant import (LEVELS, QUANT_BLOCK, absmax_shape, dequantize_into, quantize_,
                                          rounding_key)


def _store(values: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    codes = torch.zeros(values.shape, dtype=torch.int8)
    absmax = torch.zeros(absmax_shape(values.shape), dtype=values.dtype)
    quantize_(codes, absmax, values.clone(), rounding_key(torch.tensor(seed), torch.tensor(0)))
    return codes, absmax


def _per_element(absmax: torch.Tensor, cols: int) -> torch.Tensor:
    return absmax.repeat_interleave(QUANT_BLOCK, dim=1)[:, :cols]


def test_blocks_cover_rows_with_a_partial_last_block():
    assert absmax_shape((5, 256)) == (5, 1)
    assert absmax_shape((5, 257)) == (5, 2)
    assert absmax_shape((3, 4, 100)) == (3, 2)  # trailing dims flatten into the row
    assert absmax_shape((700,)) == (1, 3)


def test_a_store_is_within_one_code_step_and_keeps_each_block_maximum_exactly():
    torch.manual_seed(0)
    values = torch.randn(4, 600, dtype=torch.float64) * torch.logspace(-6, 1, 600, dtype=torch.float64)
    values[2, 256:512] = 0  # an all-zero block
    codes, absmax = _store(values, seed=1)
    decoded = dequantize_into(torch.empty_like(values), codes, absmax)
    scale = _per_element(absmax, 600)
    # neighbouring code values of t = |m|/a are (k/127)² and ((k+1)/127)², at most 2/127 + 1/127² apart
    assert ((decoded - values).abs() <= scale * (2 * LEVELS + 1) / LEVELS**2 + 1e-15).all()
    assert torch.equal(absmax[2, 1], torch.tensor(0.0, dtype=torch.float64))
    assert (decoded[2, 256:512] == 0).all()
    for row in range(4):  # the element holding a block's maximum is stored exactly (code ±127)
        top = values[row, :256].abs().argmax()
        assert decoded[row, top] == values[row, top]


def test_stochastic_rounding_is_unbiased_and_small_values_are_not_lost():
    torch.manual_seed(0)
    values = torch.randn(2, 512, dtype=torch.float64) * torch.logspace(-5, 0, 512, dtype=torch.float64)
    total = torch.zeros_like(values)
    draws = 3000
    for seed in range(draws):
        codes, absmax = _store(values, seed)
        total += dequantize_into(torch.empty_like(values), codes, absmax)
    scale = _per_element(absmax, 512)
    bias = (total / draws - values).abs() / scale
    # one store's error is below a code step (≤ 0.016 a); the mean over 3000 stores has a standard error
    # below 0.016 a / sqrt(3000) = 3e-4 a, so a bias of 1.5e-3 a would be a 5-sigma event per element
    assert bias.max() < 1.5e-3
    tiny = values.abs() < scale * 1e-4  # below half of the smallest code value (1/127² ≈ 6.2e-5 a)
    assert tiny.any() and (total[tiny] != 0).any()  # rounded up sometimes: they survive in expectation


def test_momentum_follows_its_ema_where_round_to_nearest_would_freeze_it():
    # m ← 0.99 m + 0.01 g. Each block's largest element stays at 1 (so its maximum a stays put), the others
    # first head for g1 and then for g2 = g1 + 0.2: a move of 1% of (g - m) per step, below half a code step
    # (~0.005 a around 0.3-0.7 a), which round-to-nearest undoes at every store
    torch.manual_seed(0)
    g1 = torch.rand(8, 256) * 0.6 + 0.05
    g1[:, 0] = 1.0
    g2 = g1 + 0.2
    g2[:, 0] = 1.0

    def run(store) -> torch.Tensor:
        codes = torch.zeros(g1.shape, dtype=torch.int8)
        absmax = torch.zeros(absmax_shape(g1.shape))
        work = torch.empty_like(g1)
        for step in range(700):
            dequantize_into(work, codes, absmax).lerp_(g1 if step < 300 else g2, 0.01)
            store(codes, absmax, work, step)
        return dequantize_into(torch.empty_like(g1), codes, absmax)

    def stochastic(codes, absmax, work, step):
        quantize_(codes, absmax, work, rounding_key(torch.tensor(7), torch.tensor(step)))

    def nearest(codes, absmax, work, step):
        scale = _per_element(absmax.copy_(work.abs().view(8, 1, 256).amax(-1)), 256)
        codes.copy_((work.abs() / scale).sqrt().mul(LEVELS).round().mul(work.sign()))

    m_float = torch.zeros_like(g1)
    for step in range(700):
        m_float.lerp_(g1 if step < 300 else g2, 0.01)
    error = {name: ((run(store) - m_float).abs() / m_float).median() for name, store in
             (("stochastic", stochastic), ("nearest", nearest))}
    assert error["stochastic"] < 0.03, error
    assert error["nearest"] > 5 * error["stochastic"], error


def _reference_lion_step(param, grad, codes, absmax, seed, step, *, lr, weight_decay, beta1, beta2):
    """Lion with an int8 momentum, straight from the definition (float64, whole tensor as one block of rows)."""
    momentum = dequantize_into(torch.empty_like(grad), codes, absmax)
    direction = (beta1 * momentum + (1 - beta1) * grad).sign()
    param.mul_(1 - lr * weight_decay).sub_(lr * direction)
    momentum = beta2 * momentum + (1 - beta2) * grad
    quantize_(codes, absmax, momentum, rounding_key(seed, step))


@pytest.mark.parametrize("foreach", [False, True])
def test_lion_int8_step_matches_the_reference(foreach):
    torch.manual_seed(0)
    shapes = [(6, 300), (40,)]
    params = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in shapes]
    ref = [p.detach().clone() for p in params]
    opt = so.Lion(params, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.99), state_dtype=torch.int8, foreach=foreach)
    ref_state = [(torch.zeros(s, dtype=torch.int8), torch.zeros(absmax_shape(s), dtype=torch.float64)) for s in shapes]
    for step in range(1, 6):
        grads = [torch.randn(s, dtype=torch.float64) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()  # the first step draws each tensor's seed
        for p, r, g, (codes, absmax) in zip(params, ref, grads, ref_state):
            _reference_lion_step(_rows(r), _rows(g), _rows(codes), absmax, opt.state[p]["exp_avg_seed"],
                                 torch.tensor(step), lr=1e-2, weight_decay=0.1, beta1=0.9, beta2=0.99)
    for p, r, (codes, absmax) in zip(params, ref, ref_state):
        torch.testing.assert_close(p.detach(), r, rtol=0, atol=1e-12)
        assert torch.equal(opt.state[p]["exp_avg"], codes)
        torch.testing.assert_close(opt.state[p]["exp_avg_absmax"].double(), absmax, rtol=1e-6, atol=0)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.view(t.shape[0], -1) if t.ndim >= 2 else t.view(1, -1)


@pytest.mark.parametrize("name", ["SAGE", "Lion", "SinkSAGE"])
def test_int8_state_is_a_quarter_of_float32_and_round_trips_bit_for_bit(name):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(64, 512), torch.nn.Linear(512, 32))
    params = list(model.parameters())
    make = (lambda ps, **kw: so.SinkSAGE(model, **kw)) if name == "SinkSAGE" else getattr(so, name)
    opt = make(params, state_dtype=torch.int8)
    full = make(params, state_dtype=torch.float32)
    sign_numel = sum(p.numel() for g in opt.param_groups if g["rule"] in ("sage", "lion") for p in g["params"])
    saved = int(full.state_nbytes()) - int(opt.state_nbytes())
    assert saved >= 0.74 * 4 * sign_numel  # 1.016 bytes per element instead of 4 (O(d) state aside)

    def grads(step):
        gen = torch.Generator().manual_seed(step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)

    for step in range(3):
        grads(step)
        opt.step()
    snapshot = copy.deepcopy(opt.state_dict())
    weights = [p.detach().clone() for p in params]
    for step in range(3, 6):
        grads(step)
        opt.step()
    after = [p.detach().clone() for p in params]
    for p, w in zip(params, weights):
        p.data.copy_(w)
    resumed = make(params, state_dtype=torch.int8)
    resumed.load_state_dict(snapshot)
    assert all(s["exp_avg"].dtype == torch.int8 for s in resumed.state.values() if "exp_avg" in s)
    for step in range(3, 6):
        grads(step)
        resumed.step()
    assert all(torch.equal(p, a) for p, a in zip(params, after))  # seeds and steps restored: same rounding


def test_int8_is_refused_where_it_does_not_apply():
    w = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match="state_dtype int8 is for the sign rules"):
        so.SinkSAGE([{"params": [w], "rule": "adamw"}], state_dtype=torch.int8)


@pytest.mark.parametrize("cut", [1, 255, 256, 350, 511, 699])
def test_int8_vector_stored_in_slices_matches_the_whole_vector(cut):
    """A dim-0 shard of a vector holds parts of blocks: storing each slice against the slices' combined block
    maxima gives the codes and maxima of one store of the whole vector (test_distributed.py runs it sharded)."""
    from sage_optim.functional._quant import (absmax_shape, dequantize_into, dequantize_slice_into, quantize_,
                                              quantize_slice_, slice_block_maxima)

    values = torch.randn(700, generator=torch.Generator().manual_seed(cut)) * torch.linspace(0.01, 3, 700)
    blocks = absmax_shape(values.shape)[1]
    codes = torch.zeros(1, 700, dtype=torch.int8)
    absmax = torch.zeros(1, blocks)
    quantize_(codes, absmax, values.clone().view(1, -1), key=12345)
    parts = [(0, values[:cut]), (cut, values[cut:])]
    maxima = torch.stack([slice_block_maxima(v, blocks, first) for first, v in parts]).amax(0)
    sliced_absmax = maxima.view(1, -1)
    sliced = [torch.zeros(v.numel(), dtype=torch.int8) for _, v in parts]
    for out, (first, v) in zip(sliced, parts):
        quantize_slice_(out, sliced_absmax, v.clone(), key=12345, first_index=first)
    assert torch.equal(sliced_absmax, absmax)
    assert torch.equal(torch.cat(sliced), codes[0])
    whole = dequantize_into(torch.empty(1, 700), codes, absmax)[0]
    decoded = torch.cat([dequantize_slice_into(torch.empty(v.numel()), c, absmax, first)
                         for c, (first, v) in zip(sliced, parts)])
    assert torch.equal(decoded, whole)



def test_int8_state_does_not_consume_torchs_random_numbers():
    torch.manual_seed(3)
    p = torch.nn.Parameter(torch.randn(4, 300))
    opt = so.SAGE([p], state_dtype=torch.int8)
    p.grad = torch.randn(4, 300)
    before = torch.random.get_rng_state()
    expected_next = torch.randn(3)
    torch.random.set_rng_state(before)
    opt.step()  # creates the state, seed included
    assert torch.equal(torch.randn(3), expected_next)
    other = so.SAGE([torch.nn.Parameter(torch.randn(4, 300)), torch.nn.Parameter(torch.randn(4, 300))],
                    state_dtype=torch.int8)
    for q in other.param_groups[0]["params"]:
        q.grad = torch.ones(4, 300)
    other.step()
    seeds = [int(s["exp_avg_seed"]) for s in other.state.values()]
    assert seeds[0] != seeds[1]  # each tensor rounds with its own random numbers
