"""Run outputs: ``metrics.jsonl`` rows, JSON files, the progress display and memory figures."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import torch

from .._atomic import atomic_write_text

__all__ = ["MetricsLog", "Progress", "write_json", "read_metrics", "peak_memory_bytes", "state_nbytes",
           "perplexity", "tensor_nbytes"]


def perplexity(loss: float) -> float:
    """exp(loss), or inf where it would overflow."""
    return math.exp(loss) if loss < 700 else math.inf


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as indented JSON atomically."""
    atomic_write_text(Path(path), json.dumps(data, indent=2) + "\n")


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All rows of a ``metrics.jsonl``."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl``, flushed at every row.

    On resume from step ``k``, rows logged after ``k`` by the interrupted run are dropped first, so
    the file reads as if the run had never stopped.
    """

    def __init__(self, path: str | os.PathLike[str], *, resume_step: int | None = None) -> None:
        self.path = Path(path)
        if resume_step is None:
            self.path.write_text("", encoding="utf-8")
        elif self.path.exists():
            kept = [row for row in read_metrics(self.path) if row["step"] <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(row) + "\n" for row in kept))
        self._file = open(self.path, "a", encoding="utf-8")

    def log(self, row: dict[str, Any]) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class Progress:
    """A tqdm bar (loss, lr, tokens/s, ETA) on a terminal; a plain line every ``every`` steps otherwise."""

    def __init__(self, *, total: int, initial: int, every: int, stream: TextIO | None = None,
                 interactive: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.every = every
        self.total = total
        self.start_step = initial
        self.start_time = time.perf_counter()
        if interactive is None:
            interactive = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.bar = None
        if interactive:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, file=self.stream, unit="step", dynamic_ncols=True)

    def update(self, step: int, *, loss: float, lr: float, tokens_per_s: float) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
            return
        if step % self.every == 0 or step == self.total:
            done = step - self.start_step
            elapsed = time.perf_counter() - self.start_time
            eta = elapsed / done * (self.total - step) if done else 0.0
            print(f"step {step}/{self.total} loss {loss:.4f} lr {lr:.3e} tok/s {tokens_per_s:,.0f} "
                  f"eta {eta:,.0f}s", file=self.stream, flush=True)

    def write(self, message: str) -> None:
        """A line that does not break the bar."""
        if self.bar is not None:
            self.bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this run: CUDA ``max_memory_allocated``, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux


def state_nbytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state: ``optimizer.state_nbytes()`` when it has one (it may carry ``by_role``),
    else the tensors in ``state``."""
    if hasattr(optimizer, "state_nbytes"):
        return optimizer.state_nbytes()
    return _tensor_state_nbytes(optimizer)


def _tensor_state_nbytes(optimizer: torch.optim.Optimizer) -> int:
    """Sum of ``numel * element_size`` over every tensor held in ``optimizer.state`` (any device, meta too)."""
    return sum(tensor_nbytes(per_param) for per_param in optimizer.state.values())


def tensor_nbytes(state: dict[str, Any]) -> int:
    """Bytes of the tensors in one parameter's optimizer state."""
    return sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))


class SpikeDetector:
    """Flags a finite training loss above ``factor`` × its exponential moving average (after ``warmup`` steps).

    Spikes are logged, not acted on: the step still trains (a NaN/Inf loss is ``train.nonfinite_loss``'s job).
    """

    def __init__(self, factor: float | None, *, decay: float = 0.9, warmup: int = 10) -> None:
        self.factor, self.decay, self.warmup = factor, decay, warmup
        self.average: float | None = None
        self.seen = 0

    def check(self, loss: float) -> float | None:
        """Update with this step's loss; return the running average it spiked above, or None."""
        spiked = (self.factor is not None and self.average is not None and self.seen >= self.warmup
                  and loss > self.factor * self.average)
        previous = self.average
        self.average = loss if self.average is None else self.decay * self.average + (1 - self.decay) * loss
        self.seen += 1
        return previous if spiked else None
