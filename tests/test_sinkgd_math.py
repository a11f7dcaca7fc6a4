"""SinkGD against the rewrite-the-matrix Sinkhorn of SPEC §3, and its properties."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import sage_optim as so
from sage_optim.functional import sinkhorn_scalings
from sage_optim.reference import reference_sinkgd_step, reference_sinkhorn

MATRIX_SHAPES = [(1, 6), (9, 1), (257, 96), (33, 7, 3), (4, 4)]


@pytest.mark.parametrize("shape", MATRIX_SHAPES, ids=str)
@pytest.mark.parametrize("foreach", [False, True], ids=["forloop", "foreach"])
@pytest.mark.parametrize("normalization", ["uniform", "sr"])
def test_sinkgd_matches_the_float64_reference_for_ten_steps(shape, foreach, normalization):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, dtype=torch.float64)) for _ in range(3)]  # a same-shape stack
    refs = [p.detach().clone() for p in params]
    opt = so.SinkGD(params, lr=1e-2, weight_decay=0.1, scale=3.0, normalization=normalization, foreach=foreach)
    for _ in range(10):
        grads = [torch.randn(shape, dtype=torch.float64) for _ in params]
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        refs = [reference_sinkgd_step(r, g, lr=1e-2, weight_decay=0.1, scale=3.0, normalization=normalization)
                for r, g in zip(refs, grads)]
    for p, r in zip(params, refs):
        torch.testing.assert_close(p.detach(), r, atol=1e-12, rtol=0)
    assert all(len(s) == 0 for s in opt.state.values())
    assert int(opt.state_nbytes()) == 0


def test_foreach_handles_mixed_shapes_and_chunks():
    torch.manual_seed(0)
    shapes = [(8, 4), (8, 4), (4, 8), (16, 2, 2), (8, 4)]
    a = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in shapes]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    for p, q in zip(a, b):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    so.SinkGD(a, lr=0.1, foreach=False).step()
    so.SinkGD(b, lr=0.1, foreach=True).step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, atol=1e-13, rtol=0)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 40), seed=st.integers(0, 2**16), iters=st.integers(1, 6))
def test_sr_equals_sqrt_rows_times_uniform(rows, cols, seed, iters):
    g = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    squares = g * g
    r_u, c_u = sinkhorn_scalings(squares, iters=iters, eps=0.0, normalization="uniform", global_rows=rows)
    r_s, c_s = sinkhorn_scalings(squares, iters=iters, eps=0.0, normalization="sr", global_rows=rows)
    uniform = r_u[:, None] * g * c_u[None, :]
    sr = r_s[:, None] * g * c_s[None, :]
    torch.testing.assert_close(sr, math.sqrt(rows) * uniform, atol=1e-10, rtol=1e-10)


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(2, 30), cols=st.integers(2, 30), seed=st.integers(0, 2**16))
def test_row_and_column_norms_converge_as_iters_grows(rows, cols, seed):
    g = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.5

    def imbalance(iters):
        x = reference_sinkhorn(g, iters=iters, eps=0.0)
        # after the column step columns are unit; how far rows are from their common norm measures convergence
        row_norms = torch.linalg.vector_norm(x, dim=1)
        return (row_norms / row_norms.mean() - 1).abs().max().item()

    errors = [imbalance(i) for i in (1, 5, 50)]
    assert errors[2] <= errors[0] + 1e-12
    assert errors[2] < 1e-3 or errors[2] < 0.5 * errors[0]


def test_diagonal_scaling_equals_the_matrix_rewrite_including_eps():
    g = torch.randn(20, 11, dtype=torch.float64) * 1e-6  # tiny norms make ε matter
    r, c = sinkhorn_scalings(g * g, iters=5, eps=1e-8, normalization="uniform", global_rows=20)
    torch.testing.assert_close(r[:, None] * g * c[None, :], reference_sinkhorn(g, iters=5, eps=1e-8),
                               atol=1e-12, rtol=1e-12)


def test_maximize_flips_the_step():
    p = torch.nn.Parameter(torch.zeros(4, 3, dtype=torch.float64))
    q = torch.nn.Parameter(torch.zeros(4, 3, dtype=torch.float64))
    g = torch.randn(4, 3, dtype=torch.float64)
    p.grad, q.grad = g.clone(), g.clone()
    so.SinkGD([p], lr=0.1, weight_decay=0.0).step()
    so.SinkGD([q], lr=0.1, weight_decay=0.0, maximize=True).step()
    torch.testing.assert_close(p, -q)
