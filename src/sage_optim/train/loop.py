"""The training loop: one function, :func:`train`, in nanoGPT's order.

set lr -> evaluate + checkpoint -> micro-steps with gradient accumulation -> clip -> optimizer step
-> scheduler step -> zero grads -> log. Everything it needs is built by :func:`setup_run` above it.

Resume contract (CPU): a run stopped with ``train.stop_at_step`` and continued with ``resume=True``
logs bitwise the same losses as a run that never stopped, because the checkpoint restores the
model, optimizer, scheduler, data-sampler position and every RNG.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._device import device_name
from ..optim.registry import available_optimizers, create_optimizer, default_lr
from .checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import ConfigError, RunConfig, config_to_dict, validate
from .data import WindowSampler, fixed_batches, load_corpus
from .metrics import MetricsLog, Progress, SpikeDetector, peak_memory_bytes, perplexity, state_nbytes, write_json
from .model import build_model, count_params, round_vocab
from .parallel import Muted, Parallel, setup_parallel
from .schedule import warmup_cosine_scheduler

__all__ = ["train", "setup_run", "evaluate", "resolve_device", "resolve_precision", "Run", "NonFiniteLossError"]

Log = Callable[[str], None]


class NonFiniteLossError(FloatingPointError):
    """The training loss was NaN/Inf and ``train.nonfinite_loss`` is "stop" (a checkpoint was saved first)."""


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def resolve_device(requested: str) -> torch.device:
    """"auto": CUDA when available, else CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise ConfigError(f"train.device: {requested!r} is not a device (use auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={requested!r} but CUDA is not available here; use --train.device=cpu")
    return device


def _cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16: bf16 matmuls that are not emulated."""
    if "AMX" in torch.backends.cpu.get_cpu_capability().upper():
        return True
    probes = [getattr(torch.cpu, n, None) for n in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(probe is not None and probe() for probe in probes)


def resolve_precision(requested: str, device: torch.device) -> str:
    """"auto": bf16 on CUDA with bf16 support and on CPUs with AMX/AVX512-BF16, else fp32."""
    if requested == "fp32":
        return "fp32"
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
    else:
        supported = _cpu_has_fast_bf16()
    if requested == "bf16" or supported:
        return "bf16"
    return "fp32"


def _lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; ``y`` is already shifted, so HF's ``labels=`` shift is not used."""
    logits = model(input_ids=x).logits
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], *, device: torch.device,
             precision: str) -> float:
    """Mean loss over fixed batches (each batch weighs the same)."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device)
    for x, y in batches:
        with _autocast(device, precision):
            total += _lm_loss(model, x.to(device), y.to(device))
    model.train(was_training)
    return float(total) / len(batches)


def _autocast(device: torch.device, precision: str) -> Any:
    """bf16 autocast around the forward pass; weights, grads and optimizer state stay fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def _rng_state(device: torch.device) -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None}


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state_all(state["cuda"])


# Keys of the config that must match for a checkpoint to continue this run; the rest (steps, eval,
# output, precision, device, logging) may change between the stopped and the resumed run.
_MUST_MATCH = ("optimizer", "seed", "model", "optim", "data.seq_len", "data.tokenizer_vocab_size",
               "train.micro_batch_size", "train.grad_accum_steps")


def _lookup(cfg_dict: dict[str, Any], dotted: str) -> Any:
    value: Any = cfg_dict
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _check_resumable(ckpt: dict[str, Any], cfg: dict[str, Any], corpus_hash: str, path: Path) -> None:
    for key in _MUST_MATCH:
        saved, now = _lookup(ckpt["config"], key), _lookup(cfg, key)
        if json.loads(json.dumps(saved)) != json.loads(json.dumps(now)):  # tuples and lists alike
            raise CheckpointError(f"checkpoint {path} is from another run: {key} is {saved!r} there "
                                  f"but {now!r} now")
    if ckpt.get("corpus_hash") != corpus_hash:
        raise CheckpointError(f"checkpoint {path} was trained on another corpus "
                              f"(hash {str(ckpt.get('corpus_hash'))[:12]}, now {corpus_hash[:12]})")


@dataclasses.dataclass
class Run:
    """Everything :func:`train` needs, built by :func:`setup_run`."""

    cfg: RunConfig  # resolved: vocab, lr, device and precision filled in
    device: torch.device
    corpus: Any
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    sampler: Any
    val_batches: list[tuple[torch.Tensor, torch.Tensor]]
    checkpoint: dict[str, Any] | None  # the checkpoint being resumed from
    par: Parallel  # this rank's part in a DDP/FSDP2 run ("none": the only process)


