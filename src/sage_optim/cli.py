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
import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from .memory import human_bytes, state_bytes_table
from .train import report

__all__ = ["main"]

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
    target_help = ("also tabulate how many steps each optimizer took to reach NAME's final val loss on the same "
                   "seed (the paper's Figure 2 measure; default: lion-hybrid when it was run, as in the paper, "
                   "else the --reference)")
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
    p.add_argument("--target", metavar="NAME", help=target_help)
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
    p.add_argument("--target", metavar="NAME", help=target_help)

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
    option_sweeps = report.option_sweeps(tuned_dir, name)
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
    _check_compared("--reference", args.reference, args.optimizers)
    _check_compared("--target", args.target, args.optimizers)
    overrides, _ = _split_overrides(extra, allow_opt=False)
    if "output.out_dir" in overrides or "seed" in overrides or "optimizer" in overrides:
        raise UsageError("compare sets optimizer, seed and output.out_dir itself; use --optimizers, --seeds, --out")
    out = Path(args.out or f"runs/compare-{args.preset}")
    plan = {}  # checked for every optimizer before the first run starts
    for name in args.optimizers:
        plan[name] = _tuned_settings(args.tuned, name)
    _check_same_experiment(out, _build_config(args, overrides, {}, optimizer=args.optimizers[0]))
    for name, (lr, options) in plan.items():
        for seed in args.seeds:
            _run_once(args, overrides, optimizer=name, seed=seed, run_dir=out / f"{name}-seed{seed}", lr=lr,
                      label="compare", opt_kwargs=options)
    # the table covers every completed run in --out, not only this call's: it is built over several sittings
    report.write_results(out, _completed_runs(out), args.tuned, args.reference, args.target)
    return 0


def _completed_runs(out: Path) -> dict[str, list[Path]]:
    """The finished runs in a compare directory (<optimizer>-seed<seed>/summary.json), seeds in numeric order."""
    def run_order(summary: Path) -> tuple[str, int, str]:
        name, seed = summary.parent.name.rsplit("-seed", 1)
        return name, int(seed) if seed.isdigit() else -1, seed  # seed 88 before seed 123

    runs: dict[str, list[Path]] = {}
    for summary in sorted(out.glob("*-seed*/summary.json"), key=run_order):
        runs.setdefault(run_order(summary)[0], []).append(summary.parent)
    return runs


def _check_same_experiment(out: Path, cfg: Any) -> None:
    """Refuse to add runs to a compare directory whose finished runs trained another experiment (preset, steps,
    tokens, corpus, device type, precision): a table mixing them would compare corpora, not optimizers. The corpus is compared by the
    name it resolves to here, because ``default`` means the full mix once `data prepare` ran and the embedded
    corpus before."""
    from .train.data import corpus_name
    from .train.loop import resolve_device, resolve_precision

    device = resolve_device(cfg.train.device)
    planned = {"preset": cfg.preset, "steps": cfg.train.steps, "tokens": cfg.train.steps * cfg.tokens_per_step,
               "corpus": corpus_name(cfg.data.source, cache_dir=cfg.data.cache_dir), "device": device.type,
               # "auto" is bf16 on a CPU with AMX: a directory of fp32 runs continued there would mix them
               "precision": resolve_precision(cfg.train.precision, device)}
    for dirs in _completed_runs(out).values():
        for run_dir in dirs:
            had = report.experiment(json.loads((run_dir / "summary.json").read_text()))
            differ = [k for k in planned if planned[k] != had[k]]
            if differ:
                what = ", ".join(f"{k} {had[k]} there, {planned[k]} now" for k in differ)
                keyword = {"embedded-cc0": "embedded", "full": "full"}.get(had["corpus"])
                hint = (f", or --data {keyword} to train on the corpus of the runs there"
                        if "corpus" in differ and keyword else "")
                if "precision" in differ and had["precision"] in ("fp32", "bf16"):
                    hint += f", or --precision {had['precision']} as the runs there"
                raise UsageError(f"{out} holds runs of another experiment: {run_dir.name} has {what}; use "
                                 f"another --out{hint}")


