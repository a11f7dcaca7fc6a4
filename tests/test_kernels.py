"""The fused=True paths (C on CPU, Triton on CUDA) against the for-loop path.

Every test runs once per backend. Without a GPU: the C kernels, and the Triton kernels in Triton's
interpreter (TRITON_INTERPRET=1 sends CPU tensors to them; conftest.py sets it before Triton is imported,
as Triton reads it once), which executes the same kernel code on CPU tensors. With a GPU: the C kernels and
the Triton kernels compiled for CUDA. The bf16-parameter case needs real bf16 loads, which the interpreter
lacks, so its Triton variant is GPU-only.
"""
from __future__ import annotations

import importlib.util
import math
import os
import shutil
import sys

import pytest
import torch

import sage_optim as so
from optim_db import OPTIMIZERS, all_inputs, input_id

ON_GPU = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CC = any(shutil.which(c) for c in (os.environ.get("CC") or "cc", "gcc", "clang"))
#: (name, device of the tensors); the Triton backend is skipped without the [triton] extra (CI has it)
BACKENDS = [("c", "cpu"), ("triton", "cuda" if ON_GPU else "cpu")]

# small shapes: the interpreter runs each program in numpy; (1, 5) and (6, 1) are degenerate matrices,
# (40, 70) spans several row and column blocks of every kernel, (9, 4, 3) has trailing dims to flatten
SHAPES = [(7,), (1, 5), (6, 1), (40, 70), (9, 4, 3)]
DEVICE = "cpu"  # set per test by the backend fixture


@pytest.fixture(params=BACKENDS, ids=[b[0] for b in BACKENDS])
def backend(request, monkeypatch):
    global DEVICE
    name, DEVICE = request.param
    if name == "triton":
        if not HAS_TRITON:
            pytest.skip("the [triton] extra is not installed")
        if DEVICE == "cpu":
            monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        if not HAS_CC:
            pytest.skip("no C compiler on this machine (the C backend builds its kernels with one)")
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    return request.param


def _params(info, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [s for s in SHAPES if len(s) >= 2] if info.matrices_only else SHAPES
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype).to(DEVICE)) for s in shapes]


def _run_pair(info, kwargs, dtype, steps, grad_dtype=None):
    a = _params(info, dtype)
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_a = info.make(a, **kwargs, foreach=False, fused=False)
    opt_b = info.make(b, **kwargs, fused=True)
    sched = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 0.7**s) for o in (opt_a, opt_b)]
    for step in range(steps):
        g = torch.Generator().manual_seed(1000 + step)
        for pa, pb in zip(a, b):
            grad = torch.randn(pa.shape, generator=g, dtype=grad_dtype or dtype).to(DEVICE)
            pa.grad, pb.grad = grad.clone(), grad.clone()
        opt_a.step()
        opt_b.step()
        for s in sched:
            s.step()
    return a, b, opt_a, opt_b


@pytest.mark.parametrize("pair", all_inputs(), ids=input_id)
def test_fused_matches_the_for_loop_in_float64(pair, backend):
    info, inp = pair
    a, b, _, _ = _run_pair(info, inp.kwargs, torch.float64, steps=4)
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pb, pa, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("info", OPTIMIZERS, ids=str)
def test_fused_matches_the_for_loop_in_float32(info, backend):
    a, b, _, _ = _run_pair(info, {}, torch.float32, steps=3)
    for pa, pb in zip(a, b):
        # a sign can flip where the direction is within float32 rounding of 0; none does at these values
        torch.testing.assert_close(pb, pa, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["SAGE", "Lion", "SinkSAGE"])
def test_fused_bf16_momentum_matches_the_for_loop(name, backend):
    info = next(i for i in OPTIMIZERS if i.name == name)
    a, b, opt_a, opt_b = _run_pair(info, {"state_dtype": torch.bfloat16}, torch.float32, steps=3)
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pb, pa, atol=1e-6, rtol=1e-5)
        ma, mb = opt_a.state[pa].get("exp_avg"), opt_b.state[pb].get("exp_avg")
        if ma is not None:
            assert mb.dtype == torch.bfloat16
            # both round the float32 update to nearest-even: at most one bf16 ulp apart where float32
            # arithmetic orders differ, equal almost everywhere
            torch.testing.assert_close(mb.float(), ma.float(), atol=0, rtol=2**-7)
            assert (mb != ma).float().mean() < 0.01


@pytest.mark.parametrize("info", OPTIMIZERS, ids=str)
def test_fused_bf16_parameters_match_the_for_loop(info, backend):
    if backend == ("triton", "cpu"):
        pytest.skip("bf16 loads need a GPU (Triton's interpreter reads bf16 as zeros)")
    a, b, _, _ = _run_pair(info, {}, torch.bfloat16, steps=3)
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pb.float(), pa.float(), atol=1e-2, rtol=1e-2)