def setup_run(cfg: RunConfig, *, resume: bool = False, log: Log = _stderr) -> Run:
    """Resolve the config, load data, build model/optimizer/scheduler and, if resuming, restore them."""
    cfg = validate(copy.deepcopy(cfg))
    if cfg.optimizer not in available_optimizers(include_ablations=True):
        raise ConfigError(f"unknown optimizer {cfg.optimizer!r}; "
                          f"available: {', '.join(available_optimizers(include_ablations=True))}")
    if cfg.output.out_dir is None:
        cfg.output.out_dir = f"runs/{cfg.preset}/{cfg.optimizer}-seed{cfg.seed}"
    out = Path(cfg.output.out_dir)
    ckpt_path = latest_checkpoint(out)
    if resume and ckpt_path is None:
        raise CheckpointError(f"nothing to resume: no checkpoint in {out}")
    if not resume and ckpt_path is not None:
        raise CheckpointError(f"{out} already holds checkpoints; pass --resume to continue that run "
                              "or choose another --out")
    ckpt = load_checkpoint(ckpt_path) if resume and ckpt_path is not None else None  # fail before slow work
    # note: a checkpoint at exactly the last step without summary.json is a run stopped during its final
    # evaluation; resuming it finishes that evaluation and writes the summary
    finished = ckpt is not None and (ckpt["step"] > cfg.train.steps
                                     or (ckpt["step"] == cfg.train.steps and (out / "summary.json").exists()))
    if finished:
        raise CheckpointError(f"the run in {out} already reached step {ckpt['step']}; "
                              f"pass more --steps than that to continue it")
    if ckpt is not None and cfg.train.stop_at_step is not None and cfg.train.stop_at_step <= ckpt["step"]:
        raise ConfigError(f"train.stop_at_step={cfg.train.stop_at_step} is not after the checkpoint's step "
                          f"{ckpt['step']}")
    device = resolve_device(cfg.train.device)
    par = setup_parallel(cfg.train.parallel, device, micro_batch_size=cfg.train.micro_batch_size)
    device = par.device or device  # under torchrun, each rank's own GPU
    log = log if par.is_main else Muted()
    cfg.train.device = str(device)
    cfg.train.precision = resolve_precision(cfg.train.precision, device)  # type: ignore[assignment]
    cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else None
    with par.main_first():  # rank 0 fills the data cache, the others read it
        corpus = load_corpus(cfg.data.source, vocab_size=cfg.data.tokenizer_vocab_size, cache_dir=cache_dir,
                             log=log)
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = round_vocab(corpus.vocab_size)
    elif cfg.model.vocab_size < corpus.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"{corpus.vocab_size} tokens")
    if cfg.optim.lr is None:
        cfg.optim.lr = default_lr(cfg.optimizer)

    # the seed fixes the initial weights and the order of training windows
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    model = build_model(cfg.model, vocab_size=cfg.model.vocab_size, max_seq_len=cfg.data.seq_len, device=device)
    model = par.wrap(model)  # DDP or FSDP2; the optimizer is built from the wrapped (sharded) parameters
    try:
        optimizer = create_optimizer(cfg.optimizer, par.unwrap(model), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                     **cfg.optim.kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"optimizer {cfg.optimizer!r} rejected its options {cfg.optim.kwargs}: {exc}") from None
    except ImportError as exc:  # an optional baseline (apollo, adam-mini) whose package is not installed
        raise ConfigError(str(exc)) from None
    scheduler = warmup_cosine_scheduler(optimizer, warmup_steps=cfg.warmup_steps, total_steps=cfg.train.steps,
                                        floor_fraction=cfg.train.lr_floor_fraction)
    sampler = WindowSampler(corpus.train, seq_len=cfg.data.seq_len, batch_size=cfg.train.micro_batch_size,
                            seed=cfg.seed)
    # the same validation windows for every run, seed and optimizer
    val_batches = fixed_batches(corpus.val, seq_len=cfg.data.seq_len, batch_size=cfg.eval.batch_size,
                                n_batches=cfg.eval.val_batches, seed=0)

    if ckpt is not None and ckpt_path is not None:
        _check_resumable(ckpt, config_to_dict(cfg), corpus.content_hash, ckpt_path)
        try:
            par.load_state_dicts(model, optimizer, ckpt["model"], ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            sampler.load_state_dict(ckpt["sampler"])
        except (KeyError, ValueError, RuntimeError) as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"checkpoint {ckpt_path} does not fit this run: {first_line}") from None
        _set_rng_state(ckpt["rng"], device)
    return Run(cfg, device, corpus, model, optimizer, scheduler, sampler, val_batches, ckpt, par)


