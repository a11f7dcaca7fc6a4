"""``sage-optim bench`` and the bound on step temporaries (torch's peak-memory tests, on any device)."""
from __future__ import annotations

import importlib.util
import shutil

import pytest
import torch
from torch import nn

import sage_optim as so
from sage_optim.bench import PeakAllocations
from sage_optim.cli import main


def test_peak_allocations_counts_new_storages_until_they_are_freed() -> None:
    base = torch.zeros(1000)
    with PeakAllocations() as tracker:
        a = base + 1                 # 4000 B, new
        view = a[:10]                # a view: no new storage
        base.add_(1)                 # in place: nothing new
        b = a * 2                    # another 4000 B
        del a                        # still alive through `view`
        del b
        c = torch.empty(250)         # 1000 B
    assert tracker.peak == 8000
    assert tracker.live == 4000 + 1000
    del view, c
    assert tracker.live == 0


class TinyLM(nn.Module):
    """Embedding and head much larger than any hidden matrix, as in an LLM (the largest is 512 × 600)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(600, 512)
        self.hidden = nn.Sequential(nn.Linear(512, 96, bias=False), nn.Linear(96, 512, bias=False))
        self.norm = nn.LayerNorm(512)
        self.head = nn.Linear(512, 600, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.hidden(self.embed(tokens))))

    def get_output_embeddings(self) -> nn.Module:
        return self.head


_needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="the [triton] extra is not installed")


@pytest.mark.parametrize("make", [
    pytest.param(lambda m: so.SinkSAGE(m, foreach=False), id="SinkSAGE-for-loop"),
    pytest.param(lambda m: so.SinkSAGE(m, foreach=True), id="SinkSAGE-foreach"),
    pytest.param(lambda m: so.SinkSAGE(m, state_dtype=torch.bfloat16), id="SinkSAGE-bf16-state"),
    pytest.param(lambda m: so.SAGE(m.parameters(), foreach=False), id="SAGE-for-loop"),
    pytest.param(lambda m: so.Lion(m.parameters(), foreach=False), id="Lion-for-loop"),
    pytest.param(lambda m: so.SinkGD([p for p in m.parameters() if p.ndim == 2], lr=1e-3, foreach=False), id="SinkGD"),
    # on CPU the Triton kernels run in the interpreter (conftest.py), which allocates like the GPU path
    pytest.param(lambda m: so.SinkSAGE(m, fused=True), id="SinkSAGE-fused", marks=_needs_triton),
])
def test_step_temporaries_stay_within_one_largest_parameter(make) -> None:
    _assert_step_temporaries_bounded(make)


@pytest.mark.skipif(not any(shutil.which(c) for c in ("cc", "gcc", "clang")), reason="no C compiler on this machine")
def test_fused_c_kernels_allocate_no_full_size_temporary(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors to the C kernels, not Triton's interpreter
    _assert_step_temporaries_bounded(lambda m: so.SinkSAGE(m, fused=True, state_dtype=torch.bfloat16))


def _assert_step_temporaries_bounded(make) -> None:
    torch.manual_seed(0)
    model = TinyLM()
    opt = make(model)
    tokens = torch.randint(0, 600, (4, 16))
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    for step in range(3):
        opt.zero_grad()
        model(tokens).logsumexp(-1).mean().backward()
        if step == 0:
            opt.step()  # builds the state: not a temporary
            continue
        with PeakAllocations() as tracker:
            opt.step()
        # note: O(d) vectors (dampers, scalings, statistics) come on top of the one buffer
        assert tracker.peak <= largest + 64 * 1024, (tracker.peak, largest)
        assert tracker.live <= 64 * 1024  # nothing full-size outlives the step


def test_bench_prints_ratios_measured_in_one_run(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--preset", "tiny", "--repeats", "1", "--only", "AdamW (fused)", "SinkSAGE (for-loop)",
                 "naive"]) == 0
    out = capsys.readouterr().out
    assert "copy bandwidth" in out
    rows = {line[:32].strip(): line[32:].split() for line in out.splitlines()[2:]}
    assert set(rows) == {"torch AdamW (fused)", "naive per-parameter loop", "SinkSAGE (for-loop)"}
    assert rows["torch AdamW (fused)"][1] == "1.00x"
    ms, ratio = float(rows["SinkSAGE (for-loop)"][0]), float(rows["SinkSAGE (for-loop)"][1].rstrip("x"))
    base = float(rows["torch AdamW (fused)"][0])
    # the printed columns agree up to their rounding (ms to 0.01, ratios to 0.01)
    assert abs(ratio * base - ms) <= 0.005 * (1 + base + ratio) + 1e-9
    assert float(rows["SinkSAGE (for-loop)"][-1]) <= 1.05  # peak temporaries / largest parameter


@_needs_triton
def test_bench_times_the_fused_paths_when_asked(capsys: pytest.CaptureFixture[str]) -> None:
    # on CPU the kernels run in Triton's interpreter: the numbers mean nothing, the rows must be there
    assert main(["bench", "--preset", "tiny", "--repeats", "1", "--fused", "--no-peak",
                 "--only", "AdamW (fused)", "SinkSAGE (fused)"]) == 0
    rows = {line[:32].strip() for line in capsys.readouterr().out.splitlines()[2:]}
    assert rows == {"torch AdamW (fused)", "SinkSAGE (fused)"}