def test_strided_parameters_take_the_blocked_path_and_still_match(backend):
    base = torch.randn(30, 20, dtype=torch.float64, device=DEVICE)
    a = [torch.nn.Parameter(base.clone().t())]  # non-contiguous
    b = [torch.nn.Parameter(base.clone().t())]
    opt_a, opt_b = so.SAGE(a, foreach=False, fused=False), so.SAGE(b, fused=True)
    for step in range(3):
        grad = torch.randn(20, 30, dtype=torch.float64, device=DEVICE)
        a[0].grad, b[0].grad = grad.clone(), grad.clone()
        opt_a.step()
        opt_b.step()
    torch.testing.assert_close(b[0], a[0], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype, magnitudes", [(torch.float32, (1e-30, 1e30, 1e-40, 1e38)),
                                               (torch.float64, (1e-310, 1e300))],
                         ids=["float32-subnormal-and-huge", "float64-subnormal-and-huge"])
def test_sinkgd_fused_handles_tiny_and_huge_gradients_like_the_for_loop(backend, dtype, magnitudes):
    for magnitude in magnitudes:
        if backend[0] == "triton" and dtype == torch.float32 and magnitude < 1e-38:
            # known limit, documented in triton_kernels.py: r and c live in float32 there, and with a subnormal
            # max |G| the first row step's ε/s (~1e31) makes r² underflow
            continue
        a = [torch.nn.Parameter(torch.zeros(12, 9, dtype=dtype, device=DEVICE))]
        b = [torch.nn.Parameter(torch.zeros(12, 9, dtype=dtype, device=DEVICE))]
        # |G| up to 3 × magnitude: 1e38 puts max |G| above 2^126, where 1/s is no normal float32
        grad = torch.randn(12, 9, dtype=dtype, device=DEVICE).clamp(-3, 3) * magnitude
        grad[3] = 0  # an all-zero row stays finite
        for params, fused in ((a, False), (b, True)):
            params[0].grad = grad.clone()
            so.SinkGD(params, lr=1e-2, fused=fused, foreach=False).step()
        assert torch.isfinite(b[0]).all()
        torch.testing.assert_close(b[0], a[0], atol=1e-7, rtol=1e-5)


@pytest.mark.skipif(not HAS_CC, reason="no C compiler on this machine")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("rows", [1030, 1032, 2053])
@pytest.mark.parametrize("threads", [1, 2, 3, 4])
def test_c_sinkgd_row_blocks_and_column_sum_blocks_cover_every_row(dtype, rows, threads, monkeypatch):
    # the C sweep takes rows four at a time and flushes its column sums every 256 rows of a thread: these
    # cross that boundary on 1-4 threads, and end with or without a tail of 1-3 rows after the last four
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors go to the C kernels
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)  # the kernels' thread count
    a = [torch.nn.Parameter(torch.randn(rows, 6, dtype=dtype))]
    b = [torch.nn.Parameter(a[0].detach().clone())]
    a[0].grad = torch.randn(rows, 6, dtype=dtype) * torch.linspace(0.1, 3.0, rows, dtype=dtype)[:, None]
    b[0].grad = a[0].grad.clone()
    so.SinkGD(a, lr=1e-2, weight_decay=0.1, fused=False, foreach=False).step()
    so.SinkGD(b, lr=1e-2, weight_decay=0.1, fused=True).step()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(b[0], a[0], atol=tol, rtol=tol)


@pytest.mark.skipif(not HAS_CC, reason="no C compiler on this machine")
def test_c_max_abs_reads_nan_and_gives_the_functional_grad_scale():
    from sage_optim.functional.sinkgd import max_abs
    from sage_optim.kernels import cpu

    nan, inf = float("nan"), float("inf")
    cases = {"float32": (torch.randn(1000, 7), None), "float64": (torch.randn(33, 5, dtype=torch.float64), None),
             "zeros": (torch.zeros(3, 3), 0.0), "empty": (torch.zeros(0, 4), 0.0),
             "nan": (torch.tensor([[1.0, nan], [3.0, -5.0]]), nan), "inf": (torch.tensor([[-inf, 1.0]]), inf),
             "subnormal": (torch.tensor([[1e-45, -3e-45]]), None), "negative": (torch.tensor([[-7.0, 2.0]]), 7.0)}
    for name, (tensor, raw) in cases.items():
        largest = cpu.max_abs(tensor)
        if raw is not None:
            assert largest == raw or (math.isnan(raw) and math.isnan(largest)), name
        assert cpu.grad_scale(largest) == float(max_abs(tensor)), name  # s as the for-loop path takes it


