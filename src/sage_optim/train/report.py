"""What ``compare``, ``plot`` and ``sweeps`` write from finished runs: the results tables (per optimizer and
paired by seed), the sweep tables, and the plots. Reads only the committed ``summary.json`` / ``config.json`` /
``metrics.jsonl`` / ``sweep*.json`` files, so everything here redraws without retraining.
"""
from __future__ import annotations

import contextlib
import json
import math
import statistics
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from ..memory import human_bytes

__all__ = ["MixedRunsError", "experiment", "write_results", "steps_to_loss", "option_sweeps", "fixed_options_text", "lr_sensitivity_table", "option_sweeps_table",
           "plot_lr_sensitivity"]


class MixedRunsError(ValueError):
    """The runs given to one results table trained different experiments (corpus, steps, precision, ...)."""


#: The paper's Figure 2 counts each optimizer's steps to Lion-hybrid's final perplexity.
PAPER_STEPS_TARGET = "lion-hybrid"


def write_results(out: Path, runs: dict[str, list[Path]], tuned_dir: Optional[str] = None,
                   reference: Optional[str] = None, target: Optional[str] = None) -> None:
    summaries = {name: [_summary_with_options(d) for d in dirs] for name, dirs in runs.items()}
    _check_one_experiment(out, summaries)
    for role, name in (("reference", reference), ("target", target)):
        if name is not None and name not in runs:
            raise ValueError(f"{role} {name!r} has no runs here (optimizers: {', '.join(runs)}); pick one of them")
    reference = reference or ("adamw" if "adamw" in runs else None)
    target = target or (PAPER_STEPS_TARGET if PAPER_STEPS_TARGET in runs else reference)
    # note: with a ranking above it, the per-optimizer table needs a caption saying what it adds (timing)
    ranking = (_ranking_table(summaries, reference) + "\nEvery optimizer's step time and throughput (each seed's "
               "where the seeds ran on different machines):\n\n") if reference else ""
    table = (ranking + _results_table(summaries) + (_paired_table(summaries, reference) if reference else "")
             + (_steps_to_target_table(runs, summaries, target) if target else "")
             + (_sweeps_table(tuned_dir, list(runs)) if tuned_dir else ""))
    (out / "results.md").write_text(table, encoding="utf-8")
    plots = [_plot_val_loss(runs, out / "val_loss.png"), _plot_ppl_vs_state(summaries, out / "ppl_vs_state.png")]
    print(table, end="")
    print(f"\nresults: {out / 'results.md'}\nplots: {', '.join(str(p) for p in plots)}")


def experiment(summary: dict[str, Any]) -> dict[str, Any]:
    """What must match for two runs' numbers to sit in one table (the footer states it once for all rows), read
    from a run's summary.json."""
    corpus = summary.get("corpus", {})
    return {"preset": summary.get("preset"), "steps": summary.get("steps"), "tokens": summary.get("tokens"),
            "corpus": corpus.get("name"), "corpus hash": str(corpus.get("content_hash", ""))[:12],
            "device": str(summary.get("device", "")).split(":")[0], "precision": summary.get("precision")}


def _check_one_experiment(out: Path, summaries: dict[str, list[dict[str, Any]]]) -> None:
    groups: dict[tuple[tuple[str, Any], ...], list[str]] = {}
    for name, rows in summaries.items():
        for r in rows:
            groups.setdefault(tuple(experiment(r).items()), []).append(f"{name} {r['seed']}")
    if len(groups) > 1:
        described = "; ".join(f"{', '.join(f'{field} {value}' for field, value in key)}: {', '.join(names)}"
                              for key, names in groups.items())
        raise MixedRunsError(f"{out} mixes runs of different experiments, which one table cannot compare "
                             f"({described}); move the odd runs to another directory")


def _summary_with_options(run_dir: Path) -> dict[str, Any]:
    """A run's summary.json plus the optimizer options it ran with (config.json), which summary.json lacks:
    a tuned embed_lr belongs in the results table next to the lr."""
    summary = json.loads((run_dir / "summary.json").read_text())
    config_path = run_dir / "config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    return {**summary, "options": dict(config.get("optim", {}).get("kwargs", {}))}


