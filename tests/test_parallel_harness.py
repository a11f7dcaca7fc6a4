"""The harness under torchrun: ``--fsdp`` (FSDP2) and ``--ddp`` on 2 CPU processes (gloo) against 1 process.

Both runs use the same global batch (cpu-tiny: micro-batch 4 x 2 accumulation; each rank takes 2 rows
of every micro-batch), so the updates are the same up to float32 rounding: the two half-batch
gradients are summed by the all-reduce/reduce-scatter instead of inside one matmul, and the loss is
the mean of two half-batch means. Measured on 2 cores (torch 2.13, sage-hybrid, 24 steps): the largest
relative difference of a logged training loss is 1.7e-7 (FSDP2 and DDP alike; many steps match
bitwise), validation losses 8.5e-8. ``LOSS_RTOL`` = 2e-5 is about 100x that (~170 float32 ulps), room
for other BLAS blockings and thread counts; a real error is far larger: building the optimizer from
the DDP wrapper (so the head was routed as a hidden matrix) gave 4.5e-2 by step 5, and a rank that
trains on its half-batch alone differs from step 2 on by ~1e-3 or more.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sage_optim.cli import main
from sage_optim.train.metrics import read_metrics

FIXTURE = Path(__file__).parent / "fixtures" / "cc0-slice.jsonl.gz"
LOSS_RTOL = 2e-5
STEPS = 24


@pytest.fixture(scope="module")
def common(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    cache = tmp_path_factory.mktemp("corpus-cache")
    return ["train", "--preset", "cpu-tiny", "--optimizer", "sage-hybrid", "--steps", str(STEPS),
            "--train.log_every_steps=1", "--data", str(FIXTURE), f"--data.cache_dir={cache}"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
            "CUDA_VISIBLE_DEVICES": ""}


def run_python(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sage_optim", *args], env=_env(), capture_output=True,
                          text=True, timeout=300)


def run_torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone`` (rendezvous on a free localhost port), gloo on CPU."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", "-m", "sage_optim", *args], env=_env(),
                          capture_output=True, text=True, timeout=300)


def losses(run_dir: Path, key: str = "loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(run_dir / "metrics.jsonl") if key in r}


def assert_close(ours: dict[int, float], reference: dict[int, float]) -> float:
    assert sorted(ours) == sorted(reference)
    worst = max(abs(ours[s] - reference[s]) / abs(reference[s]) for s in reference)
    assert worst <= LOSS_RTOL, f"largest relative loss difference {worst:.3g} > {LOSS_RTOL}"
    return worst


@pytest.fixture(scope="module")
def single(common: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    proc = run_python([*common, "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_fsdp_two_ranks_match_one_process(common: list[str], single: Path, tmp_path: Path) -> None:
    out = tmp_path / "fsdp"
    proc = run_torchrun([*common, "--out", str(out), "--fsdp"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(losses(out)) == STEPS
    assert_close(losses(out), losses(single))
    assert_close(losses(out, "val_loss"), losses(single, "val_loss"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["parallel"] == {"mode": "fsdp", "world_size": 2}
    assert json.loads((out / "config.json").read_text())["train"]["parallel"] == "fsdp"
    # only rank 0 prints: one summary on stdout; one "run:" line and one line per evaluation on stderr
    assert proc.stderr.count("run: cpu-tiny") == 1 and proc.stdout.count('"val_loss"') == 1
    assert proc.stderr.count("step 10: val loss") == 1


def test_ddp_two_ranks_match_one_process(common: list[str], single: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    proc = run_torchrun([*common, "--out", str(out), "--ddp"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_close(losses(out), losses(single))


def test_fsdp_checkpoint_resumes_in_one_process(common: list[str], single: Path, tmp_path: Path) -> None:
    """Stopped on 2 FSDP ranks at step 12; the full-state checkpoint continues in a plain 1-process run."""
    out = tmp_path / "parts"
    proc = run_torchrun([*common, "--out", str(out), "--fsdp", "--stop-at", "12"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (out / "summary.json").exists()
    proc = run_python([*common, "--out", str(out), "--resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_close(losses(out), losses(single))


def test_fsdp_without_torchrun_is_a_one_rank_group(common: list[str], tmp_path: Path) -> None:
    """--fsdp in a plain process shards over a process group of one and matches the unwrapped run."""
    short = [*common[:6], "4", *common[7:]]
    assert main([*short, "--out", str(tmp_path / "plain")]) == 0
    assert main([*short, "--out", str(tmp_path / "fsdp1"), "--fsdp"]) == 0
    assert_close(losses(tmp_path / "fsdp1"), losses(tmp_path / "plain"))
    assert main([*short, "--out", str(tmp_path / "ddp1"), "--ddp"]) == 0  # the group was destroyed and remade
    assert_close(losses(tmp_path / "ddp1"), losses(tmp_path / "plain"))


def test_a_batch_that_does_not_split_over_the_ranks_is_refused(common: list[str], tmp_path: Path) -> None:
    proc = run_torchrun([*common, "--out", str(tmp_path / "odd"), "--fsdp", "--train.micro_batch_size=3"])
    assert proc.returncode != 0
    assert "train.micro_batch_size=3 does not split over 2 ranks" in proc.stderr
    assert not (tmp_path / "odd").exists()


def test_fsdp_int8_momentum_stops_and_resumes_in_one_process_as_one_process_runs(common: list[str],
                                                                                 tmp_path: Path) -> None:
    """sage-hybrid-int8: 2 FSDP ranks to step 12 (sharded codes and block maxima), the gathered checkpoint
    resumed in 1 process, against an uninterrupted 1-process run (same stochastic rounding throughout)."""
    at = common.index("--optimizer") + 1
    int8 = [*common[:at], "sage-hybrid-int8", *common[at + 1:]]
    reference = tmp_path / "single"
    proc = run_python([*int8, "--out", str(reference)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "parts"
    proc = run_torchrun([*int8, "--out", str(out), "--fsdp", "--stop-at", "12"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_python([*int8, "--out", str(out), "--resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_close(losses(out), losses(reference))
    assert json.loads((out / "config.json").read_text())["optimizer"] == "sage-hybrid-int8"