@pytest.mark.skipif(not HAS_CC, reason="no C compiler on this machine")
@pytest.mark.parametrize("threads", [1, 2, 3, 4])
def test_c_two_stream_reads_cover_every_element(threads, monkeypatch):
    # max |x| and the column sums read each thread's share as two interleaved halves, in chunks (256
    # elements; 256-row blocks): the largest entry and a marked row placed in either half, in a tail after the
    # last whole chunk, or at either end are all seen, on 1-4 threads
    from sage_optim.kernels import cpu

    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    for n in (1, 2, 511, 512, 513, 3 * 1024 + 17):
        for where in {min(i, n - 1) for i in (0, n // 4, n // 2, n // 2 + 1, n - 2, n - 1)}:
            x = torch.rand(n) - 0.5
            x[where] = -7.0
            assert cpu.max_abs(x) == 7.0, (n, where)
            x[where] = float("nan")
            assert math.isnan(cpu.max_abs(x)), (n, where)
    for rows in (1, 2, 3, 513, 1030, 2 * 1024 + 5):
        matrix = torch.rand(rows, 6, dtype=torch.float64) - 0.5
        matrix[rows // 2 + 1 if rows > 2 else 0] = 1000.0
        for dtype in (torch.float64, torch.float32):
            expected = matrix.to(dtype).double().abs().sum(0) / rows
            torch.testing.assert_close(cpu.column_abs_sums(matrix.to(dtype).contiguous(), rows), expected,
                                       rtol=1e-12 if dtype == torch.float64 else 1e-5, atol=0)


@pytest.mark.parametrize("info", OPTIMIZERS, ids=str)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_fused_nonfinite_gradient_is_caught_before_anything_is_updated(info, bad, backend):
    params = _params(info, torch.float32)
    before = [p.detach().clone() for p in params]
    for policy in ("raise", "skip"):
        opt = info.make(params, fused=True, nonfinite=policy)
        for p in params:
            p.grad = torch.full_like(p, 3e38)  # huge but finite: column sums and max |G| stay finite
        params[len(params) // 2].grad.view(-1)[-1] = bad  # a matrix: its first-pass result is what is checked
        if policy == "raise":
            with pytest.raises(so.NonFiniteGradientError, match="non-finite gradient"):
                opt.step()
        else:
            opt.step()
            assert opt.skipped_steps == 1
        assert all(torch.equal(p, q) for p, q in zip(params, before))
        assert all(len(s) == 0 for s in opt.state.values())
        for p in params:
            p.grad = torch.full_like(p, 3e38)
        opt.step()  # no false alarm from the huge finite values
        assert all(torch.isfinite(p).all() for p in params)
        for p, q in zip(params, before):
            p.data.copy_(q)


@pytest.mark.skipif(not HAS_CC, reason="no C compiler on this machine")
def test_c_fused_step_reads_matrix_gradients_once_for_the_finite_check_and_the_update(monkeypatch):
    # the finite check takes SinkGD's max |G| and SAGE's column sums from the step's own first read:
    # only the vector gradients are read by the check itself, and max |G| once per matrix
    import sage_optim.distributed as dist_support
    from sage_optim.kernels import cpu

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    checked, maxima = [], []
    all_finite, max_abs = dist_support.all_finite, cpu.max_abs
    monkeypatch.setattr(dist_support, "all_finite", lambda grads: checked.append([tuple(g.shape) for g in grads])
                        or all_finite(grads))
    monkeypatch.setattr(cpu, "max_abs", lambda t: maxima.append(tuple(t.shape)) or max_abs(t))
    model = torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Linear(8, 16), torch.nn.LayerNorm(16),
                                torch.nn.Linear(16, 50, bias=False))
    twin = {p: torch.nn.Parameter(p.detach().clone()) for p in model.parameters()}
    opt = so.SinkSAGE(model, fused=True)
    hidden = [tuple(r.shape) for r in opt.partition.rows if r.rule == "sinkgd"]
    for p, q in twin.items():
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    opt.step()
    assert sorted(maxima) == sorted(hidden)  # once each, not again inside the step
    assert checked == [[(16,), (16,), (16,)]]  # Linear bias, LayerNorm weight and bias: vectors only
    # and the step is the one the for-loop path takes
    loop = so.SinkSAGE([{**g, "params": [twin[p] for p in g["params"]], "fused": False, "foreach": False}
                        for g in opt.param_groups])
    loop.step()
    assert sorted(checked[-1]) == sorted(tuple(p.shape) for p in model.parameters())  # not fused: all read
    twin = list(twin.values())
    for p, q in zip(model.parameters(), twin):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


@pytest.mark.skipif(not HAS_CC, reason="no C compiler on this machine")
@pytest.mark.parametrize("name, kwargs", [("SAGE", {}), ("SAGE", {"code_compat": True}), ("Lion", {})],
                         ids=["SAGE", "SAGE-code-compat", "Lion"])
def test_c_int8_momentum_step_matches_the_torch_path(name, kwargs, monkeypatch):
    # the same decode, step and counter-based stochastic rounding in one C pass; torch's lerp may round the
    # momentum 1 ulp differently (it can use FMA), which moves a rounding decision now and then
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch.manual_seed(0)
    shapes = [(300, 700), (40,), (5, 3, 100)]
    a = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    kw = dict(lr=1e-2, weight_decay=0.1, state_dtype=torch.int8, **kwargs)
    loop = getattr(so, name)(a, foreach=False, fused=False, **kw)
    fused = getattr(so, name)(b, fused=True, **kw)
    for _ in range(10):
        for pa, pb in zip(a, b):
            pa.grad = torch.randn(pa.shape)
            pb.grad = pa.grad.clone()
        loop.step()
        fused.step()
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pb, pa, atol=1e-5, rtol=0)
        sa, sb = loop.state[pa], fused.state[pb]
        assert (sa["exp_avg"] != sb["exp_avg"]).float().mean() < 1e-3
        torch.testing.assert_close(sb["exp_avg_absmax"], sa["exp_avg_absmax"], rtol=1e-5, atol=0)


def test_fused_is_chosen_automatically_only_for_cuda_parameters():
    from sage_optim.optim._base import _default_fused

    assert _default_fused([torch.zeros(3)]) is False  # CPU: opt in (the C kernels are built on first use)
    if ON_GPU and HAS_TRITON:
        assert _default_fused([torch.zeros(3, device="cuda")]) is True


def test_fused_argument_errors_are_clear(monkeypatch):
    params = [torch.nn.Parameter(torch.randn(4, 3))]
    with pytest.raises(TypeError, match="fused must be None, True or False"):
        so.SAGE(params, fused="yes")
    with pytest.raises(ValueError, match="fused=True and compile=True"):
        so.SAGE(params, fused=True, compile=True)
    from sage_optim import kernels

    monkeypatch.setitem(sys.modules, "triton", None)  # as if Triton were not installed
    with pytest.raises(ImportError, match=r"pip install 'sage-optim\[triton\]'"):
        kernels.backend(torch.device("cuda"))
    with pytest.raises(ValueError, match=r"fused=True has kernels for CUDA and CPU tensors.*pass fused=False"):
        kernels.backend(torch.device("meta"))


def test_a_missing_c_compiler_is_reported_before_anything_is_updated(monkeypatch, tmp_path):  # needs none
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors to the C backend
    from sage_optim.kernels import cpu

    monkeypatch.setattr(cpu, "_library", None)
    monkeypatch.setenv("SAGE_OPTIM_CACHE", str(tmp_path))  # nothing cached: a build is needed
    monkeypatch.setenv("CC", "no-such-compiler")
    monkeypatch.setenv("PATH", str(tmp_path))
    params = [torch.nn.Parameter(torch.randn(4, 3))]
    params[0].grad = torch.randn(4, 3)
    before = params[0].detach().clone()
    with pytest.raises(RuntimeError, match="no C compiler was found.*pass fused=False"):
        so.SAGE(params, fused=True).step()
    assert torch.equal(params[0], before)


@pytest.mark.skipif(not HAS_CC, reason="no C compiler on this machine")
def test_the_c_library_is_cached_and_not_rebuilt(monkeypatch, tmp_path):
    from sage_optim.kernels import cpu

    monkeypatch.setattr(cpu, "_library", None)
    monkeypatch.setenv("SAGE_OPTIM_CACHE", str(tmp_path))
    cpu.library()
    built = list((tmp_path / "kernels").glob("cpu_kernels-*.so"))
    assert len(built) == 1 and not list((tmp_path / "kernels").glob("*.tmp"))
    monkeypatch.setattr(cpu, "_library", None)
    mtime = built[0].stat().st_mtime_ns
    cpu.library()  # a second process would load the cached file, not rebuild
    assert built[0].stat().st_mtime_ns == mtime


def test_sage_fused_statistic_survives_gradients_whose_block_sums_overflow_float32(backend):
    # 600 rows of |g| ~ 1e37: any 256-row float32 block sum overflows, the statistic itself does not
    a = [torch.nn.Parameter(torch.zeros(600, 5, device=DEVICE))]
    b = [torch.nn.Parameter(torch.zeros(600, 5, device=DEVICE))]
    grad = torch.randn(600, 5, device=DEVICE).sign() * 1e37
    for params, fused in ((a, False), (b, True)):
        params[0].grad = grad.clone()
        opt = so.SAGE(params, fused=fused, foreach=False)
        opt.step()
        assert torch.isfinite(opt.state[params[0]]["col_ema"]).all()
    torch.testing.assert_close(b[0], a[0])
