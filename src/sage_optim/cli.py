"""``sage-optim``: train, compare optimizers, count optimizer-state memory, prepare data, benchmark.

    sage-optim train --preset cpu-tiny --optimizer sage-hybrid --steps 20 --out runs/tiny
    sage-optim compare --preset cpu-demo --optimizers adamw sage-hybrid --seeds 42 88
    sage-optim memory --model llama-1.3b --json
    sage-optim data prepare

``train`` and ``compare`` also take typed config overrides ``--section.key=value`` (sections: model,
data, optim, train, eval, output; see ``sage_optim.train.config``) and, for ``train``, optimizer
keyword arguments ``--opt.KEY=VALUE``. Errors in what the user typed are one line on stderr and exit
code 2; a run that fails (bad checkpoint, data, diverged optimizer) exits with 1.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import json
import math
import os
import re
import statistics
import sys
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

__all__ = ["main", "state_bytes_table"]

PROG = "sage-optim"
COMPARE_DEFAULT_OPTIMIZERS = ("adamw", "lion", "sinkgd-hybrid", "sage-hybrid")
SWEEP_DEFAULT_FACTORS = (0.1, 0.316, 1.0, 3.16, 10.0)


class UsageError(ValueError):
    """Something the user typed is wrong (exit code 2)."""


def _err(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# parser


def _build_parser() -> argparse.ArgumentParser:
    from .train.presets import preset_names

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    overrides_help = ("Typed config overrides --section.key=value (model, data, optim, train, eval, output) "
                      "may follow; they win over --config.")

    p = sub.add_parser("train", help="train one model with one optimizer",
                       description="Train a Llama model from a preset. " + overrides_help
                       + " Optimizer keyword arguments: --opt.KEY=VALUE (e.g. --opt.state_dtype=bfloat16).")
    p.add_argument("--preset", choices=preset_names(), help="base config (default: the config file's, else cpu-demo)")
    p.add_argument("--optimizer", help="a registry name (see `sage-optim memory --model cpu-tiny`)")
    p.add_argument("--steps", type=int, help="optimizer steps; the schedule spans them")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the optimizer's paper value)")
    p.add_argument("--seed", type=int)
    p.add_argument("--out", help="output directory (default: runs/<preset>/<optimizer>-seed<seed>)")
    p.add_argument("--data", help="corpus: default, embedded, full, or a path (.txt, dir, .jsonl(.gz), .bin)")
    p.add_argument("--precision", choices=["fp32", "bf16", "auto"])
    p.add_argument("--stop-at", type=int, metavar="K", help="save a checkpoint and exit after step K")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--config", metavar="FILE", help="a .json or .toml config file (applied over the preset)")
    par = p.add_mutually_exclusive_group()
    par.add_argument("--fsdp", action="store_const", const="fsdp", dest="parallel",
                     help="under torchrun: shard the model with FSDP2 (train.parallel=fsdp)")
    par.add_argument("--ddp", action="store_const", const="ddp", dest="parallel",
                     help="under torchrun: DistributedDataParallel (train.parallel=ddp)")

    reference_help = ("also tabulate each optimizer's final val loss minus NAME's on the same seed (paired "
                      "differences, mean ± std over shared seeds; default: adamw when it was run)")
    p = sub.add_parser("compare", help="train several optimizers x seeds and tabulate the results",
                       description="Run every optimizer x seed in its own subdirectory of --out (runs with a "
                       "summary.json are skipped, stopped ones resumed), then write results.md and "
                       "val_loss.png. " + overrides_help)
    p.add_argument("--preset", choices=preset_names(), default="cpu-demo")
    p.add_argument("--optimizers", nargs="+", metavar="NAME",
                   help=f"registry names (default: {' '.join(COMPARE_DEFAULT_OPTIMIZERS)})")
    p.add_argument("--ablation", choices=_ablation_names(),
                   help="the optimizers of one controlled ablation (instead of --optimizers)")
    p.add_argument("--seeds", nargs="+", type=int, default=[42], metavar="SEED")
    p.add_argument("--steps", type=int)
    p.add_argument("--out", help="default: runs/compare-<preset>")
    p.add_argument("--reference", metavar="NAME", help=reference_help)
    p.add_argument("--data")
    p.add_argument("--precision", choices=["fp32", "bf16", "auto"])
    p.add_argument("--config", metavar="FILE")
    p.add_argument("--tuned", metavar="DIR", help="use each optimizer's best lr from DIR/<name>/sweep.json "
                   "and the best value of any other swept option from DIR/<name>/sweep-<option>.json "
                   "(written by `sage-optim sweep --out DIR/<name>`)")

    p = sub.add_parser("sweep", help="learning-rate grid for one optimizer; picks the best by validation loss",
                       description="Train one optimizer at log-spaced learning rates around its registry default "
                       "(runs with a summary.json are skipped), then write sweep.json with every lr's final "
                       "validation loss and the best lr. " + overrides_help + " Optimizer options held fixed in "
                       "every run: --opt.KEY=VALUE (recorded in the sweep's json and applied by compare --tuned).")
    p.add_argument("--preset", choices=preset_names(), default="cpu-demo")
    p.add_argument("--optimizer", required=True, help="a registry name")
    p.add_argument("--factors", nargs="+", type=float, default=list(SWEEP_DEFAULT_FACTORS), metavar="F",
                   help="multiples of the default lr (default: 0.1 0.316 1 3.16 10)")
    p.add_argument("--lrs", nargs="+", type=float, metavar="LR", help="explicit learning rates (instead of --factors)")
    p.add_argument("--param", default="lr", metavar="NAME",
                   help="the hyperparameter to sweep: lr (default), or an option of the optimizer's factory such "
                   "as embed_lr, swept over --values at a fixed --lr; writes sweep-<NAME>.json")
    p.add_argument("--values", nargs="+", type=float, metavar="V", help="the values of --param (not lr)")
    p.add_argument("--lr", type=float, help="with --param other than lr: the fixed lr (default: the best lr of a "
                   "sweep.json in --out, else the registry's)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--steps", type=int)
    p.add_argument("--out", help="default: runs/sweep-<preset>/<optimizer>")
    p.add_argument("--data")
    p.add_argument("--precision", choices=["fp32", "bf16", "auto"])
    p.add_argument("--config", metavar="FILE")

    p = sub.add_parser("plot", help="redraw results.md and the plots of a compare directory from its runs",
                       description="Read <DIR>/<optimizer>-seed<seed>/{summary.json,metrics.jsonl} and write "
                       "results.md, val_loss.png and ppl_vs_state.png without training.")
    p.add_argument("dir", help="a compare output directory")
    p.add_argument("--tuned", metavar="DIR", help="also list the learning-rate grids of DIR/<name>/sweep.json")
    p.add_argument("--reference", metavar="NAME", help=reference_help)

    p = sub.add_parser("sweeps", help="learning-rate sensitivity of every lr sweep in a directory",
                       description="Read <DIR>/<optimizer>/sweep.json (written by `sage-optim sweep --out "
                       "<DIR>/<optimizer>`) and write sweeps.md (best lr, loss at the registry lr, the range of "
                       "lrs within --within nats of the best; then the same for every option sweep, "
                       "<optimizer>/sweep-<option>.json) and lr_sensitivity.png without training.")
    p.add_argument("dir", help="a directory of sweeps, one subdirectory per optimizer")
    p.add_argument("--within", type=float, default=0.1, metavar="NATS",
                   help="how far above the best final validation loss an lr may be and still count as tolerated "
                   "(default: 0.1)")

    p = sub.add_parser("memory", help="optimizer-state bytes of every optimizer for a preset's model",
                       description="Build the preset's model on the meta device (no memory) and count the "
                       "state each registry optimizer keeps between steps.")
    p.add_argument("--model", choices=preset_names(), default="llama-1.3b", help="a preset name")
    p.add_argument("--vocab", type=int, help="embedding rows (default: the preset's tokenizer size, rounded to 64)")
    p.add_argument("--tied", action=argparse.BooleanOptionalAction, default=None,
                   help="tie the output head to the embedding (default: the preset's setting)")
    p.add_argument("--optimizers", nargs="+", metavar="NAME", help="default: every registry optimizer")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")

    p = sub.add_parser("data", help="data utilities")
    data_sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    prep = data_sub.add_parser("prepare", help="fetch the pinned sources and build the full corpus mix")
    prep.add_argument("--cache-dir", help="default: $SAGE_OPTIM_CACHE or ~/.cache/sage-optim")

    sub.add_parser("bench", help="optimizer step time, memory traffic and step temporaries vs torch AdamW",
                   add_help=False)
    return parser


# ---------------------------------------------------------------------------------------------
# overrides: --section.key=value and --opt.KEY=VALUE

_OVERRIDE = re.compile(r"^--([A-Za-z_][\w-]*(?:\.[A-Za-z_][\w-]*)*)(?:=(.*))?$", re.S)


def _split_overrides(extra: Sequence[str], *, allow_opt: bool) -> tuple[dict[str, str], dict[str, Any]]:
    """Parse leftover argv into config overrides and optimizer kwargs; anything else is an error."""
    config: dict[str, str] = {}
    opt_kwargs: dict[str, Any] = {}
    items = list(extra)
    while items:
        token = items.pop(0)
        match = _OVERRIDE.match(token)
        if not match or "." not in match.group(1):
            raise UsageError(f"unrecognized argument {token!r} (config overrides look like --section.key=value)")
        key, value = match.group(1).replace("-", "_"), match.group(2)
        if value is None:
            if not items or items[0].startswith("--"):
                raise UsageError(f"{token} needs a value: {token}=VALUE")
            value = items.pop(0)
        if key.startswith("opt."):
            if not allow_opt:
                raise UsageError(f"{token}: optimizer options (--opt.*) are only for `train` and `sweep`")
            opt_kwargs[key[len("opt."):]] = _literal(value)
        else:
            config[key] = value
    return config, opt_kwargs


def _literal(text: str) -> Any:
    """An optimizer option value: JSON or a Python literal (numbers, true/false, lists, tuples), else a string."""
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(text)
        except (ValueError, SyntaxError, TypeError):
            pass
    return text


def _build_config(args: argparse.Namespace, overrides: dict[str, str], opt_kwargs: dict[str, Any],
                  *, optimizer: str | None = None) -> Any:
    """preset -> config file -> named flags -> --section.key overrides -> --opt.* kwargs."""
    from .train.config import apply_mapping, apply_overrides, load_config_file
    from .train.presets import get_preset

    file_data = load_config_file(args.config) if args.config else {}
    preset = args.preset or file_data.get("preset") or "cpu-demo"
    if not isinstance(preset, str):
        raise UsageError(f"config file {args.config}: preset must be a string, got {preset!r}")
    cfg = get_preset(preset)
    apply_mapping(cfg, file_data, origin=f"config file {args.config}")
    cfg.preset = preset
    named = {
        "optimizer": optimizer or getattr(args, "optimizer", None), "train.steps": args.steps,
        "optim.lr": getattr(args, "lr", None), "seed": getattr(args, "seed", None),
        "output.out_dir": args.out, "data.source": args.data, "train.precision": args.precision,
        "train.stop_at_step": getattr(args, "stop_at", None), "train.parallel": getattr(args, "parallel", None),
    }
    apply_overrides(cfg, {k: str(v) for k, v in named.items() if v is not None})
    apply_overrides(cfg, overrides)
    cfg.optim.kwargs.update(opt_kwargs)
    return cfg


# ---------------------------------------------------------------------------------------------
# commands


def _cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    from .train.loop import train

    overrides, opt_kwargs = _split_overrides(extra, allow_opt=True)
    cfg = _build_config(args, overrides, opt_kwargs)
    summary = train(cfg, resume=args.resume)
    if summary is not None:
        print(json.dumps(summary, indent=2))
    return 0


def _ablation_names() -> list[str]:
    from .optim.registry import ABLATIONS

    return list(ABLATIONS)


def _check_registry(names: Sequence[str]) -> None:
    from .optim.registry import available_optimizers

    known = available_optimizers(include_ablations=True)
    missing = [name for name in names if name not in known]
    if missing:
        raise UsageError(f"not in the optimizer registry: {', '.join(missing)} (available: {', '.join(known)})")


def _check_same_run(run_dir: Path, cfg: Any) -> None:
    """A run directory is skipped or resumed only if it holds this run: same optimizer, seed, lr, optimizer
    options and steps (a stale lr after a new sweep would otherwise be reused silently)."""
    from .optim.registry import default_lr

    old = json.loads((run_dir / "config.json").read_text())
    lr = default_lr(cfg.optimizer) if cfg.optim.lr is None else cfg.optim.lr  # as train() resolves it
    new = {"optimizer": cfg.optimizer, "seed": cfg.seed, "lr": lr,
           "options": json.loads(json.dumps(cfg.optim.kwargs)), "steps": cfg.train.steps}
    had = {"optimizer": old.get("optimizer"), "seed": old.get("seed"), "lr": old.get("optim", {}).get("lr"),
           "options": old.get("optim", {}).get("kwargs", {}), "steps": old.get("train", {}).get("steps")}
    differ = [k for k in new if not (new[k] == had[k] or (k == "lr" and isinstance(had[k], (int, float))
                                                          and math.isclose(new[k], had[k], rel_tol=1e-9)))]
    if differ:
        what = ", ".join(f"{k} {had[k]} there, {new[k]} now" for k in differ)
        raise UsageError(f"{run_dir} holds another run ({what}); use another --out, or remove that directory to "
                         f"run it again")


def _run_once(args: argparse.Namespace, overrides: dict[str, str], *, optimizer: str, seed: int, run_dir: Path,
              lr: float | None, label: str, opt_kwargs: Optional[dict[str, Any]] = None) -> None:
    """Train one run into ``run_dir`` unless it is complete; resume it when it has a checkpoint."""
    from .train.checkpoint import latest_checkpoint
    from .train.loop import train

    cfg = _build_config(args, overrides, dict(opt_kwargs or {}), optimizer=optimizer)
    cfg.seed = seed
    cfg.output.out_dir = str(run_dir)
    cfg.train.stop_at_step = None
    if lr is not None:
        cfg.optim.lr = lr
    if (run_dir / "config.json").exists():
        _check_same_run(run_dir, cfg)
    if (run_dir / "summary.json").exists():
        print(f"{label}: {run_dir} is complete, skipping", file=sys.stderr)
        return
    resume = latest_checkpoint(run_dir) is not None
    options = "".join(f" {k} {v:g}" if isinstance(v, float) else f" {k} {v}" for k, v in (opt_kwargs or {}).items())
    print(f"{label}: {'resuming' if resume else 'training'} {optimizer} seed {seed}"
          f"{'' if lr is None else f' lr {lr:g}'}{options} -> {run_dir}", file=sys.stderr)
    train(cfg, resume=resume)


def _option_sweeps(tuned_dir: str, name: str) -> list[Path]:
    """DIR/<name>/sweep-<option>.json: sweeps of an optimizer option other than lr (e.g. embed_lr)."""
    return sorted((Path(tuned_dir) / name).glob("sweep-*.json"))


def _tuned_settings(tuned_dir: str | None, name: str) -> tuple[float | None, dict[str, Any]]:
    """The lr and optimizer options of ``compare --tuned DIR`` for optimizer ``name``.

    The lr is the best of DIR/<name>/sweep.json (None, the registry's lr, when only other options were swept),
    and comes with the options that sweep held fixed (``sweep --opt.KEY=VALUE``). Each option swept in
    DIR/<name>/sweep-<option>.json then gets its best value (over a fixed one), checked to have been swept at
    the lr the run will use (an option tuned at another lr is not tuned for this run)."""
    from .optim.registry import default_lr

    if tuned_dir is None:
        return None, {}
    path = Path(tuned_dir) / name / "sweep.json"
    option_sweeps = _option_sweeps(tuned_dir, name)
    lr: float | None = None
    options: dict[str, Any] = {}
    if path.exists():
        sweep = json.loads(path.read_text())
        lr, options = float(sweep["best_lr"]), dict(sweep.get("options", {}))
    elif not option_sweeps:
        raise UsageError(f"--tuned {tuned_dir}: no {path}; run `sage-optim sweep --optimizer {name} "
                         f"--out {Path(tuned_dir) / name}` first")
    run_lr = default_lr(name) if lr is None else lr
    for option_path in option_sweeps:
        sweep = json.loads(option_path.read_text())
        if not math.isclose(sweep["lr"], run_lr, rel_tol=1e-9):
            raise UsageError(f"{option_path}: {sweep['param']} was swept at lr {sweep['lr']:g}, but this run uses "
                             f"lr {run_lr:g}; sweep it again with --lr {run_lr:g} (into the same --out)")
        options[sweep["param"]] = float(sweep["best"])
    return lr, options


def _cmd_compare(args: argparse.Namespace, extra: list[str]) -> int:
    from .optim.registry import ABLATIONS

    if args.ablation is not None and args.optimizers is not None:
        raise UsageError("give --optimizers or --ablation, not both")
    if args.optimizers is None:
        args.optimizers = list(ABLATIONS[args.ablation] if args.ablation else COMPARE_DEFAULT_OPTIMIZERS)
    _check_registry(args.optimizers)
    _check_reference(args.reference, args.optimizers)
    overrides, _ = _split_overrides(extra, allow_opt=False)
    if "output.out_dir" in overrides or "seed" in overrides or "optimizer" in overrides:
        raise UsageError("compare sets optimizer, seed and output.out_dir itself; use --optimizers, --seeds, --out")
    out = Path(args.out or f"runs/compare-{args.preset}")
    runs: dict[str, list[Path]] = {}
    plan = {}  # checked for every optimizer before the first run starts
    for name in args.optimizers:
        plan[name] = _tuned_settings(args.tuned, name)
    for name, (lr, options) in plan.items():
        for seed in args.seeds:
            run_dir = out / f"{name}-seed{seed}"
            runs.setdefault(name, []).append(run_dir)
            _run_once(args, overrides, optimizer=name, seed=seed, run_dir=run_dir, lr=lr, label="compare",
                      opt_kwargs=options)
    _write_results(out, runs, args.tuned, args.reference)
    return 0


def _check_reference(reference: Optional[str], names: Sequence[str]) -> None:
    if reference is not None and reference not in names:
        raise UsageError(f"--reference {reference} is not among the optimizers compared ({', '.join(names)}); "
                         "pick one of them or leave it out")


def _write_results(out: Path, runs: dict[str, list[Path]], tuned_dir: Optional[str] = None,
                   reference: Optional[str] = None) -> None:
    summaries = {name: [_summary_with_options(d) for d in dirs] for name, dirs in runs.items()}
    reference = reference or ("adamw" if "adamw" in runs else None)
    table = (_results_table(summaries) + (_paired_table(summaries, reference) if reference else "")
             + (_sweeps_table(tuned_dir, list(runs)) if tuned_dir else ""))
    (out / "results.md").write_text(table, encoding="utf-8")
    plots = [_plot_val_loss(runs, out / "val_loss.png"), _plot_ppl_vs_state(summaries, out / "ppl_vs_state.png")]
    print(table, end="")
    print(f"\nresults: {out / 'results.md'}\nplots: {', '.join(str(p) for p in plots)}")


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


def _sweeps_table(tuned_dir: str, names: list[str]) -> str:
    """Markdown: every value each optimizer's sweeps tried (lr, and any other option), its val loss, and the
    one chosen."""
    lines = ["", f"Learning rates (and other swept options): chosen by `sage-optim sweep` (best final validation "
             f"loss; {tuned_dir}):", "",
             "| optimizer | sweep (steps, seed) | swept | value: val loss | chosen |", "|---|---|---|---|---|"]
    for name in names:
        paths = [p for p in [Path(tuned_dir) / name / "sweep.json"] if p.exists()] + _option_sweeps(tuned_dir, name)
        if not paths:
            lines.append(f"| {name} | no sweep | | | default |")
        for path in paths:
            sweep = json.loads(path.read_text())
            param = sweep.get("param", "lr")
            steps = _sweep_steps(path, sweep)
            grid = ", ".join(f"{g['value'] if 'value' in g else g['lr']:.3g}: {g['val_loss']:.4f}"
                             for g in sweep["grid"])
            label = ("lr" if param == "lr" else f"{param} (at lr {sweep['lr']:.3g})") \
                + _fixed_options_text(sweep.get("options", {}))
            best = sweep["best_lr"] if param == "lr" else sweep["best"]
            lines.append(f"| {name} | {steps}, {sweep['seed']} | {label} | {grid} | {best:.3g} |")
    return "\n".join(lines) + "\n"


def _cmd_plot(args: argparse.Namespace, extra: list[str]) -> int:
    if extra:
        raise UsageError(f"unrecognized arguments: {' '.join(extra)}")
    out = Path(args.dir)
    def run_order(summary: Path) -> tuple[str, int, str]:
        name, seed = summary.parent.name.rsplit("-seed", 1)
        return name, int(seed) if seed.isdigit() else -1, seed  # seed 88 before seed 123

    runs: dict[str, list[Path]] = {}
    for summary in sorted(out.glob("*-seed*/summary.json"), key=run_order):
        runs.setdefault(run_order(summary)[0], []).append(summary.parent)
    if not runs:
        raise UsageError(f"{out}: no completed runs (<optimizer>-seed<seed>/summary.json) to plot")
    _check_reference(args.reference, list(runs))
    _write_results(out, runs, args.tuned, args.reference)
    return 0


def _cmd_sweeps(args: argparse.Namespace, extra: list[str]) -> int:
    if extra:
        raise UsageError(f"unrecognized arguments: {' '.join(extra)}")
    if not (args.within > 0 and math.isfinite(args.within)):
        raise UsageError(f"--within must be a positive number of nats, got {args.within}")
    root = Path(args.dir)
    sweeps = {path.parent.name: json.loads(path.read_text()) for path in sorted(root.glob("*/sweep.json"))}
    option_table = _option_sweeps_table(root, args.within)
    if not sweeps and not option_table:
        raise UsageError(f"{root}: no <optimizer>/sweep.json or <optimizer>/sweep-<option>.json to read; run "
                         f"`sage-optim sweep --optimizer NAME --out {root / 'NAME'}` first")
    # A directory of option sweeps alone (e.g. embed_lr at a fixed lr) has no lr table and no lr plot.
    table = ((_lr_sensitivity_table(root, sweeps, args.within) if sweeps else "") + option_table).lstrip("\n")
    (root / "sweeps.md").write_text(table, encoding="utf-8")
    print(table, end="")
    print(f"\nresults: {root / 'sweeps.md'}")
    if sweeps:
        print(f"plot: {_plot_lr_sensitivity(sweeps, root / 'lr_sensitivity.png')}")
    return 0


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


def _fixed_options_text(options: dict[str, Any]) -> str:
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


def _lr_sensitivity_table(root: Path, sweeps: dict[str, dict[str, Any]], within: float) -> str:
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
        lines.append(f"| {name}{_fixed_options_text(sweep.get('options', {}))} "
                     f"| {_sweep_steps(root / name / 'sweep.json', sweep)}, {sweep['seed']} "
                     f"| {cells['tried']} | {cells['best']} | {paper} | {cells['range']} | {cells['width']} |")
    return "\n".join(lines) + "\n"


def _option_sweeps_table(root: Path, within: float) -> str:
    """Markdown: every DIR/<optimizer>/sweep-<option>.json (an option such as embed_lr swept at a fixed lr), with
    the same reading as the lr table: best value, and the contiguous values within ``within`` nats of it."""
    lines = []
    for path in sorted(root.glob("*/sweep-*.json")):
        sweep = json.loads(path.read_text())
        _, cells = _basin_cells(sweep["grid"], "value", within)
        lines.append(f"| {path.parent.name}{_fixed_options_text(sweep.get('options', {}))} "
                     f"| {sweep['param']} (at lr {sweep['lr']:.3g}) | {_sweep_steps(path, sweep)}, {sweep['seed']} "
                     f"| {cells['tried']} | {cells['best']} | {cells['range']} | {cells['width']} |")
    if not lines:
        return ""
    return "\n".join(["", "Other options, each swept at a fixed lr (`sweep --param NAME`):", "",
                      f"| optimizer | option | steps, seed | values tried | best value: val loss "
                      f"| values within {within:g} nats of best | width |", "|---|---|---|---|---|---|---|",
                      *lines]) + "\n"


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


def _plot_lr_sensitivity(sweeps: dict[str, dict[str, Any]], path: Path) -> Path:
    """Final validation loss against lr, one line per optimizer; the chosen lr ringed, diverged points left out."""
    with _figure(path, xlabel="peak learning rate (log scale)", ylabel="final validation loss (one seed; ring: best)",
                 log_x=True) as ax:
        for name, sweep in sweeps.items():
            grid = [g for g in sweep["grid"] if math.isfinite(g["val_loss"])]
            line, = ax.plot([g["lr"] for g in grid], [g["val_loss"] for g in grid], marker="o",
                            label=name + _fixed_options_text(sweep.get("options", {})))
            best = min(grid, key=lambda g: g["val_loss"])
            ax.plot([best["lr"]], [best["val_loss"]], marker="o", markersize=12, fillstyle="none",
                    color=line.get_color())
    return path


def _sweep_values(args: argparse.Namespace, out: Path) -> tuple[list[float], Optional[float]]:
    """The values to sweep and, for an option other than lr, the fixed lr it is swept at (--lr; else the best
    lr of an lr sweep in the same --out; else the registry's)."""
    from .optim.registry import default_lr

    if args.param == "lr":
        if args.values is not None or args.lr is not None:
            raise UsageError("--values and --lr are for sweeping another option (--param NAME); give learning "
                             "rates with --lrs or --factors")
        values = args.lrs or [default_lr(args.optimizer) * f for f in args.factors]
        fixed_lr = None
    else:
        if args.lrs is not None:
            raise UsageError(f"--lrs sweeps the lr; with --param {args.param} give --values (and --lr to fix the lr)")
        if not re.fullmatch(r"[A-Za-z_]\w*", args.param):
            raise UsageError(f"--param: expected an optimizer option name such as embed_lr, got {args.param!r}")
        values = args.values or []
        lr_sweep = out / "sweep.json"
        fixed_lr = args.lr if args.lr is not None else (
            float(json.loads(lr_sweep.read_text())["best_lr"]) if lr_sweep.exists() else default_lr(args.optimizer))
        if not (fixed_lr > 0 and math.isfinite(fixed_lr)):
            raise UsageError(f"--lr must be a positive number, got {fixed_lr}")
    if len(values) < 2 or any(not (v > 0 and math.isfinite(v)) for v in values):
        raise UsageError(f"sweep needs at least two positive values of {args.param}, got {values}")
    return values, fixed_lr


def _cmd_sweep(args: argparse.Namespace, extra: list[str]) -> int:
    from .optim.registry import default_lr

    _check_registry([args.optimizer])
    overrides, fixed = _split_overrides(extra, allow_opt=True)
    if "output.out_dir" in overrides or "optim.lr" in overrides or "optimizer" in overrides:
        raise UsageError("sweep sets optimizer, optim.lr and output.out_dir itself; use --optimizer, --lrs, --out")
    param = args.param
    if param in fixed or "lr" in fixed:
        raise UsageError(f"--opt.{param if param in fixed else 'lr'} would fix what the sweep sets; give the "
                         f"{'learning rates with --lrs' if param == 'lr' else f'values of {param} with --values'}"
                         f"{' (and the fixed lr with --lr)' if param != 'lr' else ''}")
    fixed = json.loads(json.dumps(fixed))  # as config.json stores them (tuples become lists)
    out = Path(args.out or f"runs/sweep-{args.preset}/{args.optimizer}")
    values, fixed_lr = _sweep_values(args, out)

    def value_of(run_dir: Path, summary: dict[str, Any]) -> Optional[float]:
        """The swept value of an earlier run, or None if it is not a point of this sweep (other fixed options)."""
        kwargs = dict(json.loads((run_dir / "config.json").read_text())["optim"]["kwargs"])
        value = summary["lr"] if param == "lr" else kwargs.pop(param, None)
        return float(value) if isinstance(value, (int, float)) and kwargs == fixed else None

    runs: dict[str, tuple[float, dict[str, Any]]] = {}
    for value in values:
        run_dir = out / f"{param}{value:.3g}"
        _run_once(args, overrides, optimizer=args.optimizer, seed=args.seed, run_dir=run_dir,
                  lr=value if param == "lr" else fixed_lr, label="sweep",
                  opt_kwargs={**fixed, **({} if param == "lr" else {param: value})})
        runs[run_dir.name] = value, json.loads((run_dir / "summary.json").read_text())
    # note: earlier points of the same sweep (same preset, seed, steps, and lr for another option) stay in the
    # grid, so a grid can be extended by sweeping only the new values
    first = next(iter(runs.values()))[1]
    keys = ("optimizer", "preset", "seed", "steps", "tokens") + (() if param == "lr" else ("lr",))
    for summary_path in sorted(out.glob(f"{param}*/summary.json")):
        summary = json.loads(summary_path.read_text())
        value = value_of(summary_path.parent, summary)
        if summary_path.parent.name not in runs and value is not None \
                and all(summary.get(k) == first.get(k) for k in keys):
            runs[summary_path.parent.name] = value, summary
    key = "lr" if param == "lr" else "value"  # an lr sweep's grid keeps its original field name
    grid = sorted(({key: value, "val_loss": summary["val_loss"], "val_ppl": summary["val_ppl"], "run": name}
                   for name, (value, summary) in runs.items()), key=lambda g: g[key])
    finite = [g for g in grid if math.isfinite(g["val_loss"])]
    if not finite:
        raise UsageError(f"every value of the sweep diverged: {param} {values}")
    best = min(finite, key=lambda g: g["val_loss"])
    flag = "--lrs" if param == "lr" else "--values"
    edge = "" if len(grid) < 2 or best not in (grid[0], grid[-1]) else (
        f"; the best {param} is at the {'low' if best is grid[0] else 'high'} edge of the grid: extend it "
        f"(sweep more {flag} into the same --out; finished points are kept)")
    result: dict[str, Any] = {"optimizer": args.optimizer, "preset": args.preset, "seed": args.seed,
                              "param": param, "options": fixed, "grid": grid}
    if param == "lr":
        result.update(best_lr=best["lr"], default_lr=default_lr(args.optimizer))
    else:
        result.update(best=best["value"], lr=fixed_lr)
    result["note"] = "best by final validation loss of one seed" + edge
    path = out / ("sweep.json" if param == "lr" else f"sweep-{param}.json")
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    at = "" if fixed_lr is None else f" (lr {fixed_lr:.3g})"
    at += _fixed_options_text(fixed)
    for g in grid:
        print(f"{args.optimizer} {param} {g[key]:.3g}{at}: val loss {g['val_loss']:.4f} ppl {g['val_ppl']:.1f}"
              f"{'   <- best' if g is best else ''}")
    print(f"sweep: {path}{edge}")
    return 0


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
        step_times = [r["train_time_s"] / max(r["steps"], 1) for r in rows]
        speeds = [r["tokens_per_s"] for r in rows]
        if len({r.get("device_name") for r in rows}) > 1:  # a mean over two machines measures neither
            mixed = True
            timing = f"{' / '.join(f'{t:.3f}' for t in step_times)} | {' / '.join(f'{v:,.0f}' for v in speeds)}"
        else:
            timing = f"{statistics.fmean(step_times):.3f} | {statistics.fmean(speeds):,.0f}"
        lines.append(
            f"| {name} | {rows[0]['lr']:g}"
            f"{''.join(f', {key} {_format_option(v)}' for key, v in sorted(rows[0].get('options', {}).items()))} "
            f"| {_mean_std([r['val_ppl'] for r in rows])} "
            f"| {_mean_std([r['test_ppl'] for r in rows])} | {_human_bytes(rows[0]['state_bytes'])} "
            f"| {timing} | {', '.join(str(r['seed']) for r in rows)} |")
    first = next(iter(summaries.values()))[0]
    footer = (f"\n{first['preset']}, {first['steps']} steps, {first['tokens']:,} tokens, corpus "
              f"{first['corpus']['name']} ({first['corpus']['content_hash'][:12]}), {first['device']} "
              f"{first['precision']}. Perplexities: mean ± sample std over seeds"
              f"{_PER_SEED_TIMING if mixed else ''}.\n")
    return "\n".join(lines) + "\n" + footer + _devices_line(summaries)


def _paired_table(summaries: dict[str, list[dict[str, Any]]], reference: str) -> str:
    """Markdown: each optimizer's final val loss minus the reference's on the same seed.

    A seed fixes initialisation and data order, so most of a run's seed-to-seed spread is shared by every
    optimizer on that seed; the paired difference is the honest error bar for "A beats B" (a difference
    smaller than the unpaired stds can still hold on every seed, and the other way round)."""
    baseline = {r["seed"]: r["val_loss"] for r in summaries[reference]}
    rows = []
    for name, runs in summaries.items():
        diffs = [r["val_loss"] - baseline[r["seed"]] for r in runs if r["seed"] in baseline]
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
    from .train.metrics import read_metrics

    with _figure(path, xlabel="step", ylabel="validation loss (mean over seeds; band: min-max)") as ax:
        for name, dirs in runs.items():
            by_step: dict[int, list[float]] = {}
            for d in dirs:
                for row in read_metrics(d / "metrics.jsonl"):
                    if "val_loss" in row:
                        by_step.setdefault(row["step"], []).append(row["val_loss"])
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


def _human_bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def state_bytes_table(model: Any, optimizers: Sequence[str]) -> list[dict[str, Any]]:
    """Optimizer-state bytes of each registry optimizer for ``model`` (meta device or real), total and by role.

    The count is the optimizer's own ``state_nbytes()`` and ``partition`` when it has them (computed
    from its state spec, exact before the first step); otherwise the optimizer takes one step with
    meta gradients and the state tensors it creates are summed. Roles come from
    :func:`sage_optim.routing.classify`. ``tests/test_cli.py`` checks the counts against real
    optimizers after one real step. An optional baseline whose package is missing gets a row with
    ``state_bytes`` ``None`` and a ``note`` saying why.
    """
    import torch

    from .optim.registry import create_optimizer, unavailable_reason
    from .routing import classify
    from .train.metrics import state_nbytes, tensor_nbytes

    roles = {name: str(role) for name, role in classify(model).items()}
    name_of = {id(p): n for n, p in model.named_parameters()}
    results = []
    for name in optimizers:
        reason = unavailable_reason(name)
        if reason is not None:
            results.append({"optimizer": name, "state_bytes": None, "by_role": {}, "method": None,
                            "note": f"not available: {reason}"})
            continue
        optimizer = create_optimizer(name, model)
        if hasattr(optimizer, "state_nbytes") and hasattr(optimizer, "partition"):
            method = "state_nbytes"
            per_param = {row.name: row.state_bytes for row in optimizer.partition.rows}
        else:
            method = "one step on meta tensors"
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
            try:
                optimizer.step()
            finally:
                for p in model.parameters():
                    p.grad = None
            per_param = {name_of[id(p)]: tensor_nbytes(state) for p, state in optimizer.state.items()}
        by_role: dict[str, int] = {}
        for param_name, nbytes in per_param.items():
            role = roles.get(param_name, "-")
            by_role[role] = by_role.get(role, 0) + nbytes
        results.append({"optimizer": name, "state_bytes": int(state_nbytes(optimizer)), "by_role": by_role,
                        "method": method})
    return results


def _cmd_memory(args: argparse.Namespace, extra: list[str]) -> int:
    from .optim.registry import available_optimizers
    from .train.model import build_meta_model, count_params, round_vocab
    from .train.presets import get_preset

    if extra:
        raise UsageError(f"unrecognized arguments: {' '.join(extra)}")
    names = args.optimizers or available_optimizers()
    _check_registry(names)
    cfg = get_preset(args.model)
    if args.tied is not None:
        cfg.model.tie_word_embeddings = args.tied
    if args.vocab is not None and args.vocab <= 0:
        raise UsageError(f"--vocab must be positive, got {args.vocab}")
    vocab = args.vocab or cfg.model.vocab_size or round_vocab(cfg.data.tokenizer_vocab_size)
    model = build_meta_model(cfg.model, vocab_size=vocab, max_seq_len=cfg.data.seq_len)
    params = count_params(model)
    rows = state_bytes_table(model, names)
    adamw = next((r["state_bytes"] for r in rows if r["optimizer"] == "adamw"), None)
    for row in rows:
        row.update(model=args.model, params=params, vocab_size=vocab, tied=cfg.model.tie_word_embeddings,
                   ratio_to_adamw=row["state_bytes"] / adamw if adamw and row["state_bytes"] is not None else None)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{args.model}: {params:,} parameters ({_human_bytes(4 * params)} in fp32), vocab {vocab}, "
          f"{'tied' if cfg.model.tie_word_embeddings else 'untied'} embeddings; optimizer state between steps:")
    header = f"{'optimizer':<15} {'state bytes':>16} {'':>9} {'x AdamW':>8}  by role"
    print(header)
    print("-" * len(header))
    for row in rows:
        if row["state_bytes"] is None:
            print(f"{row['optimizer']:<15} {row['note']}")
            continue
        ratio = f"{row['ratio_to_adamw']:.3f}" if row["ratio_to_adamw"] is not None else "-"
        roles = ", ".join(f"{k} {_human_bytes(v)}" for k, v in row["by_role"].items() if v)
        print(f"{row['optimizer']:<15} {row['state_bytes']:>16,} {_human_bytes(row['state_bytes']):>9} "
              f"{ratio:>8}  {roles}")
    return 0


def _cmd_data(args: argparse.Namespace, extra: list[str]) -> int:
    from .train.data import prepare

    if extra:
        raise UsageError(f"unrecognized arguments: {' '.join(extra)}")
    path = prepare(Path(args.cache_dir) if args.cache_dir else None)
    print(path)
    return 0


def _cmd_bench(argv: list[str]) -> int:
    from .bench import main as bench_main

    try:
        return int(bench_main(argv))
    except SystemExit as exc:  # --help, or argparse's own usage error (already printed)
        return int(exc.code or 0)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sage-optim`` console script and ``python -m sage_optim``."""
    from .train.checkpoint import CheckpointError
    from .train.config import ConfigError
    from .train.data import DataError

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return _cmd_bench(argv[1:])
    parser = _build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
    except SystemExit as exc:  # --help, or argparse's own usage error (already printed)
        return int(exc.code or 0)
    commands = {"train": _cmd_train, "compare": _cmd_compare, "sweep": _cmd_sweep, "plot": _cmd_plot,
                "sweeps": _cmd_sweeps, "memory": _cmd_memory, "data": _cmd_data}
    try:
        return commands[args.command](args, extra)
    except (UsageError, ConfigError) as exc:
        _err(str(exc))
        return 2
    except (CheckpointError, DataError) as exc:
        _err(str(exc))
        return 1
    except FloatingPointError as exc:  # e.g. NonFiniteGradientError: the run diverged
        _err(f"training stopped: {' '.join(str(exc).split())}")
        return 1
    except KeyboardInterrupt:
        _err("interrupted")
        return 130


def console_main() -> None:
    """The ``sage-optim`` console script and ``python -m sage_optim``: :func:`main`, then exit with its code.

    A rank under torchrun that finished cleanly leaves with ``os._exit`` once its output is flushed,
    skipping interpreter finalisation. There gloo's worker threads can still hold the last collective's
    tensors, and freeing them once Python is shutting down aborts the rank ("terminate called without
    an active exception"): a 2-rank FSDP2 test run, its checkpoint already written and the process
    group already destroyed after a barrier, died that way in CI and took its peer with it. By then
    every file this command writes is closed, so nothing is lost; a failed run exits normally.
    """
    code = main()
    if code == 0 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import logging

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    console_main()
