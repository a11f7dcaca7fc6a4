"""Generic behaviour every optimizer of the table must have (torch.optim's optim_db tests)."""
from __future__ import annotations

import copy
import io
import re

import pytest
import torch

import sage_optim as so
from optim_db import OPTIMIZERS, all_error_inputs, all_inputs, input_id

SHAPES = [(1,), (7,), (1, 5), (6, 1), (257, 96), (33, 7, 3)]


def _params(info, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [s for s in SHAPES if len(s) >= 2] if info.matrices_only else SHAPES
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in shapes]


def _set_grads(params, step, dtype=None):
    g = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=dtype or p.dtype)


@pytest.mark.parametrize("pair", all_inputs(), ids=input_id)
def test_foreach_matches_forloop_in_float64(pair):
    info, inp = pair
    a = _params(info)
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_a = info.make(a, **inp.kwargs, foreach=False)
    opt_b = info.make(b, **inp.kwargs, foreach=True)
    for step in range(10):
        _set_grads(a, step)
        _set_grads(b, step)
        opt_a.step()
        opt_b.step()
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa, pb, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("pair", all_inputs(), ids=input_id)
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
@pytest.mark.parametrize("with_scheduler", [False, True], ids=["", "scheduler"])
def test_goes_right_direction(pair, contiguous, with_scheduler):
    info, inp = pair
    torch.manual_seed(0)
    weight = torch.randn(16, 12, dtype=torch.float64)
    if not contiguous:
        weight = torch.randn(12, 16, dtype=torch.float64).t()
    weight = torch.nn.Parameter(weight)
    bias = torch.nn.Parameter(torch.randn(16, dtype=torch.float64))
    use_bias = not info.matrices_only
    params = [weight, bias] if use_bias else [weight]
    kwargs = {"lr": 1e-2, **{k: v for k, v in inp.kwargs.items() if k != "maximize"}}
    opt = info.make(params, **kwargs)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=20, gamma=0.5) if with_scheduler else None
    x = torch.randn(64, 12, dtype=torch.float64)
    target = torch.randn(64, 16, dtype=torch.float64)

    def loss_fn():
        out = x @ weight.t() + (bias if use_bias else 0)
        return (out - target).square().mean()

    initial = loss_fn().item()
    for _ in range(60):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
        if scheduler:
            scheduler.step()
    assert loss_fn().item() < 0.98 * initial


@pytest.mark.parametrize("pair", all_inputs(), ids=input_id)
def test_maximize_equals_minimizing_the_negation(pair):
    info, inp = pair
    if inp.kwargs.get("maximize"):
        pytest.skip("this input already maximizes")
    a = _params(info)
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_a = info.make(a, **inp.kwargs)
    opt_b = info.make(b, **inp.kwargs, maximize=True)
    for step in range(4):
        _set_grads(a, step)
        _set_grads(b, step)
        for p in b:
            p.grad.neg_()
        opt_a.step()
        opt_b.step()
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa, pb, atol=1e-12, rtol=0)


@pytest.mark.parametrize("pair", all_inputs(), ids=input_id)
def test_closure_is_called_once_and_its_loss_returned(pair):
    info, inp = pair
    params = _params(info)
    opt = info.make(params, **inp.kwargs)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = sum(p.square().sum() for p in params)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert len(calls) == 1 and torch.is_tensor(loss)


@pytest.mark.parametrize("pair", all_inputs(), ids=input_id)
def test_state_dict_round_trip_gives_bitwise_identical_next_step(pair):
    info, inp = pair
    a = _params(info)
    opt_a = info.make(a, **inp.kwargs)
    for step in range(3):
        _set_grads(a, step)
        opt_a.step()
    buffer = io.BytesIO()
    torch.save(opt_a.state_dict(), buffer)
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_b = info.make(b, **inp.kwargs)
    buffer.seek(0)
    opt_b.load_state_dict(torch.load(buffer, weights_only=True))
    for opt, params in ((opt_a, a), (opt_b, b)):
        _set_grads(params, 3)
        opt.step()
    for pa, pb in zip(a, b):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("info", [i for i in OPTIMIZERS if i.name != "SinkGD"], ids=str)
def test_bf16_parameters_keep_float32_state_through_a_load(info):
    params = [torch.nn.Parameter(torch.randn(8, 4, dtype=torch.bfloat16)),
              torch.nn.Parameter(torch.randn(4, dtype=torch.bfloat16))]
    opt = info.make(params)
    _set_grads(params, 0)
    opt.step()
    fresh = info.make([torch.nn.Parameter(p.detach().clone()) for p in params])
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
    float_states = [v for s in fresh.state.values() for k, v in s.items() if k != "step"]
    assert float_states and all(v.dtype == torch.float32 for v in float_states)
    for saved, loaded in zip(opt.state.values(), fresh.state.values()):
        for key in saved:
            assert torch.equal(saved[key], loaded[key])


@pytest.mark.parametrize("pair", all_error_inputs(),
                         ids=lambda pair: f"{pair[0].name}-{re.sub(r'[^a-z0-9]+', '_', pair[1].desc)}")