def _format_option(value: Any) -> str:
    """An optimizer option as every table prints it: floats to three significant digits (0.000632)."""
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _mean_std(values: list[float], digits: int = 2, *, signed: bool = False, unit: str = "") -> str:
    if any(math.isinf(v) or math.isnan(v) for v in values):
        return "diverged" if values else "-"
    mean = f"{statistics.fmean(values):{'+' if signed else ''}.{digits}f}{unit}"
    return f"{mean} ± {statistics.stdev(values):.{digits}f}{unit}" if len(values) > 1 else mean


_PER_SEED_TIMING = "; s/step and tokens/s per seed (in seed order) where the seeds ran on different machines"


def _results_table(summaries: dict[str, list[dict[str, Any]]]) -> str:
    """Markdown: one row per optimizer, ppl mean ± sample std over seeds."""
    lines = ["| optimizer | lr (and options) | val ppl | test ppl | state bytes | s/step | tokens/s | seeds |",
             "|---|---|---|---|---|---|---|---|"]
    mixed = False
    for name, rows in summaries.items():
        step_times = [_seconds_per_step(r) for r in rows]
        speeds = [r["tokens_per_s"] for r in rows]
        if len({r.get("device_name") for r in rows}) > 1:  # a mean over two machines measures neither
            mixed = True
            timing = f"{' / '.join(f'{t:.3f}' for t in step_times)} | {' / '.join(f'{v:,.0f}' for v in speeds)}"
        else:
            timing = f"{statistics.fmean(step_times):.3f} | {statistics.fmean(speeds):,.0f}"
        lines.append(
            f"| {name} | {_lr_and_options(rows[0])} "
            f"| {_mean_std([r['val_ppl'] for r in rows])} "
            f"| {_mean_std([r['test_ppl'] for r in rows])} | {human_bytes(rows[0]['state_bytes'])} "
            f"| {timing} | {', '.join(str(r['seed']) for r in rows)} |")
    first = next(iter(summaries.values()))[0]
    footer = (f"\n{first['preset']}, {first['steps']} steps, {first['tokens']:,} tokens, corpus "
              f"{first['corpus']['name']} ({first['corpus']['content_hash'][:12]}), {first['device']} "
              f"{first['precision']}. Perplexities: mean ± sample std over seeds"
              f"{_PER_SEED_TIMING if mixed else ''}.\n")
    return "\n".join(lines) + "\n" + footer + _devices_line(summaries)


def _seconds_per_step(summary: dict[str, Any]) -> float:
    """A run's whole training step (forward, backward, optimizer) in seconds, from its summary.json."""
    return summary["train_time_s"] / max(summary["steps"], 1)


def _paired_differences(runs: list[dict[str, Any]], reference_runs: list[dict[str, Any]]) -> list[float]:
    """Final val loss minus the reference's on the same seed, for each seed both ran (in ``runs``' order)."""
    baseline = {r["seed"]: r["val_loss"] for r in reference_runs}
    return [r["val_loss"] - baseline[r["seed"]] for r in runs if r["seed"] in baseline]


def _ranking_table(summaries: dict[str, list[dict[str, Any]]], reference: str) -> str:
    """Markdown: the headline table, one row per optimizer sorted by mean val ppl (diverged last), with the
    difference from the reference paired by seed and the step time of one seed every optimizer ran.

    Step times compare only between runs of one machine; the seed they come from is one seed, not a mean, so
    that a table built over several sittings still has a column whose runs mostly shared a machine."""
    common = set.intersection(*({r["seed"] for r in rows} for rows in summaries.values()))
    timing_seed = min(common) if common else None

    def mean_ppl(rows: list[dict[str, Any]]) -> float:
        ppl = [r["val_ppl"] for r in rows]
        return statistics.fmean(ppl) if all(math.isfinite(v) for v in ppl) else math.inf

    lines = [f"| optimizer | lr (and options) | val ppl | test ppl | val loss − {reference}'s (paired) "
             f"| state bytes |{f' s/step (seed {timing_seed}) |' if timing_seed is not None else ''} seeds |",
             "|---|---|---|---|---|---|" + ("---|" if timing_seed is not None else "") + "---|"]
    for name, rows in sorted(summaries.items(), key=lambda item: mean_ppl(item[1])):
        diffs = _paired_differences(rows, summaries[reference])
        if name == reference:
            paired = "—"
        elif not diffs:
            paired = "no common seed"
        elif not all(math.isfinite(d) for d in diffs):
            paired = "diverged"
        else:
            paired = (f"{_mean_std(diffs, 3, signed=True)}, lower on {sum(d < 0 for d in diffs)} "
                      f"of {len(diffs)}")
        timing = ""
        if timing_seed is not None:
            timing = f" {_seconds_per_step(next(r for r in rows if r['seed'] == timing_seed)):.3f} |"
        lines.append(f"| {name} | {_lr_and_options(rows[0])} | {_mean_std([r['val_ppl'] for r in rows])} "
                     f"| {_mean_std([r['test_ppl'] for r in rows])} | {paired} "
                     f"| {human_bytes(rows[0]['state_bytes'])} |{timing} {', '.join(str(r['seed']) for r in rows)} |")
    return (f"Ranking by mean final validation perplexity (mean ± sample std over seeds; the difference from "
            f"{reference} is paired by seed):\n\n" + "\n".join(lines) + "\n")


