"""A training run killed with SIGKILL at random moments (saves included) always leaves a checkpoint that
loads, and ``--resume`` from it ends with bitwise the losses of an uninterrupted run (issue #9, item 1)."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sage_optim.cli import main
from sage_optim.train.checkpoint import list_checkpoints, load_checkpoint
from sage_optim.train.metrics import read_metrics

FIXTURE = Path(__file__).parent / "fixtures" / "cc0-slice.jsonl.gz"


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


@pytest.mark.slow
def test_sigkill_at_random_moments_never_leaves_a_checkpoint_that_loads_wrong(tmp_path):
    cache = tmp_path / "cache"
    common = ["train", "--preset", "cpu-tiny", "--optimizer", "sage-hybrid", "--steps", "40", "--data", str(FIXTURE),
              f"--data.cache_dir={cache}", "--train.log_every_steps=1", "--output.checkpoint_every_steps=1",
              "--output.keep_checkpoints=2"]
    assert main([*common, "--out", str(tmp_path / "whole")]) == 0
    reference = _losses(tmp_path / "whole")
    rng = random.Random(0)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    interrupted = 0
    for trial in range(4):
        out = tmp_path / f"killed{trial}"
        proc = subprocess.Popen([sys.executable, "-m", "sage_optim", *common, "--out", str(out)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # wait until it has written at least one checkpoint, then kill it at a random moment
        deadline = time.time() + 120
        while not list_checkpoints(out) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        checkpoints = list_checkpoints(out)
        assert checkpoints, "a checkpoint existed before the kill"
        for path in checkpoints:  # every checkpoint left behind loads (no torn file under a final name)
            load_checkpoint(path)
        assert not [p for p in out.iterdir() if p.name.endswith(".pt") and p not in checkpoints and
                    not p.name.startswith(".")]
        if (out / "summary.json").exists():
            continue  # the run finished before the kill
        interrupted += 1
        assert main([*common, "--out", str(out), "--resume"]) == 0
        resumed = _losses(out)
        assert resumed == reference, f"trial {trial}: resumed losses differ from the uninterrupted run"
    assert interrupted >= 2, f"only {interrupted} of 4 runs were killed mid-training: the test lost its teeth"


def test_disk_full_during_a_save_is_one_clear_error_and_earlier_checkpoints_survive(tmp_path, monkeypatch, capsys):
    import errno

    import sage_optim._atomic as atomic

    real_replace = os.replace
    saves = {"n": 0}

    def full_disk_on_third_checkpoint(src, dst):
        if str(dst).endswith(".pt"):
            saves["n"] += 1
            if saves["n"] == 3:
                raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", full_disk_on_third_checkpoint)
    out = tmp_path / "run"
    code = main(["train", "--preset", "cpu-tiny", "--optimizer", "adamw", "--steps", "12", "--data", str(FIXTURE),
                 f"--data.cache_dir={tmp_path / 'cache'}", "--output.checkpoint_every_steps=2",
                 "--output.keep_checkpoints=5", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and "No space left on device" in err and "earlier checkpoints" in err
    kept = list_checkpoints(out)
    assert [p.name for p in kept] == ["ckpt-00000002.pt", "ckpt-00000004.pt"]
    for path in kept:
        load_checkpoint(path)
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]  # no temporary file left behind