def train(cfg: RunConfig, *, resume: bool = False, log: Log = _stderr) -> dict[str, Any] | None:
    """Train (or with ``resume``, continue) the run ``cfg`` describes.

    Writes ``config.json``, ``metrics.jsonl``, checkpoints and, at the end, ``summary.json`` under
    ``cfg.output.out_dir``. Returns the summary, or ``None`` when it stopped at ``train.stop_at_step``
    or on ranks other than 0 of a DDP/FSDP2 run (only rank 0 writes files and logs).
    """
    with _denormals_flushed(cfg.train.flush_denormal):
        return _train(cfg, resume=resume, log=log)


@contextlib.contextmanager
def _denormals_flushed(flush: bool) -> Iterator[None]:
    """Set the CPU's flush-to-zero mode for the run and restore the caller's afterwards (it is process-wide).
    ``torch.set_flush_denormal`` reports whether the CPU supports it; where it does not, nothing changes."""
    if not flush:
        yield
        return
    # torch has no getter: the mode is off unless someone set it, and a probe tells us which
    was_on = bool((torch.tensor([1e-30], dtype=torch.float32) * 1e-10).item() == 0.0)
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(was_on)


def _train(cfg: RunConfig, *, resume: bool, log: Log) -> dict[str, Any] | None:
    run = setup_run(cfg, resume=resume, log=log)
    cfg, device, model, optimizer, scheduler = run.cfg, run.device, run.model, run.optimizer, run.scheduler
    precision, accum, par = cfg.train.precision, cfg.train.grad_accum_steps, run.par
    out = Path(cfg.output.out_dir)
    start = run.checkpoint["step"] if run.checkpoint else 0
    clock = dict(run.checkpoint["clock"]) if run.checkpoint else {"wall_s": 0.0, "train_s": 0.0}
    if par.is_main:  # only rank 0 writes files and prints
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", config_to_dict(cfg))
        metrics = MetricsLog(out / "metrics.jsonl", resume_step=start if resume else None)
    else:
        metrics, log = Muted(), Muted()
    log(f"run: {cfg.preset} / {cfg.optimizer} lr {cfg.optim.lr:g} seed {cfg.seed}: {count_params(model):,} "
        f"params, {cfg.tokens_per_step:,} tokens/step, {cfg.train.steps} steps, {device} {precision}"
        + (f", resuming at step {start}" if resume else "")
        + (f", {cfg.train.parallel} over {par.world_size} ranks" if par.distributed else ""))
    if hasattr(optimizer, "partition"):
        log(str(optimizer.partition))

    def checkpoint(step: int) -> None:
        model_state, optimizer_state = par.state_dicts(model, optimizer)  # full state dicts: every rank gathers
        if par.is_main:
            save_checkpoint(out, step, {
                "model": model_state, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                "sampler": run.sampler.state_dict(), "rng": _rng_state(device), "config": config_to_dict(cfg),
                "corpus_hash": run.corpus.content_hash, "clock": clock,
            }, keep_last=cfg.output.keep_checkpoints)
        par.barrier()  # the checkpoint is on disk before any rank goes on (or exits)

    def eval_row(step: int) -> float:
        val_loss = evaluate(model, run.val_batches, device=device, precision=precision)
        metrics.log({"step": step, "val_loss": val_loss, "val_ppl": perplexity(val_loss)})
        progress.write(f"step {step}: val loss {val_loss:.4f}, ppl {perplexity(val_loss):.2f}")
        return val_loss

    progress = Progress(total=cfg.train.steps, initial=start, every=cfg.train.log_every_steps) \
        if par.is_main else Muted()
    spikes = SpikeDetector(cfg.train.spike_factor) if par.is_main else Muted()
    wall0 = time.perf_counter() - clock["wall_s"]
    window_steps, window_s = 0, 0.0
    model.train()
    for it in range(start, cfg.train.steps):
        # 1) learning rate for this step: the scheduler set it in every param group at the last step
        lr = cfg.optim.lr * scheduler.lr_lambdas[0](it)
        # 2) evaluate and checkpoint; a resumed run did both before its checkpoint was written
        if not (resume and it == start):
            if it % cfg.eval.every_steps == 0:
                eval_row(it)
            if it == cfg.train.stop_at_step or (it > 0 and it % cfg.output.checkpoint_every_steps == 0):
                clock["wall_s"] = time.perf_counter() - wall0
                checkpoint(it)
            if it == cfg.train.stop_at_step:
                progress.close()
                metrics.close()
                log(f"stopped at step {it}: checkpoint in {out}; continue with --resume")
                par.close()
                return None
        t0 = time.perf_counter()
        # 3) forward/backward over micro-batches; each loss is scaled so the grads average over them
        #    (with DDP/FSDP2 each rank takes its rows of the micro-batch and the grads average over ranks)
        loss_sum = torch.zeros((), device=device)
        for _ in range(accum):
            x, y = par.shard_rows(run.sampler.next_batch())
            with _autocast(device, precision):
                loss = _lm_loss(model, x.to(device, non_blocking=True), y.to(device, non_blocking=True))
            (loss / accum).backward()
            loss_sum += loss.detach()
        loss_sum = par.mean(loss_sum)  # the global batch's loss, the same on every rank
        # 4) a non-finite loss never reaches the weights: stop with a checkpoint, or drop the batch
        if not bool(torch.isfinite(loss_sum)):
            metrics.log({"step": it + 1, "nonfinite_loss": True, "batches": [it * accum, (it + 1) * accum - 1]})
            optimizer.zero_grad(set_to_none=True)
            if cfg.train.nonfinite_loss == "stop":
                clock["wall_s"] = time.perf_counter() - wall0
                checkpoint(it)
                progress.close()
                metrics.close()
                raise NonFiniteLossError(f"non-finite training loss at step {it + 1} (micro-batches "
                                         f"{it * accum}..{(it + 1) * accum - 1}); checkpoint of the last good "
                                         f"state (step {it}) in {out}; lower the lr or use --train.nonfinite_loss=skip")
            scheduler.step()
            continue
        spiked_above = spikes.check(float(loss_sum) / accum)
        if spiked_above is not None:
            metrics.log({"step": it + 1, "loss_spike": float(loss_sum) / accum, "loss_average": spiked_above,
                         "batches": [it * accum, (it + 1) * accum - 1]})
            progress.write(f"step {it + 1}: loss spike {float(loss_sum) / accum:.4f} (moving average "
                           f"{spiked_above:.4f}), micro-batches {it * accum}..{(it + 1) * accum - 1}")
        # 5) clip, step, advance the schedule, free the grads
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip_norm or float("inf"))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        # 6) log; .item() synchronises a GPU, so the window's time includes its queued work
        step = it + 1
        logging = step % cfg.train.log_every_steps == 0 or step == cfg.train.steps
        row = {"step": step, "loss": loss_sum.item() / accum, "lr": lr, "grad_norm": par.scalar(grad_norm)} \
            if logging else None
        dt = time.perf_counter() - t0
        clock["train_s"] += dt
        window_steps, window_s = window_steps + 1, window_s + dt
        if row is not None:
            row["tokens_per_s"] = window_steps * cfg.tokens_per_step / window_s
            metrics.log(row)
            progress.update(step, loss=row["loss"], lr=lr, tokens_per_s=row["tokens_per_s"])
            window_steps, window_s = 0, 0.0

    # final evaluation on validation and test, last checkpoint, summary
    step = cfg.train.steps
    if resume and start == step:  # stopped after the final checkpoint: its val row is already logged
        val_loss = evaluate(model, run.val_batches, device=device, precision=precision)
    else:
        val_loss = eval_row(step)
        clock["wall_s"] = time.perf_counter() - wall0
        checkpoint(step)
    test_batches = fixed_batches(run.corpus.test, seq_len=cfg.data.seq_len, batch_size=cfg.eval.batch_size,
                                 n_batches=cfg.eval.test_batches, seed=0)
    test_loss = evaluate(model, test_batches, device=device, precision=precision)
    progress.close()
    metrics.close()
    state = state_nbytes(optimizer)
    summary = {
        "optimizer": cfg.optimizer, "preset": cfg.preset, "seed": cfg.seed, "lr": cfg.optim.lr,
        "steps": step, "tokens": step * cfg.tokens_per_step, "params": count_params(model),
        "val_loss": val_loss, "val_ppl": perplexity(val_loss),
        "test_loss": test_loss, "test_ppl": perplexity(test_loss),
        "state_bytes": state, "state_bytes_by_role": getattr(state, "by_role", None),
        "wall_time_s": time.perf_counter() - wall0, "train_time_s": clock["train_s"],
        "tokens_per_s": step * cfg.tokens_per_step / clock["train_s"],
        "peak_memory_bytes": peak_memory_bytes(device), "device": str(device),
        "device_name": device_name(device), "precision": precision,
        "corpus": {"name": run.corpus.name, "content_hash": run.corpus.content_hash,
                   "vocab_size": run.corpus.vocab_size},
        "torch": torch.__version__,
    }
    if par.distributed:
        summary["parallel"] = {"mode": cfg.train.parallel, "world_size": par.world_size}
    par.close()
    if not par.is_main:
        return None  # rank 0 writes and returns the summary
    write_json(out / "summary.json", summary)
    log(f"done: val loss {val_loss:.4f} (ppl {summary['val_ppl']:.2f}), test loss {test_loss:.4f} "
        f"(ppl {summary['test_ppl']:.2f}), {summary['tokens_per_s']:,.0f} tokens/s; outputs in {out}")
    return summary
