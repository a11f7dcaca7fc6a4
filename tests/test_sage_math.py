"""SAGE and Lion against the float64 transcription of SPEC §2, plus the rule's properties."""
from __future__ import annotations


import pytest
import torch
from hypothesis import given, settings, strategies as st

import sage_optim as so
from sage_optim.reference import ReferenceSAGEState, reference_sage_step

SHAPES = [(1,), (7,), (1, 6), (9, 1), (257, 96), (33, 7, 3)]
HYPER = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)


def _grads(shape, steps, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=dtype) * (1 + 3 * torch.rand(shape, generator=g, dtype=dtype))
            for _ in range(steps)]


def _assert_matches_reference(param, reference, momentum_before_sign):
    """Equal in float64; a sign may flip only where |β1·m + (1−β1)·g| < 1e-12 (a near-tie)."""
    close = torch.isclose(param.detach(), reference, atol=1e-12, rtol=1e-12)
    assert bool((close | (momentum_before_sign.abs() < 1e-12)).all())


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("foreach", [False, True], ids=["forloop", "foreach"])
@pytest.mark.parametrize("code_compat", [False, True], ids=["paper", "code_compat"])
@pytest.mark.parametrize("instant_damper", [True, False], ids=["instant", "no_instant"])
def test_sage_matches_the_float64_reference_for_ten_steps(shape, foreach, code_compat, instant_damper):
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(shape, dtype=torch.float64))
    ref = param.detach().clone()
    ref_state = ReferenceSAGEState.zeros_like(param)
    opt = so.SAGE([param], **HYPER, foreach=foreach, code_compat=code_compat, instant_damper=instant_damper)
    for g in _grads(shape, 10):
        pre_sign = 0.9 * ref_state.momentum + 0.1 * g
        param.grad = g.clone()
        opt.step()
        ref = reference_sage_step(ref, g, ref_state, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1,
                                  instant_damper=instant_damper, code_compat=code_compat)
        _assert_matches_reference(param, ref, pre_sign)
    state = opt.state[param]
    assert set(state) == {"step", "exp_avg", "col_ema"}
    assert state["step"].item() == 10
    torch.testing.assert_close(state["exp_avg"], ref_state.momentum, atol=1e-12, rtol=0)
    torch.testing.assert_close(state["col_ema"], ref_state.col_ema, atol=1e-12, rtol=0)
    assert state["col_ema"].shape == (shape[1:] if len(shape) >= 2 else shape)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("foreach", [False, True], ids=["forloop", "foreach"])
def test_lion_matches_the_reference_with_the_damper_off(shape, foreach):
    param = torch.nn.Parameter(torch.randn(shape, dtype=torch.float64))
    ref = param.detach().clone()
    ref_state = ReferenceSAGEState.zeros_like(param)
    opt = so.Lion([param], lr=1e-2, weight_decay=0.1, foreach=foreach)
    for g in _grads(shape, 10, seed=3):
        param.grad = g.clone()
        opt.step()
        ref = reference_sage_step(ref, g, ref_state, lr=1e-2, weight_decay=0.1, damper=False)
    torch.testing.assert_close(param.detach(), ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("foreach", [False, True], ids=["forloop", "foreach"])
def test_lion_equals_lion_pytorch_step_for_step(foreach):
    lion_pytorch = pytest.importorskip("lion_pytorch")
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(s)) for s in [(32, 16), (16,), (5, 4, 3)]]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt_ours = so.Lion(ours, lr=3e-3, betas=(0.9, 0.99), weight_decay=0.1, foreach=foreach)
    opt_theirs = lion_pytorch.Lion(theirs, lr=3e-3, betas=(0.9, 0.99), weight_decay=0.1)
    for step in range(20):
        grads = [torch.randn_like(p) for p in ours]
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt_ours.step()
        opt_theirs.step()
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=0)  # float32: rounding order may differ


def test_sage_with_damper_equal_to_one_is_lion():
    """When every column has the same mean |g| for all steps, H ≡ 1 and SAGE is Lion (claim 1)."""
    param_sage = torch.nn.Parameter(torch.zeros(6, 4, dtype=torch.float64))
    param_lion = torch.nn.Parameter(torch.zeros(6, 4, dtype=torch.float64))
    sage = so.SAGE([param_sage], lr=1e-2, weight_decay=0.0, eps=0.0)
    lion = so.Lion([param_lion], lr=1e-2, weight_decay=0.0)
    signs = torch.Generator().manual_seed(0)
    for _ in range(5):
        g = torch.where(torch.rand(6, 4, generator=signs) > 0.5, 1.0, -1.0).double()
        param_sage.grad, param_lion.grad = g.clone(), g.clone()
        sage.step()
        lion.step()
    torch.testing.assert_close(param_sage, param_lion, atol=1e-15, rtol=0)


shapes_strategy = st.sampled_from([(1,), (5,), (3, 4), (8, 2), (2, 3, 4), (1, 1)])