def _lr_and_options(summary: dict[str, Any]) -> str:
    """'0.001' or '0.000632, embed_lr 0.0001': the lr and the optimizer options a run was given."""
    return f"{summary['lr']:g}" + "".join(f", {key} {_format_option(v)}"
                                          for key, v in sorted(summary.get("options", {}).items()))


def _paired_table(summaries: dict[str, list[dict[str, Any]]], reference: str) -> str:
    """Markdown: each optimizer's final val loss minus the reference's on the same seed.

    A seed fixes initialisation and data order, so most of a run's seed-to-seed spread is shared by every
    optimizer on that seed; the paired difference is the honest error bar for "A beats B" (a difference
    smaller than the unpaired stds can still hold on every seed, and the other way round)."""
    rows = []
    for name, runs in summaries.items():
        diffs = _paired_differences(runs, summaries[reference])
        if name == reference or not diffs:
            continue
        if not all(math.isfinite(d) for d in diffs):
            rows.append((math.inf, f"| {name} | diverged | diverged | {len(diffs)} | - |"))
            continue
        ppl_change = [100 * math.expm1(d) for d in diffs]
        rows.append((statistics.fmean(diffs),
                     f"| {name} | {_mean_std(diffs, 4, signed=True)} "
                     f"| {_mean_std(ppl_change, 1, signed=True, unit='%')} "
                     f"| {len(diffs)} | {sum(d < 0 for d in diffs)} of {len(diffs)} |"))
    if not rows:
        return ""
    lines = [f"\nPaired by seed against {reference} (same initialisation and data order; negative: better than "
             f"{reference}; mean ± sample std over the seeds both ran):\n",
             f"| optimizer | val loss − {reference}'s | val ppl vs {reference}'s | seeds | lower on |",
             "|---|---|---|---|---|"]
    lines += [row for _, row in sorted(rows, key=lambda item: item[0])]
    return "\n".join(lines) + "\n"


def steps_to_loss(curve: Sequence[tuple[int, float]], target: float) -> Optional[float]:
    """The first step at which a validation-loss curve ``[(step, val_loss), ...]`` reaches ``target``: linear
    between the evaluation before the crossing and the one at or below it (the exact step lies between them);
    None if the curve never gets there."""
    before: Optional[tuple[int, float]] = None
    for step, loss in sorted(curve):
        if loss <= target:
            if before is None or not math.isfinite(before[1]) or before[1] == loss:
                return float(step)
            return before[0] + (step - before[0]) * (before[1] - target) / (before[1] - loss)
        before = (step, loss)
    return None


def _val_curve(run_dir: Path) -> list[tuple[int, float]]:
    """A run's validation loss at every evaluation, from its metrics.jsonl."""
    from .metrics import read_metrics

    return [(row["step"], row["val_loss"]) for row in read_metrics(run_dir / "metrics.jsonl") if "val_loss" in row]