def test_bad_input_raises_a_clear_error(pair):
    info, error = pair
    if error.params == "vector":
        params = [torch.nn.Parameter(torch.randn(5))]
    elif error.params == "complex":
        params = [torch.nn.Parameter(torch.randn(4, 3, dtype=torch.complex64))]
    else:  # a matrix, plus a vector where the optimizer takes vectors (so every rule's group exists)
        params = [torch.nn.Parameter(torch.randn(4, 3))]
        if not info.matrices_only:
            params.append(torch.nn.Parameter(torch.randn(3)))
    with pytest.raises(error.error_type, match=error.error_regex):
        info.make(params, **error.kwargs)


@pytest.mark.parametrize("info", OPTIMIZERS, ids=str)
def test_edited_param_group_is_validated_at_the_next_step(info):
    params = _params(info)
    opt = info.make(params)
    opt.param_groups[0]["lr"] = -1.0
    _set_grads(params, 0)
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match="Invalid learning rate lr: -1.0"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before))


@pytest.mark.parametrize("info", OPTIMIZERS, ids=str)
def test_parameter_in_two_groups_is_refused(info):
    p = torch.nn.Parameter(torch.randn(4, 3))
    with pytest.raises(ValueError, match="more than one parameter group"):
        if info.name == "SinkSAGE":
            so.SinkSAGE([{"params": [p], "rule": "sinkgd"}, {"params": [p], "rule": "sage"}])
        else:
            info.make([{"params": [p]}, {"params": [p]}])


@pytest.mark.parametrize("info", OPTIMIZERS, ids=str)
def test_sparse_gradient_is_refused(info):
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = info.make([p])
    p.grad = torch.randn(4, 3).to_sparse()
    with pytest.raises(TypeError, match="sparse gradient"):
        opt.step()


@pytest.mark.parametrize("info", OPTIMIZERS, ids=str)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nonfinite_gradient_raises_naming_the_parameter_and_updates_nothing(info, bad):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4))
    named = list(model.named_parameters())
    if info.matrices_only:
        named = named[:1]
    opt = info.make([p for _, p in named]) if info.name == "SinkSAGE" else info.make(named)
    before = [p.detach().clone() for _, p in named]
    for _, p in named:
        p.grad = torch.ones_like(p)
    named[0][1].grad[1, 2] = bad
    pattern = "non-finite gradient.*" + ("0.weight" if info.name != "SinkSAGE" else r"param_groups\[0\]")
    with pytest.raises(so.NonFiniteGradientError, match=pattern):
        opt.step()
    assert all(torch.equal(p, q) for (_, p), q in zip(named, before))
    assert all(len(s) == 0 for s in opt.state.values())


@pytest.mark.parametrize("info", OPTIMIZERS, ids=str)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_a_finite_gradient_whose_sum_overflows_is_finite_and_a_bad_one_among_huge_is_not(info, bad):
    params = _params(info, dtype=torch.float32)
    opt = info.make(params, nonfinite="skip")
    for p in params:  # every entry finite, their sum far beyond float32's range
        p.grad = torch.full_like(p, 3e38)
    opt.step()
    assert opt.skipped_steps == 0
    for p in params:
        p.grad = torch.full_like(p, -3e38)
    params[-1].grad.view(-1)[-1] = bad
    opt.step()
    assert opt.skipped_steps == 1


@pytest.mark.parametrize("info", OPTIMIZERS, ids=str)
def test_nonfinite_skip_policy_skips_the_whole_step_and_counts_it(info):
    params = _params(info, dtype=torch.float32)
    opt = info.make(params, nonfinite="skip")
    before = [p.detach().clone() for p in params]
    _set_grads(params, 0)
    params[-1].grad.view(-1)[0] = float("nan")
    opt.step()
    assert opt.skipped_steps == 1
    assert all(torch.equal(p, q) for p, q in zip(params, before))
    _set_grads(params, 1)
    opt.step()
    assert opt.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in params)
    assert any(not torch.equal(p, q) for p, q in zip(params, before))


@pytest.mark.parametrize("info", OPTIMIZERS, ids=str)
def test_parameters_without_grad_are_left_alone_and_get_no_state(info):
    params = _params(info)
    opt = info.make(params)
    _set_grads(params, 0)
    params[0].grad = None
    before = params[0].detach().clone()
    opt.step()
    assert torch.equal(params[0], before)
    assert len(opt.state[params[0]]) == 0


@pytest.mark.parametrize("info", OPTIMIZERS, ids=str)
def test_state_nbytes_matches_the_state_actually_allocated(info):
    params = _params(info, dtype=torch.float32)
    opt = info.make(params)
    predicted = opt.state_nbytes()
    _set_grads(params, 0)
    opt.step()
    actual = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values())
    assert int(predicted) == actual == int(opt.state_nbytes())


@pytest.mark.parametrize("info", OPTIMIZERS, ids=str)
def test_verify_every_is_validated_and_harmless_on_plain_tensors(info):
    params = _params(info, dtype=torch.float32)
    with pytest.raises(ValueError, match="verify_every must be None or an integer >= 1"):
        info.make(params, verify_every=0)
    opt = info.make(params, verify_every=1)  # nothing is sharded: nothing to check, nothing changes
    reference = info.make([torch.nn.Parameter(p.detach().clone()) for p in params])
    for optimizer in (opt, reference):
        _set_grads(_all(optimizer), 0)
        optimizer.step()
    for p, q in zip(_all(opt), _all(reference)):
        assert torch.equal(p, q)


def _all(optimizer):
    return [p for group in optimizer.param_groups for p in group["params"]]