@settings(max_examples=40, deadline=None)
@given(shape=shapes_strategy, seed=st.integers(0, 2**16), log_scale=st.floats(-6, 6),
       lr=st.floats(1e-5, 1.0), steps=st.integers(1, 6), code_compat=st.booleans())
def test_every_element_moves_at_most_lr_so_the_damper_is_in_0_1(shape, seed, log_scale, lr, steps, code_compat):
    g = torch.Generator().manual_seed(seed)
    param = torch.nn.Parameter(torch.randn(shape, generator=g, dtype=torch.float64))
    opt = so.SAGE([param], lr=lr, weight_decay=0.0, code_compat=code_compat)
    for _ in range(steps):
        before = param.detach().clone()
        param.grad = torch.randn(shape, generator=g, dtype=torch.float64) * 10**log_scale
        opt.step()
        moved = (param.detach() - before).abs()
        rounding = 4 * torch.finfo(torch.float64).eps * before.abs()  # θ − η is rounded at θ's magnitude
        assert bool((moved <= lr * (1 + 1e-12) + rounding).all())
        assert bool(torch.isfinite(param).all())


@settings(max_examples=40, deadline=None)
@given(shape=shapes_strategy, seed=st.integers(0, 2**16), scale=st.floats(1e-3, 1e3), steps=st.integers(1, 5))
def test_the_update_is_invariant_to_scaling_the_gradient(shape, seed, scale, steps):
    g = torch.Generator().manual_seed(seed)
    a = torch.nn.Parameter(torch.randn(shape, generator=g, dtype=torch.float64))
    b = torch.nn.Parameter(a.detach().clone())
    opt_a = so.SAGE([a], eps=0.0)
    opt_b = so.SAGE([b], eps=0.0)
    for _ in range(steps):
        grad = torch.randn(shape, generator=g, dtype=torch.float64) + 0.1
        a.grad, b.grad = grad, grad * scale
        opt_a.step()
        opt_b.step()
    torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_weight_decay_is_decoupled_and_applied_first():
    param = torch.nn.Parameter(torch.full((3, 2), 2.0, dtype=torch.float64))
    opt = so.SAGE([param], lr=0.1, weight_decay=0.5)
    param.grad = torch.zeros(3, 2, dtype=torch.float64)  # sign(0) = 0: only the decay acts
    opt.step()
    torch.testing.assert_close(param.detach(), torch.full((3, 2), 2.0 * (1 - 0.05), dtype=torch.float64))


def test_embedding_rows_absent_from_the_batch_still_count_in_the_column_mean():
    """s_t averages over all V rows, zeros included (SPEC §2): a (V, d) with one active row."""
    vocab, dim = 50, 4
    param = torch.nn.Parameter(torch.zeros(vocab, dim, dtype=torch.float64))
    opt = so.SAGE([param], weight_decay=0.0)
    grad = torch.zeros(vocab, dim, dtype=torch.float64)
    grad[3] = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    param.grad = grad
    opt.step()
    expected_s = grad.abs().mean(0)
    torch.testing.assert_close(opt.state[param]["col_ema"], 0.01 * expected_s)


@pytest.mark.parametrize("foreach", [False, True], ids=["forloop", "foreach"])
def test_bf16_momentum_halves_its_bytes_and_tracks_float32(foreach):
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(64, 32))
    b = torch.nn.Parameter(a.detach().clone())
    opt_a = so.SAGE([a], foreach=foreach)
    opt_b = so.SAGE([b], foreach=foreach, state_dtype=torch.bfloat16)
    for _ in range(10):
        grad = torch.randn(64, 32)
        a.grad, b.grad = grad.clone(), grad.clone()
        opt_a.step()
        opt_b.step()
    assert opt_b.state[b]["exp_avg"].dtype == torch.bfloat16
    assert opt_b.state[b]["col_ema"].dtype == torch.float32
    assert int(opt_b.state_nbytes()) < 0.6 * int(opt_a.state_nbytes())
    # sign updates: at most a few elements flip relative to fp32 momentum, each by ≤ 2·lr per step.
    assert (a - b).abs().max().item() <= 2 * 2e-3 * 10
    assert (a - b).abs().mean().item() < 2e-4


@pytest.mark.parametrize("rows", [3, 700])  # one block and several blocks
def test_column_statistic_of_finite_gradients_near_float32_max_stays_finite_and_exact(rows):
    from sage_optim.functional.sage import _local_statistic

    grad = torch.full((rows, 5), 3e38)
    grad[:, 1] = -1e38
    statistic = _local_statistic(grad, torch.zeros(5), 1.0, 0.99)
    assert statistic.dtype == torch.float64
    expected = torch.tensor([3e38, 1e38, 3e38, 3e38, 3e38], dtype=torch.float32).double()
    torch.testing.assert_close(statistic, expected, rtol=1e-6, atol=0)