def _steps_to_target_table(runs: dict[str, list[Path]], summaries: dict[str, list[dict[str, Any]]],
                           target: str) -> str:
    """Markdown: each optimizer's steps to the target optimizer's final val loss on the same seed, the paper's
    Figure 2 measure of claim 5 (SAGE-hybrid's steps are slower, but it needs fewer of them).

    The speed-up (run length / steps to the target) does not depend on the machine; the paper's "effective
    tokens/s" (raw tokens/s × speed-up) does, so it is printed only when every run names the same machine."""
    machines = {r.get("device_name") for rows in summaries.values() for r in rows}
    one_machine = len(machines) == 1 and None not in machines
    final = {r["seed"]: r["val_loss"] for r in summaries[target]}
    rows = []
    for name, dirs in runs.items():
        pairs = [(d, r) for d, r in zip(dirs, summaries[name]) if r["seed"] in final]
        if not pairs:
            continue
        crossings = [(steps_to_loss(_val_curve(d), final[r["seed"]]), r) for d, r in pairs]
        reached = [(max(step, 1.0), r) for step, r in crossings if step is not None]
        speedups = [r["steps"] / step for step, r in reached]
        cells = ["not reached", "-"]
        if reached:
            cells = [_mean_std([step for step, _ in reached], 0), _mean_std(speedups, 2, unit="×")]
        if one_machine:
            cells.append(_mean_std([r["tokens_per_s"] * r["steps"] / step for step, r in reached], 0)
                         if reached else "-")
        rows.append((-statistics.fmean(speedups) if speedups else math.inf,
                     f"| {name} | {' | '.join(cells)} | {len(reached)} of {len(pairs)} |"))
    curves = [_val_curve(d) for d in runs[target]]
    spacing = sorted({later[0] - earlier[0] for curve in curves for earlier, later in zip(curve, curve[1:])})
    effective = ("; effective tokens/s: the run's tokens/s × its speed-up (the paper's \"effective throughput\")"
                 if one_machine else "; the paper's effective tokens/s (tokens/s × speed-up) is left out because "
                 "these runs' tokens/s come from different or unrecorded machines")
    lines = [f"\nSteps to reach {target}'s final validation loss on the same seed (the paper's Figure 2 counts steps "
             f"to lion-hybrid's): the first evaluation at or below it, interpolated linearly from the one before "
             f"(evaluations every {' or '.join(str(s) for s in spacing) or '?'} steps); speed-up: the run's length "
             f"over those steps{effective}. Each run follows its own warmup and cosine over its whole length, so "
             f"an early crossing happened at a higher lr than a run stopped there would have had. Mean ± sample "
             f"std over the seeds that got there:\n",
             f"| optimizer | steps to {target}'s final val loss | speed-up |"
             + (" effective tokens/s |" if one_machine else "") + " reached on |",
             "|---|---|---|" + ("---|" if one_machine else "") + "---|"]
    lines += [row for _, row in sorted(rows, key=lambda item: item[0])]
    return "\n".join(lines) + "\n"


def _devices_line(summaries: dict[str, list[dict[str, Any]]]) -> str:
    """Which machine ran which runs: s/step and tokens/s compare only between runs of one machine."""
    by_device: dict[str, list[str]] = {}
    for name, rows in summaries.items():
        for r in rows:
            by_device.setdefault(r.get("device_name", "not recorded"), []).append(f"{name} {r['seed']}")
    if len(by_device) == 1:
        return f"Measured on: {next(iter(by_device))}.\n"
    ordered = sorted(by_device.items(), key=lambda item: item[0] == "not recorded")  # stable: first seen first
    return "Measured on: " + "; ".join(f"{device} ({', '.join(runs)})" for device, runs in ordered) + ".\n"


def _plot_val_loss(runs: dict[str, list[Path]], path: Path) -> Path:
    with _figure(path, xlabel="step", ylabel="validation loss (mean over seeds; band: min-max)") as ax:
        for name, dirs in runs.items():
            by_step: dict[int, list[float]] = {}
            for d in dirs:
                for step, loss in _val_curve(d):
                    by_step.setdefault(step, []).append(loss)
            steps = sorted(by_step)
            line, = ax.plot(steps, [statistics.fmean(by_step[s]) for s in steps], marker=".", label=name)
            if len(dirs) > 1:  # the band spans the seeds' lowest and highest loss at each evaluation
                ax.fill_between(steps, [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps],
                                color=line.get_color(), alpha=0.2, linewidth=0)
    return path