def _check_compared(flag: str, name: Optional[str], names: Sequence[str]) -> None:
    if name is not None and name not in names:
        raise UsageError(f"{flag} {name} is not among the optimizers compared ({', '.join(names)}); "
                         "pick one of them or leave it out")


def _cmd_plot(args: argparse.Namespace, extra: list[str]) -> int:
    if extra:
        raise UsageError(f"unrecognized arguments: {' '.join(extra)}")
    out = Path(args.dir)
    runs = _completed_runs(out)
    if not runs:
        raise UsageError(f"{out}: no completed runs (<optimizer>-seed<seed>/summary.json) to plot")
    _check_compared("--reference", args.reference, list(runs))
    _check_compared("--target", args.target, list(runs))
    report.write_results(out, runs, args.tuned, args.reference, args.target)
    return 0


def _cmd_sweeps(args: argparse.Namespace, extra: list[str]) -> int:
    if extra:
        raise UsageError(f"unrecognized arguments: {' '.join(extra)}")
    if not (args.within > 0 and math.isfinite(args.within)):
        raise UsageError(f"--within must be a positive number of nats, got {args.within}")
    root = Path(args.dir)
    sweeps = {path.parent.name: json.loads(path.read_text()) for path in sorted(root.glob("*/sweep.json"))}
    option_table = report.option_sweeps_table(root, args.within)
    if not sweeps and not option_table:
        raise UsageError(f"{root}: no <optimizer>/sweep.json or <optimizer>/sweep-<option>.json to read; run "
                         f"`sage-optim sweep --optimizer NAME --out {root / 'NAME'}` first")
    # A directory of option sweeps alone (e.g. embed_lr at a fixed lr) has no lr table and no lr plot.
    table = ((report.lr_sensitivity_table(root, sweeps, args.within) if sweeps else "") + option_table).lstrip("\n")
    (root / "sweeps.md").write_text(table, encoding="utf-8")
    print(table, end="")
    print(f"\nresults: {root / 'sweeps.md'}")
    if sweeps:
        print(f"plot: {report.plot_lr_sensitivity(sweeps, root / 'lr_sensitivity.png')}")
    return 0


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
    at += report.fixed_options_text(fixed)
    for g in grid:
        print(f"{args.optimizer} {param} {g[key]:.3g}{at}: val loss {g['val_loss']:.4f} ppl {g['val_ppl']:.1f}"
              f"{'   <- best' if g is best else ''}")
    print(f"sweep: {path}{edge}")
    return 0


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
    print(f"{args.model}: {params:,} parameters ({human_bytes(4 * params)} in fp32), vocab {vocab}, "
          f"{'tied' if cfg.model.tie_word_embeddings else 'untied'} embeddings; optimizer state between steps:")
    header = f"{'optimizer':<15} {'state bytes':>16} {'':>9} {'x AdamW':>8}  by role"
    print(header)
    print("-" * len(header))
    for row in rows:
        if row["state_bytes"] is None:
            print(f"{row['optimizer']:<15} {row['note']}")
            continue
        ratio = f"{row['ratio_to_adamw']:.3f}" if row["ratio_to_adamw"] is not None else "-"
        roles = ", ".join(f"{k} {human_bytes(v)}" for k, v in row["by_role"].items() if v)
        print(f"{row['optimizer']:<15} {row['state_bytes']:>16,} {human_bytes(row['state_bytes']):>9} "
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
    except (UsageError, ConfigError, report.MixedRunsError) as exc:
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

    Through :func:`sage_optim.distributed.exit_rank`: a torchrun rank that finished cleanly skips
    interpreter finalisation, where gloo's threads can abort it after its files are written.
    """
    from .distributed.fsdp import exit_rank

    exit_rank(main())


if __name__ == "__main__":  # pragma: no cover
    console_main()
