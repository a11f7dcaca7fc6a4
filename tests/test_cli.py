"""The ``sage-optim`` command line, run in-process through ``sage_optim.cli.main``."""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sage_optim.cli import main
from sage_optim.memory import state_bytes_table
from sage_optim.optim.registry import available_optimizers, create_optimizer, unavailable_reason
from sage_optim.train.metrics import read_metrics
from sage_optim.train.model import build_meta_model, build_model
from sage_optim.train.presets import get_preset
from sage_optim.train.checkpoint import latest_checkpoint

FIXTURE = Path(__file__).parent / "fixtures" / "cc0-slice.jsonl.gz"
# every registry optimizer; the optional baselines (apollo, adam-mini) skip where their package is missing
EVERY_OPTIMIZER = [pytest.param(n, marks=pytest.mark.skipif(unavailable_reason(n) is not None,
                                                            reason=str(unavailable_reason(n))))
                   for n in available_optimizers()]


@pytest.fixture(scope="module")
def data_args(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    cache = tmp_path_factory.mktemp("corpus-cache")
    return ["--data", str(FIXTURE), f"--data.cache_dir={cache}"]


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    """The error line: the last line on stderr, the only one that is an error, no traceback."""
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("sage-optim: error: "), err
    assert sum("error" in line.lower() for line in err) == 1 and not any("Traceback" in line for line in err), err
    return err[-1]


def test_train_writes_config_metrics_and_a_finite_summary(tmp_path: Path, data_args: list[str],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    rc = main(["train", "--preset", "cpu-tiny", "--optimizer", "adamw", "--steps", "20", "--out", str(out),
               *data_args])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    summary = json.loads((out / "summary.json").read_text())
    assert printed == summary
    assert math.isfinite(summary["val_loss"]) and math.isfinite(summary["test_ppl"])
    assert summary["steps"] == 20 and summary["tokens"] == 20 * 4 * 2 * 32 and summary["state_bytes"] > 0
    assert summary["corpus"]["name"] == "cc0-slice" and len(summary["corpus"]["content_hash"]) == 64
    assert summary["device"] == "cpu" and summary["device_name"].endswith(f", {torch.get_num_threads()} threads")
    config = json.loads((out / "config.json").read_text())
    assert (config["optimizer"], config["seed"], config["preset"]) == ("adamw", 42, "cpu-tiny")
    assert config["optim"]["lr"] == 1e-4 and config["model"]["vocab_size"] == 512
    rows = read_metrics(out / "metrics.jsonl")
    assert {"step", "loss", "lr", "tokens_per_s"} <= set(rows[1])
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 10, 20]


def test_sage_hybrid_trains_through_the_cli(tmp_path: Path, data_args: list[str],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    rc = main(["train", "--preset", "cpu-tiny", "--optimizer", "sage-hybrid", "--steps", "20", "--out", str(out),
               *data_args])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert math.isfinite(summary["val_loss"]) and summary["val_loss"] < math.log(512)
    assert summary["state_bytes_by_role"]["hidden"] == 0
    assert "embedding" in capsys.readouterr().err  # the partition table is printed at the start


@pytest.mark.parametrize("optimizer", EVERY_OPTIMIZER)
def test_stop_and_resume_gives_bitwise_the_same_losses(tmp_path: Path, data_args: list[str], optimizer: str) -> None:
    common = ["train", "--preset", "cpu-tiny", "--optimizer", optimizer, "--steps", "12",
              "--train.log_every_steps=1", "--eval.every_steps=4", "--output.checkpoint_every_steps=5", *data_args]
    assert main([*common, "--out", str(tmp_path / "whole")]) == 0
    assert main([*common, "--out", str(tmp_path / "parts"), "--stop-at", "6"]) == 0
    assert not (tmp_path / "parts" / "summary.json").exists()
    assert main([*common, "--out", str(tmp_path / "parts"), "--resume"]) == 0
    whole, parts = train_losses(tmp_path / "whole"), train_losses(tmp_path / "parts")
    assert [s for s, _ in whole] == list(range(1, 13))
    assert whole == parts  # float equality of every logged loss
    evals = [[(r["step"], r["val_loss"]) for r in read_metrics(tmp_path / d / "metrics.jsonl") if "val_loss" in r]
             for d in ("whole", "parts")]
    assert evals[0] == evals[1] and [s for s, _ in evals[0]] == [0, 4, 8, 12]
    # and the final parameters and optimizer state, bit for bit
    finals = [torch.load(latest_checkpoint(tmp_path / d), weights_only=False) for d in ("whole", "parts")]
    assert finals[0]["step"] == finals[1]["step"] == 12
    for key, tensor in finals[0]["model"].items():
        assert torch.equal(tensor, finals[1]["model"][key]), key
    assert _bitwise_equal(finals[0]["optimizer"]["state"], finals[1]["optimizer"]["state"])


def _bitwise_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_bitwise_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_bitwise_equal(x, y) for x, y in zip(a, b))
    return a == b


def test_config_errors_exit_2_with_one_line(tmp_path: Path, data_args: list[str],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    base = ["train", "--preset", "cpu-tiny", "--out", str(tmp_path / "x"), *data_args]
    assert main([*base, "--train.stpes=3"]) == 2
    assert "unknown config key 'train.stpes'" in one_line_error(capsys)
    assert main([*base, "--train.steps", "lots"]) == 2
    assert "--train.steps: expected an integer, got 'lots'" in one_line_error(capsys)
    assert main([*base, "--optimizer", "adamw", "--opt.betas=0.9"]) == 2
    assert "optimizer 'adamw' rejected its options" in one_line_error(capsys)
    assert main([*base, "--optimizer", "no-such-optimizer"]) == 2
    assert "unknown optimizer 'no-such-optimizer'" in one_line_error(capsys)
    assert main([*base, "--frobnicate"]) == 2
    assert "unrecognized argument '--frobnicate'" in one_line_error(capsys)
    (tmp_path / "cfg.json").write_text(json.dumps({"train": {"steps": True}}))
    assert main([*base, "--config", str(tmp_path / "cfg.json")]) == 2
    assert "train.steps: expected an integer, got True" in one_line_error(capsys)
    assert not (tmp_path / "x").exists()


def test_flags_win_over_the_config_file_which_wins_over_the_preset(tmp_path: Path, data_args: list[str]) -> None:
    (tmp_path / "cfg.toml").write_text('preset = "cpu-tiny"\nseed = 7\n[train]\nsteps = 4\nlog_every_steps = 2\n')
    out = tmp_path / "run"
    assert main(["train", "--config", str(tmp_path / "cfg.toml"), "--steps", "3", "--out", str(out),
                 "--opt.betas=[0.8, 0.9]", *data_args]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["preset"], config["seed"], config["train"]["steps"], config["train"]["log_every_steps"]) \
        == ("cpu-tiny", 7, 3, 2)
    assert config["optim"]["kwargs"] == {"betas": [0.8, 0.9]}


def test_corrupt_checkpoint_is_a_one_line_error_and_is_not_overwritten(
        tmp_path: Path, data_args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    common = ["train", "--preset", "cpu-tiny", "--steps", "8", "--out", str(out), *data_args]
    assert main([*common, "--stop-at", "4"]) == 0
    (ckpt_file,) = out.glob("ckpt-*.pt")
    ckpt_file.write_bytes(ckpt_file.read_bytes()[:1000])
    capsys.readouterr()
    assert main([*common, "--resume"]) == 1
    assert "is unreadable (truncated or corrupt" in one_line_error(capsys)
    assert main(common) == 1  # a fresh run must not write over the directory's checkpoints
    assert "already holds checkpoints" in one_line_error(capsys)
    assert len(ckpt_file.read_bytes()) == 1000


def test_memory_json_has_one_object_per_optimizer(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["memory", "--model", "llama-1.3b", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["optimizer"] for r in rows] == available_optimizers()
    by_name = {r["optimizer"]: r for r in rows}
    assert all(isinstance(r["state_bytes"], int) and sum(r["by_role"].values()) == r["state_bytes"] for r in rows
               if unavailable_reason(r["optimizer"]) is None)
    assert by_name["adamw"]["params"] == 1_339_082_752
    # AdamW keeps two fp32 moments per parameter (+ a 4-byte step per tensor)
    assert 8 * 1_339_082_752 <= by_name["adamw"]["state_bytes"] < 8 * 1_339_082_752 + 4096
    assert by_name["sage-hybrid"]["state_bytes"] < 0.1 * by_name["adamw"]["state_bytes"]
    assert main(["memory", "--model", "cpu-tiny"]) == 0
    assert "sage-hybrid" in capsys.readouterr().out


def test_memory_shows_a_baseline_whose_package_is_missing_as_not_available(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "adam_mini", None)  # import and find_spec both see it as not installed
    assert main(["memory", "--model", "cpu-tiny", "--json", "--optimizers", "adamw", "adam-mini"]) == 0
    adamw, missing = json.loads(capsys.readouterr().out)
    assert isinstance(adamw["state_bytes"], int)
    assert missing["state_bytes"] is None and missing["ratio_to_adamw"] is None
    assert missing["note"] == 'not available: needs the optional package adam-mini: pip install "sage-optim[baselines]"'
    assert main(["memory", "--model", "cpu-tiny", "--optimizers", "adamw", "adam-mini"]) == 0
    assert "adam-mini       not available: needs the optional package adam-mini" in capsys.readouterr().out


@pytest.mark.parametrize("tied", [False, True])
def test_meta_state_bytes_equal_a_real_optimizer_after_one_real_step(tied: bool) -> None:
    cfg = get_preset("cpu-tiny").model
    cfg.tie_word_embeddings = tied
    names = [n for n in available_optimizers() if unavailable_reason(n) is None]
    meta = state_bytes_table(build_meta_model(cfg, vocab_size=512, max_seq_len=32), names)
    torch.manual_seed(0)
    for row in meta:
        model = build_model(cfg, vocab_size=512, max_seq_len=32)
        opt = create_optimizer(row["optimizer"], model)
        model(input_ids=torch.randint(0, 512, (2, 8)), labels=torch.randint(0, 512, (2, 8))).loss.backward()
        opt.step()
        # note: the state dict's tensors, since APOLLO's live state holds its projection inside an object
        real = sum(v.numel() * v.element_size() for s in opt.state_dict()["state"].values() for v in s.values()
                   if isinstance(v, torch.Tensor))
        assert row["state_bytes"] == real, row["optimizer"]


def test_compare_skips_completed_runs_and_writes_a_table_and_plot(
        tmp_path: Path, data_args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    args = ["compare", "--preset", "cpu-tiny", "--optimizers", "adamw", "sage-hybrid", "--seeds", "2", "10",
            "--steps", "4", "--out", str(tmp_path), *data_args]
    assert main(args) == 0
    first = capsys.readouterr()
    assert "results.md" in first.out and "val_loss.png" in first.out
    table = (tmp_path / "results.md").read_text()
    assert "| adamw | 0.0001 |" in table and "| sage-hybrid | 0.002 |" in table and "±" in table
    assert (tmp_path / "val_loss.png").read_bytes()[:4] == b"\x89PNG"
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/summary.json")}
    assert len(mtimes) == 4
    assert main(args) == 0
    assert capsys.readouterr().err.count("is complete, skipping") == 4
    assert mtimes == {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/summary.json")}
    assert main(["plot", str(tmp_path)]) == 0  # redrawn from the directory: seeds in numeric order
    table = (tmp_path / "results.md").read_text()
    assert "| 2, 10 |" in table
    device = json.loads(next(tmp_path.glob("*/summary.json")).read_text())["device_name"]
    assert f"Measured on: {device}.\n" in table  # one machine ran all four
    older = tmp_path / "adamw-seed2" / "summary.json"  # a run from before summaries named their device
    older.write_text(json.dumps({k: v for k, v in json.loads(older.read_text()).items() if k != "device_name"}))
    assert main(["plot", str(tmp_path)]) == 0
    assert f"Measured on: {device} (adamw 10, sage-hybrid 2, sage-hybrid 10); not recorded (adamw 2).\n" \
        in (tmp_path / "results.md").read_text()

    # adamw's two seeds now ran on different machines: their timings are listed per seed, not averaged
    timed = {p.parent.name: json.loads(p.read_text()) for p in tmp_path.glob("adamw-seed*/summary.json")}
    speeds = " / ".join(f"{timed[f'adamw-seed{seed}']['tokens_per_s']:,.0f}" for seed in (2, 10))
    table = (tmp_path / "results.md").read_text()
    assert f" | {speeds} | 2, 10 |" in table and "per seed (in seed order) where the seeds ran on different" in table
    sage_speed = statistics.fmean(json.loads((tmp_path / f"sage-hybrid-seed{seed}" / "summary.json").read_text())[
        "tokens_per_s"] for seed in (2, 10))
    assert f" | {sage_speed:,.0f} | 2, 10 |" in table  # one machine: the mean
    # paired by seed against adamw (the default reference): each seed's difference, mean ± std over the two
    loss = {(p.parent.name): json.loads(p.read_text())["val_loss"] for p in tmp_path.glob("*/summary.json")}
    diffs = [loss[f"sage-hybrid-seed{seed}"] - loss[f"adamw-seed{seed}"] for seed in (2, 10)]
    wins = sum(d < 0 for d in diffs)
    assert f"| sage-hybrid | {statistics.fmean(diffs):+.4f} ± {statistics.stdev(diffs):.4f} | " in table
    assert f"| 2 | {wins} of 2 |" in table
    # the headline ranking: sorted by mean val ppl, the same paired difference, the step time of seed 2
    ranking = table[:table.index("Every optimizer's step time")]
    ppl = {name: statistics.fmean(json.loads((tmp_path / f"{name}-seed{seed}" / "summary.json").read_text())[
        "val_ppl"] for seed in (2, 10)) for name in ("adamw", "sage-hybrid")}
    ranked = [line.split(" | ")[0][2:] for line in ranking.splitlines()
              if line.startswith("| ") and not line.startswith("| optimizer")]
    assert ranked == sorted(ppl, key=ppl.__getitem__)
    assert f"| {statistics.fmean(diffs):+.3f} ± {statistics.stdev(diffs):.3f}, lower on {wins} of 2 |" in ranking
    seed2 = json.loads((tmp_path / "adamw-seed2" / "summary.json").read_text())
    assert "| s/step (seed 2) |" in ranking and "| — | " in ranking
    assert f" | {seed2['train_time_s'] / seed2['steps']:.3f} | 2, 10 |" in ranking
    assert main(["plot", str(tmp_path), "--reference", "sage-hybrid"]) == 0
    assert f"| adamw | {-statistics.fmean(diffs):+.4f} ± " in (tmp_path / "results.md").read_text()
    assert main(["plot", str(tmp_path), "--reference", "lion"]) == 2
    assert "--reference lion is not among the optimizers compared (adamw, sage-hybrid)" in one_line_error(capsys)
    assert main(["plot", str(tmp_path), "--target", "lion"]) == 2
    assert "--target lion is not among the optimizers compared (adamw, sage-hybrid)" in one_line_error(capsys)
    assert main(["plot", str(tmp_path), "--target", "sage-hybrid"]) == 0
    assert "| optimizer | steps to sage-hybrid's final val loss | speed-up |" in (tmp_path / "results.md").read_text()


def test_the_ranking_puts_diverged_runs_last_and_times_only_a_seed_every_optimizer_ran() -> None:
    from sage_optim.train.report import _ranking_table

    def run(seed: int, val_loss: float) -> dict:
        return {"seed": seed, "val_loss": val_loss, "val_ppl": math.exp(val_loss), "test_ppl": math.exp(val_loss),
                "lr": 1e-3, "state_bytes": 100, "train_time_s": 10.0, "steps": 5}

    table = _ranking_table({"diverged": [run(1, math.inf)], "adamw": [run(1, 4.0), run(2, 4.2)],
                            "other-seed": [run(3, 3.0)], "better": [run(1, 3.5), run(2, 3.9)]}, "adamw")
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| ") and "optimizer" not in line]
    assert [r[0][2:] for r in rows] == ["other-seed", "better", "adamw", "diverged"]
    assert "s/step" not in table  # no seed is common to all four: one seed's step time would compare nothing
    assert rows[0][4] == "no common seed" and rows[3][4] == "diverged" and rows[2][4] == "—"
    diffs = [-0.5, -0.3]
    assert rows[1][4] == f"{statistics.fmean(diffs):+.3f} ± {statistics.stdev(diffs):.3f}, lower on 2 of 2"


def test_steps_to_loss_interpolates_between_the_evaluations_around_the_first_crossing() -> None:
    from sage_optim.train.report import steps_to_loss

    curve = [(0, 9.0), (250, 5.0), (500, 4.0), (750, 4.6), (1000, 3.0)]
    assert steps_to_loss(curve, 4.5) == pytest.approx(375.0)  # halfway from 5.0 to 4.0
    assert steps_to_loss(curve, 4.0) == 500.0 and steps_to_loss(curve, 9.5) == 0.0
    assert steps_to_loss(curve, 3.5) == pytest.approx(750 + 250 * (4.6 - 3.5) / 1.6)  # the first crossing only
    assert steps_to_loss(curve, 2.0) is None
    assert steps_to_loss([(0, 9.0), (250, math.nan), (500, 4.0)], 4.5) == 500.0  # nothing to interpolate from


def test_the_steps_to_target_table_counts_each_seed_against_the_targets_final_loss(tmp_path: Path) -> None:
    from sage_optim.train.report import write_results

    experiment = {"preset": "cpu-tiny", "steps": 1000, "tokens": 4000, "device": "cpu", "precision": "fp32",
                  "corpus": {"name": "c", "content_hash": "0" * 64}, "lr": 1e-3, "state_bytes": 10,
                  "train_time_s": 100.0, "tokens_per_s": 40.0, "device_name": "one CPU"}

    def run(name: str, seed: int, curve: list[tuple[int, float]]) -> Path:
        run_dir = tmp_path / f"{name}-seed{seed}"
        run_dir.mkdir()
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "val_loss": v}) + "\n" for s, v in curve))
        final = curve[-1][1]
        (run_dir / "summary.json").write_text(json.dumps({**experiment, "optimizer": name, "seed": seed,
            "val_loss": final, "val_ppl": math.exp(final), "test_ppl": math.exp(final)}))
        return run_dir

    runs = {"slow": [run("slow", 1, [(0, 9.0), (500, 6.0), (1000, 5.0)]),
                     run("slow", 2, [(0, 9.0), (500, 6.0), (1000, 4.0)])],
            "fast": [run("fast", 1, [(0, 9.0), (500, 4.0), (1000, 3.0)]),
                     run("fast", 2, [(0, 9.0), (500, 5.0), (1000, 3.0)])],
            "stuck": [run("stuck", 1, [(0, 9.0), (500, 8.0), (1000, 7.0)])]}
    write_results(tmp_path, runs, target="slow")
    table = (tmp_path / "results.md").read_text()
    section = table[table.index("Steps to reach slow's final validation loss"):]
    assert "evaluations every 500 steps" in section
    rows = [line.split(" | ") for line in section.splitlines() if line.startswith("| ") and "optimizer" not in line]
    # fast reaches seed 1's target 5.0 at 400 (9 → 4 over steps 0-500) and seed 2's 4.0 at 750 (5 → 3 over 500-1000)
    steps, speedups = [400.0, 750.0], [1000 / 400, 1000 / 750]
    assert rows[0] == ["| fast", f"{statistics.fmean(steps):.0f} ± {statistics.stdev(steps):.0f}",
                       f"{statistics.fmean(speedups):.2f}× ± {statistics.stdev(speedups):.2f}×",
                       f"{statistics.fmean([40 * s for s in speedups]):.0f} ± "
                       f"{statistics.stdev([40 * s for s in speedups]):.0f}", "2 of 2 |"]
    assert rows[1][0] == "| slow" and rows[1][-1] == "2 of 2 |"
    assert rows[2] == ["| stuck", "not reached", "-", "-", "0 of 1 |"]
    # tokens/s from two machines: the speed-up stays, the machine-dependent effective throughput goes
    moved = tmp_path / "fast-seed2" / "summary.json"
    moved.write_text(json.dumps({**json.loads(moved.read_text()), "device_name": "another CPU"}))
    write_results(tmp_path, runs, target="slow")
    table = (tmp_path / "results.md").read_text()
    assert "| optimizer | steps to slow's final val loss | speed-up | reached on |" in table
    assert "left out because these runs' tokens/s come from different or unrecorded machines" in table
    with pytest.raises(ValueError, match="target 'lion' has no runs here .optimizers: slow, fast, stuck."):
        write_results(tmp_path, runs, target="lion")


def test_compare_adds_to_a_directory_only_runs_of_the_same_experiment(
        tmp_path: Path, data_args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    base = ["compare", "--preset", "cpu-tiny", "--seeds", "2", "--out", str(tmp_path)]
    assert main([*base, "--optimizers", "adamw", "--steps", "3", *data_args]) == 0
    capsys.readouterr()
    # `--data default` means the full mix once `data prepare` ran: another corpus than the runs there
    assert main([*base, "--optimizers", "sage-hybrid", "--steps", "3", "--data", "embedded",
                 *data_args[2:]]) == 2
    assert ("holds runs of another experiment: adamw-seed2 has corpus cc0-slice there, embedded-cc0 now; use "
            "another --out") in one_line_error(capsys)
    assert main([*base, "--optimizers", "sage-hybrid", "--steps", "4", *data_args]) == 2
    assert "adamw-seed2 has steps 3 there, 4 now, tokens 768 there, 1024 now" in one_line_error(capsys)
    assert main([*base, "--optimizers", "sage-hybrid", "--steps", "3", "--precision", "bf16", *data_args]) == 2
    assert "precision fp32 there, bf16 now; use another --out, or --precision fp32 as" in one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adamw-seed2", "ppl_vs_state.png", "results.md",
                                                          "val_loss.png"]
    # a later sitting adds an optimizer: the table covers every finished run in the directory
    assert main([*base, "--optimizers", "sage-hybrid", "--steps", "3", *data_args]) == 0
    table = (tmp_path / "results.md").read_text()
    assert "| adamw | 0.0001 |" in table and "| sage-hybrid | 0.002 |" in table
    # a run copied in from another corpus is refused by the table, not averaged in
    summary_path = tmp_path / "sage-hybrid-seed2" / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["corpus"]["content_hash"] = "f" * 64
    summary_path.write_text(json.dumps(summary))
    assert main(["plot", str(tmp_path)]) == 2
    error = one_line_error(capsys)
    assert f"{tmp_path} mixes runs of different experiments" in error and "corpus hash ffffffffffff" in error
    assert "sage-hybrid 2" in error and "move the odd runs to another directory" in error
    assert "| sage-hybrid |" in (tmp_path / "results.md").read_text()  # the last good table is kept


def test_compare_refuses_optimizers_missing_from_the_registry(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", "--optimizers", "adamw", "not-an-optimizer", "--out", str(tmp_path)]) == 2
    assert "not in the optimizer registry: not-an-optimizer" in one_line_error(capsys)
    assert not list(tmp_path.iterdir())


def test_compare_runs_an_ablation_by_name_and_refuses_it_with_optimizers(
        tmp_path: Path, data_args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", "--ablation", "bf16-momentum", "--optimizers", "adamw", "--out", str(tmp_path)]) == 2
    assert "give --optimizers or --ablation, not both" in one_line_error(capsys)
    assert main(["compare", "--preset", "cpu-tiny", "--ablation", "bf16-momentum", "--steps", "3",
                 "--out", str(tmp_path), *data_args]) == 0
    assert sorted(p.name for p in tmp_path.glob("*/summary.json") for p in [p.parent]) == [
        "sage-hybrid-bf16-seed42", "sage-hybrid-seed42"]
    assert json.loads((tmp_path / "sage-hybrid-bf16-seed42" / "config.json").read_text())["optimizer"] == \
        "sage-hybrid-bf16"


def test_help_bench_hook_and_module_entry_point(capsys: pytest.CaptureFixture[str]) -> None:
    for command in (["--help"], ["train", "--help"], ["compare", "--help"], ["memory", "--help"],
                    ["data", "prepare", "--help"]):
        assert main(command) == 0
    capsys.readouterr()
    assert main(["bench", "--help"]) == 0
    assert "x fused AdamW" in capsys.readouterr().out
    assert main(["bench", "--repeats", "0"]) == 2
    assert "--repeats must be ≥ 1" in capsys.readouterr().err
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    done = subprocess.run([sys.executable, "-m", "sage_optim", "train", "--train.steps=x"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == "sage-optim: error: --train.steps: expected an integer, got 'x'"


@pytest.mark.parametrize("command, code", [(["memory", "--model", "llama-60m", "--json"], 0),
                                           (["train", "--train.steps=x"], 2)])
def test_a_torchrun_rank_exits_with_its_code_and_all_of_its_output(command: list[str], code: int) -> None:
    """Under torchrun a rank that succeeded skips interpreter teardown (os._exit, see console_main):
    its piped, block-buffered stdout must still arrive whole; a failed rank keeps its exit code."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "WORLD_SIZE": "2"}
    env.pop("PYTHONUNBUFFERED", None)
    done = subprocess.run([sys.executable, "-m", "sage_optim", *command], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == code, done.stderr
    if code == 0:
        rows = json.loads(done.stdout)
        assert {row["optimizer"] for row in rows} >= {"adamw", "sage-hybrid"}


def test_sweep_picks_the_lowest_validation_loss_and_compare_uses_it(tmp_path, data_args):
    sweep_dir = tmp_path / "sweeps" / "lion"
    assert main(["sweep", "--preset", "cpu-tiny", "--optimizer", "lion", "--lrs", "1e-4", "3e-3", "--steps", "6",
                 "--out", str(sweep_dir), *data_args]) == 0
    result = json.loads((sweep_dir / "sweep.json").read_text())
    losses = {g["lr"]: g["val_loss"] for g in result["grid"]}
    assert set(losses) == {1e-4, 3e-3}
    assert result["best_lr"] == min(losses, key=losses.get)
    out = tmp_path / "cmp"
    assert main(["compare", "--preset", "cpu-tiny", "--optimizers", "lion", "--steps", "6",
                 "--out", str(out), "--tuned", str(tmp_path / "sweeps"), *data_args]) == 0
    summary = json.loads((out / "lion-seed42" / "summary.json").read_text())
    assert summary["lr"] == result["best_lr"]
    results = (out / "results.md").read_text()
    assert "| lion | " in results and "chosen by `sage-optim sweep`" in results
    assert f"| {result['best_lr']:.3g} |" in results  # the sweep's grid and choice are part of the results
    (out / "results.md").unlink()
    assert main(["plot", str(out)]) == 0
    assert (out / "results.md").exists() and (out / "val_loss.png").exists() and (out / "ppl_vs_state.png").exists()
    assert main(["compare", "--preset", "cpu-tiny", "--optimizers", "adamw", "--tuned", str(tmp_path / "none")]) == 2
    # extending the grid keeps the finished points (run again only for the new lr)
    assert main(["sweep", "--preset", "cpu-tiny", "--optimizer", "lion", "--lrs", "3e-2", "1e-1", "--steps", "6",
                 "--out", str(sweep_dir), *data_args]) == 0
    extended = json.loads((sweep_dir / "sweep.json").read_text())
    assert [g["lr"] for g in extended["grid"]] == [1e-4, 3e-3, 3e-2, 1e-1]
    assert {g["lr"]: g["val_loss"] for g in extended["grid"]}[1e-4] == losses[1e-4]


def test_sweep_of_another_option_runs_at_a_fixed_lr_and_compare_applies_its_best_value(tmp_path, data_args,
                                                                                         capsys):
    # ablation (a)'s question: an embedding rule's own lr (embed_lr), swept with the dense lr held fixed
    sweeps = tmp_path / "sweeps"
    out = sweeps / "hybrid-embed-adamw"
    common = ["--preset", "cpu-tiny", "--optimizer", "hybrid-embed-adamw", "--steps", "4", "--out", str(out),
              *data_args]
    assert main(["sweep", *common, "--param", "embed_lr", "--values", "1e-4", "3e-3"]) == 0
    result = json.loads((out / "sweep-embed_lr.json").read_text())
    assert result["param"] == "embed_lr" and result["lr"] == 2e-3  # the registry's lr, no lr sweep here
    losses = {g["value"]: g["val_loss"] for g in result["grid"]}
    assert set(losses) == {1e-4, 3e-3} and result["best"] == min(losses, key=losses.get)
    for g in result["grid"]:
        config = json.loads((out / g["run"] / "config.json").read_text())
        assert config["optim"]["kwargs"] == {"embed_lr": g["value"]} and config["optim"]["lr"] == 2e-3
    assert losses[1e-4] != losses[3e-3]  # the option reached the optimizer
    cmp = tmp_path / "cmp"
    assert main(["compare", "--preset", "cpu-tiny", "--optimizers", "hybrid-embed-adamw", "--steps", "4",
                 "--out", str(cmp), "--tuned", str(sweeps), *data_args]) == 0
    config = json.loads((cmp / "hybrid-embed-adamw-seed42" / "config.json").read_text())
    assert config["optim"]["kwargs"] == {"embed_lr": result["best"]} and config["optim"]["lr"] == 2e-3
    results = (cmp / "results.md").read_text()
    assert "| embed_lr (at lr 0.002) |" in results
    assert f"| hybrid-embed-adamw | 0.002, embed_lr {result['best']:g} |" in results  # the tuned option is shown
    capsys.readouterr()
    # an lr sweep that picks another lr makes the option's sweep stale: refused, with the fix
    (out / "sweep.json").write_text(json.dumps({"best_lr": 1e-3, "param": "lr", "seed": 42, "grid": []}))
    assert main(["compare", "--preset", "cpu-tiny", "--optimizers", "hybrid-embed-adamw", "--steps", "4",
                 "--out", str(tmp_path / "cmp2"), "--tuned", str(sweeps), *data_args]) == 2
    assert "embed_lr was swept at lr 0.002, but this run uses lr 0.001; sweep it again with --lr 0.001" in \
        one_line_error(capsys)
    assert not (tmp_path / "cmp2").exists()  # checked before any run
    for bad, message in [(["--param", "embed_lr"], "at least two positive values of embed_lr"),
                         (["--param", "embed_lr", "--lrs", "1e-3", "2e-3"], "--lrs sweeps the lr"),
                         (["--values", "1e-3", "2e-3"], "--values and --lr are for sweeping another option"),
                         (["--param", "embed_lr", "--values", "1e-3", "-1"], "at least two positive values")]:
        assert main(["sweep", *common, *bad]) == 2, bad
        assert message in one_line_error(capsys), bad


def test_an_lr_sweep_can_hold_an_option_fixed_and_compare_applies_both(tmp_path, data_args, capsys):
    # the SinkGD hybrid's dense lr swept with its AdamW part's lr (embed_lr) held at one value
    sweeps = tmp_path / "sweeps"
    out = sweeps / "sinkgd-hybrid"
    common = ["--preset", "cpu-tiny", "--optimizer", "sinkgd-hybrid", "--steps", "4", *data_args]
    assert main(["sweep", *common, "--lrs", "1e-5", "1e-4", "--out", str(out), "--opt.embed_lr=1e-3"]) == 0
    result = json.loads((out / "sweep.json").read_text())
    assert result["options"] == {"embed_lr": 1e-3} and [g["lr"] for g in result["grid"]] == [1e-5, 1e-4]
    for g in result["grid"]:
        config = json.loads((out / g["run"] / "config.json").read_text())
        assert config["optim"]["kwargs"] == {"embed_lr": 1e-3} and config["optim"]["lr"] == g["lr"]
    cmp = tmp_path / "cmp"
    assert main(["compare", *common, "--optimizers", "sinkgd-hybrid", "--out", str(cmp), "--tuned", str(sweeps)]) == 0
    config = json.loads((cmp / "sinkgd-hybrid-seed42" / "config.json").read_text())
    assert config["optim"]["kwargs"] == {"embed_lr": 1e-3} and config["optim"]["lr"] == result["best_lr"]
    results = (cmp / "results.md").read_text()
    assert "| lr (embed_lr=0.001 fixed) |" in results
    assert f"| sinkgd-hybrid | {result['best_lr']:g}, embed_lr 0.001 |" in results
    capsys.readouterr()
    # a finished point is reused only for the same run: another fixed value into the same --out is refused
    assert main(["sweep", *common, "--lrs", "1e-5", "1e-4", "--out", str(out), "--opt.embed_lr=3e-3"]) == 2
    assert "holds another run (options {'embed_lr': 0.001} there, {'embed_lr': 0.003} now)" in one_line_error(capsys)
    # and compare does not silently keep a run made at another lr (the sweep picked a new one since)
    (out / "sweep.json").write_text(json.dumps({**result, "best_lr": 3e-5}))
    assert main(["compare", *common, "--optimizers", "sinkgd-hybrid", "--out", str(cmp), "--tuned", str(sweeps)]) == 2
    assert f"holds another run (lr {result['best_lr']} there, 3e-05 now)" in one_line_error(capsys)
    for bad, message in [(["--lrs", "1e-5", "1e-4", "--opt.lr=1e-3"], "--opt.lr would fix what the sweep sets"),
                         (["--param", "embed_lr", "--values", "1e-3", "2e-3", "--opt.embed_lr=1e-3"],
                          "--opt.embed_lr would fix what the sweep sets")]:
        assert main(["sweep", *common, "--out", str(tmp_path / "bad"), *bad]) == 2, bad
        assert message in one_line_error(capsys), bad


def test_sweeps_reports_each_optimizers_best_lr_and_the_lr_range_it_tolerates(tmp_path, capsys):
    def write_sweep(name: str, losses: dict[float, float], default_lr: float) -> None:
        grid = []
        for lr, loss in losses.items():
            run = tmp_path / name / f"lr{lr:.3g}"
            run.mkdir(parents=True)
            (run / "summary.json").write_text(json.dumps({"steps": 300, "lr": lr, "val_loss": loss}))
            grid.append({"lr": lr, "val_loss": loss, "val_ppl": math.exp(loss), "run": run.name})
        (tmp_path / name / "sweep.json").write_text(json.dumps(
            {"optimizer": name, "seed": 42, "param": "lr", "grid": grid, "default_lr": default_lr}))

    # "narrow": a diverged point closes the tolerated range from above; "wide": the range reaches the grid's
    # low edge, so its width is only a lower bound
    write_sweep("narrow", {1e-4: 6.0, 3e-4: 5.5, 1e-3: 5.0, 3e-3: 5.05, 1e-2: float("inf")}, 1e-4)
    write_sweep("wide", {1e-4: 5.05, 3e-4: 5.0, 1e-3: 5.08, 3e-3: 5.2}, 3e-3)
    # an option (embed_lr) swept at a fixed lr is read the same way, in a table of its own
    option_grid = []
    for value, loss in {1e-3: 5.3, 1e-2: 4.9, 3e-2: 4.85, 1e-1: 5.1}.items():
        run = tmp_path / "wide" / f"embed_lr{value:.3g}"
        run.mkdir()
        (run / "summary.json").write_text(json.dumps({"steps": 300, "lr": 3e-4, "val_loss": loss}))
        option_grid.append({"value": value, "val_loss": loss, "run": run.name})
    (tmp_path / "wide" / "sweep-embed_lr.json").write_text(json.dumps(
        {"optimizer": "wide", "seed": 42, "param": "embed_lr", "lr": 3e-4, "grid": option_grid, "best": 3e-2}))
    assert main(["sweeps", str(tmp_path)]) == 0
    table = (tmp_path / "sweeps.md").read_text()
    assert "| wide | embed_lr (at lr 0.0003) | 300, 42 | 0.001 – 0.1 (4) | 0.03: 4.8500 | 0.01 – 0.03 | 3× |" \
        in table, table
    assert (tmp_path / "lr_sensitivity.png").stat().st_size > 0
    assert "| narrow | 300, 42 | 0.0001 – 0.01 (5) | 0.001: 5.0000 | 0.0001: 6.0000 (+1.0000) | 0.001 – 0.003 | 3× |" \
        in table, table
    assert "| wide | 300, 42 | 0.0001 – 0.003 (4) | 0.0003: 5.0000 | 0.003: 5.2000 (+0.2000) | 0.0001 – 0.001 " \
        "| ≥ 10× |" in table, table
    assert main(["sweeps", str(tmp_path), "--within", "0.3"]) == 0  # a looser tolerance widens both ranges
    table = (tmp_path / "sweeps.md").read_text()
    assert "| 0.001 – 0.003 | 3× |" in table and "| 0.0001 – 0.003 | ≥ 30× |" in table, table
    capsys.readouterr()
    assert main(["sweeps", str(tmp_path), "--within", "0"]) == 2
    assert "--within must be a positive number of nats" in one_line_error(capsys)
    assert main(["sweeps", str(tmp_path / "narrow" / "lr0.001")]) == 2
    assert "no <optimizer>/sweep.json or <optimizer>/sweep-<option>.json" in one_line_error(capsys)
    # a directory of option sweeps alone gets the option table, and no lr table or lr plot
    (tmp_path / "wide" / "sweep.json").unlink()
    (tmp_path / "narrow" / "sweep.json").unlink()
    (tmp_path / "lr_sensitivity.png").unlink()
    assert main(["sweeps", str(tmp_path)]) == 0
    table = (tmp_path / "sweeps.md").read_text()
    assert table.startswith("Other options") and "Learning-rate sensitivity" not in table, table
    assert "| wide | embed_lr (at lr 0.0003) | 300, 42 | 0.001 – 0.1 (4) | 0.03: 4.8500 |" in table, table
    assert not (tmp_path / "lr_sensitivity.png").exists()


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_a_nonfinite_loss_is_logged_and_never_reaches_the_weights(tmp_path, data_args, monkeypatch, capsys, policy):
    """A NaN loss at step 4: "stop" saves the last good state and exits 1; "skip" drops that batch."""
    import sage_optim.train.loop as loop

    real_loss = loop._lm_loss
    calls = {"n": 0}

    def poisoned(model, x, y):
        loss = real_loss(model, x, y)
        if not model.training:  # evaluation batches are not counted
            return loss
        calls["n"] += 1
        return loss * float("nan") if calls["n"] == 4 else loss  # the 4th micro-batch (step 4 with accum 1)

    monkeypatch.setattr(loop, "_lm_loss", poisoned)
    out = tmp_path / policy
    code = main(["train", "--preset", "cpu-tiny", "--optimizer", "adamw", "--steps", "6", "--out", str(out),
                 "--train.grad_accum_steps=1", "--train.log_every_steps=1", f"--train.nonfinite_loss={policy}",
                 *data_args])
    rows = read_metrics(out / "metrics.jsonl")
    assert {"step": 4, "nonfinite_loss": True, "batches": [3, 3]} in rows
    if policy == "stop":
        assert code == 1 and "non-finite training loss at step 4" in one_line_error(capsys)
        checkpoint = torch.load(latest_checkpoint(out), weights_only=False)
        assert checkpoint["step"] == 3
        assert all(torch.isfinite(t).all() for t in checkpoint["model"].values())
    else:
        assert code == 0
        summary = json.loads((out / "summary.json").read_text())
        assert math.isfinite(summary["val_loss"])


def test_a_loss_spike_is_logged_with_its_step_and_micro_batches(tmp_path, data_args, monkeypatch):
    import sage_optim.train.loop as loop

    real_loss = loop._lm_loss
    calls = {"n": 0}

    def spiky(model, x, y):
        loss = real_loss(model, x, y)
        if not model.training:
            return loss
        calls["n"] += 1
        return loss * 10 if calls["n"] == 15 else loss  # step 15 with one micro-batch per step

    monkeypatch.setattr(loop, "_lm_loss", spiky)
    out = tmp_path / "run"
    assert main(["train", "--preset", "cpu-tiny", "--optimizer", "sage-hybrid", "--steps", "16", "--out", str(out),
                 "--train.grad_accum_steps=1", *data_args]) == 0
    spikes = [r for r in read_metrics(out / "metrics.jsonl") if "loss_spike" in r]
    assert [(r["step"], r["batches"]) for r in spikes] == [(15, [14, 14])]
    assert spikes[0]["loss_spike"] > 3 * spikes[0]["loss_average"]
    assert main(["train", "--preset", "cpu-tiny", "--out", str(tmp_path / "x"), "--train.spike_factor=0.5",
                 *data_args]) == 2