def _plot_ppl_vs_state(summaries: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """Final validation perplexity (mean, error bar: sample std over seeds) against optimizer-state bytes."""
    with _figure(path, xlabel="optimizer state (bytes, log scale)", ylabel="final validation perplexity",
                 log_x=True, legend=False) as ax:
        for name, rows in summaries.items():
            if rows[0].get("state_bytes") is None:
                continue
            ppl = [r["val_ppl"] for r in rows]
            spread = statistics.stdev(ppl) if len(ppl) > 1 else 0.0
            ax.errorbar(rows[0]["state_bytes"], statistics.fmean(ppl), yerr=spread, fmt="o", capsize=3, label=name)
            ax.annotate(name, (rows[0]["state_bytes"], statistics.fmean(ppl)), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
    return path


def option_sweeps(tuned_dir: str, name: str) -> list[Path]:
    """DIR/<name>/sweep-<option>.json: sweeps of an optimizer option other than lr (e.g. embed_lr)."""
    return sorted((Path(tuned_dir) / name).glob("sweep-*.json"))


def _sweeps_table(tuned_dir: str, names: list[str]) -> str:
    """Markdown: every value each optimizer's sweeps tried (lr, and any other option), its val loss, and the
    one chosen."""
    lines = ["", f"Learning rates (and other swept options): chosen by `sage-optim sweep` (best final validation "
             f"loss; {tuned_dir}):", "",
             "| optimizer | sweep (steps, seed) | swept | value: val loss | chosen |", "|---|---|---|---|---|"]
    for name in names:
        paths = [p for p in [Path(tuned_dir) / name / "sweep.json"] if p.exists()] + option_sweeps(tuned_dir, name)
        if not paths:
            lines.append(f"| {name} | no sweep | | | default |")
        for path in paths:
            sweep = json.loads(path.read_text())
            param = sweep.get("param", "lr")
            steps = _sweep_steps(path, sweep)
            grid = ", ".join(f"{g['value'] if 'value' in g else g['lr']:.3g}: {g['val_loss']:.4f}"
                             for g in sweep["grid"])
            label = ("lr" if param == "lr" else f"{param} (at lr {sweep['lr']:.3g})") \
                + fixed_options_text(sweep.get("options", {}))
            best = sweep["best_lr"] if param == "lr" else sweep["best"]
            lines.append(f"| {name} | {steps}, {sweep['seed']} | {label} | {grid} | {best:.3g} |")
    return "\n".join(lines) + "\n"


def _lr_basin(grid: Sequence[dict[str, Any]], within: float) -> tuple[int, int, int]:
    """Indices (low, best, high) of an lr-sorted sweep grid: its best point and the contiguous stretch around
    it whose final validation loss is within ``within`` nats of the best; a diverged point ends the stretch."""
    finite = [i for i, g in enumerate(grid) if math.isfinite(g["val_loss"])]
    if not finite:
        raise ValueError("every point of the sweep diverged")
    best = min(finite, key=lambda i: grid[i]["val_loss"])
    limit = grid[best]["val_loss"] + within

    def tolerated(i: int) -> bool:
        return 0 <= i < len(grid) and math.isfinite(grid[i]["val_loss"]) and grid[i]["val_loss"] <= limit

    low, high = best, best
    while tolerated(low - 1):
        low -= 1
    while tolerated(high + 1):
        high += 1
    return low, best, high


def fixed_options_text(options: dict[str, Any]) -> str:
    """' (embed_lr=0.001 fixed)' for the options a sweep held fixed; '' when none."""
    if not options:
        return ""
    return " (" + ", ".join(f"{k}={_format_option(v)}" for k, v in options.items()) + " fixed)"


def _sweep_steps(path: Path, sweep: dict[str, Any]) -> int:
    return int(json.loads((path.parent / sweep["grid"][0]["run"] / "summary.json").read_text())["steps"])


def _basin_cells(grid: Sequence[dict[str, Any]], key: str, within: float) -> tuple[dict[str, Any], dict[str, str]]:
    """The best point of a sweep grid sorted by ``key`` ("lr", or "value" for an option sweep) and the table
    cells both sensitivity tables share: values tried, best (marked at an edge), the tolerated range and its
    width (a lower bound when the range reaches the grid's edge)."""
    low, best_index, high = _lr_basin(grid, within)
    best = grid[best_index]
    edge = " (edge)" if best_index in (0, len(grid) - 1) else ""
    open_end = low == 0 or high == len(grid) - 1  # the tolerated range may go on past the grid
    return best, {"tried": f"{grid[0][key]:.3g} – {grid[-1][key]:.3g} ({len(grid)})",
                  "best": f"{best[key]:.3g}: {best['val_loss']:.4f}{edge}",
                  "range": f"{grid[low][key]:.3g} – {grid[high][key]:.3g}",
                  "width": f"{'≥ ' if open_end else ''}{grid[high][key] / grid[low][key]:.3g}×"}


def lr_sensitivity_table(root: Path, sweeps: dict[str, dict[str, Any]], within: float) -> str:
    """Markdown: per optimizer, the best lr, the loss at the registry (paper) lr, and how wide a range of lrs
    stays within ``within`` nats of the best (a range that reaches the grid's edge is a lower bound)."""
    lines = [f"Learning-rate sensitivity ({root}; final validation loss of one seed per lr):", "",
             f"| optimizer | steps, seed | lrs tried | best lr: val loss | registry lr: val loss | "
             f"lrs within {within:g} nats of best | width |", "|---|---|---|---|---|---|---|"]
    for name, sweep in sweeps.items():
        grid = sweep["grid"]
        best, cells = _basin_cells(grid, "lr", within)
        default = sweep.get("default_lr")
        at_default = next((g for g in grid if default is not None and math.isclose(g["lr"], default, rel_tol=1e-6)),
                          None)
        paper = ("not in grid" if at_default is None else
                 f"{default:.3g}: {at_default['val_loss']:.4f} (+{at_default['val_loss'] - best['val_loss']:.4f})")
        lines.append(f"| {name}{fixed_options_text(sweep.get('options', {}))} "
                     f"| {_sweep_steps(root / name / 'sweep.json', sweep)}, {sweep['seed']} "
                     f"| {cells['tried']} | {cells['best']} | {paper} | {cells['range']} | {cells['width']} |")
    return "\n".join(lines) + "\n"


def option_sweeps_table(root: Path, within: float) -> str:
    """Markdown: every DIR/<optimizer>/sweep-<option>.json (an option such as embed_lr swept at a fixed lr), with
    the same reading as the lr table: best value, and the contiguous values within ``within`` nats of it."""
    lines = []
    for path in sorted(root.glob("*/sweep-*.json")):
        sweep = json.loads(path.read_text())
        _, cells = _basin_cells(sweep["grid"], "value", within)
        lines.append(f"| {path.parent.name}{fixed_options_text(sweep.get('options', {}))} "
                     f"| {sweep['param']} (at lr {sweep['lr']:.3g}) | {_sweep_steps(path, sweep)}, {sweep['seed']} "
                     f"| {cells['tried']} | {cells['best']} | {cells['range']} | {cells['width']} |")
    if not lines:
        return ""
    return "\n".join(["", "Other options, each swept at a fixed lr (`sweep --param NAME`):", "",
                      f"| optimizer | option | steps, seed | values tried | best value: val loss "
                      f"| values within {within:g} nats of best | width |", "|---|---|---|---|---|---|---|",
                      *lines]) + "\n"


def plot_lr_sensitivity(sweeps: dict[str, dict[str, Any]], path: Path) -> Path:
    """Final validation loss against lr, one line per optimizer; the chosen lr ringed, diverged points left out."""
    with _figure(path, xlabel="peak learning rate (log scale)", ylabel="final validation loss (one seed; ring: best)",
                 log_x=True) as ax:
        for name, sweep in sweeps.items():
            grid = [g for g in sweep["grid"] if math.isfinite(g["val_loss"])]
            line, = ax.plot([g["lr"] for g in grid], [g["val_loss"] for g in grid], marker="o",
                            label=name + fixed_options_text(sweep.get("options", {})))
            best = min(grid, key=lambda g: g["val_loss"])
            ax.plot([best["lr"]], [best["val_loss"]], marker="o", markersize=12, fillstyle="none",
                    color=line.get_color())
    return path


@contextlib.contextmanager
def _figure(path: Path, *, xlabel: str, ylabel: str, log_x: bool = False, legend: bool = True) -> Iterator[Any]:
    """A headless matplotlib axes, labelled and saved to ``path`` (120 dpi) when the block ends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    try:
        yield ax
        if log_x:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if legend:
            ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
