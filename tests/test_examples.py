"""The examples run as scripts, with few steps, on the fixture corpus."""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sage_optim.optim.registry import available_optimizers

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, *args: str, cache_dir: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(EXAMPLES.parent / "src"), "TQDM_DISABLE": "1"}
    done = subprocess.run([sys.executable, str(EXAMPLES / name), *args, "--cache-dir", str(cache_dir)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_torch_loop_trains_a_tiny_llama_with_sinksage(tmp_path: Path) -> None:
    out = run_example("torch_loop.py", "--steps", "12", cache_dir=tmp_path)
    assert "hidden" in out and "sinkgd" in out  # the partition table
    start = float(re.search(r"step 0: val loss ([\d.]+)", out).group(1))
    final = float(re.search(r"final val loss ([\d.]+)", out).group(1))
    assert math.isfinite(final) and final < start


@pytest.mark.skipif("sage-hybrid" not in available_optimizers(), reason="sage-hybrid is not in the registry yet")
def test_hf_trainer_takes_a_sage_optim_optimizer_and_scheduler(tmp_path: Path) -> None:
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    out = run_example("hf_trainer.py", "--steps", "6", "--optimizer", "sage-hybrid", cache_dir=tmp_path)
    match = re.search(r"sage-hybrid: train loss ([\d.]+), eval loss ([\d.]+)", out)
    assert match and all(math.isfinite(float(v)) for v in match.groups())
