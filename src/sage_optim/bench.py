"""``sage-optim bench``: optimizer step time, memory traffic and step temporaries, side by side in one run.

Parameters have Llama shapes (``llama-130m``: hidden 768, 12 layers, intermediate 2048, vocab 32000,
untied; ``llama-1.3b-layer``: one 1.3B decoder layer with its embedding and head); gradients are fixed
random tensors, so only ``optimizer.step()`` is timed. Every number is printed next to torch's fused
AdamW measured in the same process: these machines are noisy, so compare ratios, not milliseconds.

Columns:

* ``ms/step``: median over ``--repeats`` steps after one warm-up step (which builds lazy state); the
  cases share one set of parameters and gradients and take turns, one step each per round.
* ``x fused AdamW`` / ``naive / this``: ratios to torch's fused AdamW and to a research-code-style
  per-parameter loop (Sinkhorn rewriting the matrix every iteration, SAGE with full-size temporaries).
* ``min GB``: the bytes a step must move at the least (AdamW: read θ, g, m, v and write θ, m, v;
  SAGE/Lion: read θ, g, m and write θ, m; SinkGD: read G once per Sinkhorn iteration plus read G and
  read/write θ, SPEC §3), and ``% copy BW``: that over the time, as a share of the bandwidth of a plain
  ``copy_`` measured in the same run (100% = at the memory-bandwidth bound).
* ``peak temps``: the largest total of tensors allocated inside ``step()`` and alive at once (state
  excluded: measured on a later step), and its ratio to the largest parameter.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ._device import device_name

__all__ = ["main", "PeakAllocations", "llama_named_shapes", "SHAPE_PRESETS"]

#: name → (hidden, layers, intermediate, vocab)
SHAPE_PRESETS: dict[str, tuple[int, int, int, int]] = {
    "llama-130m": (768, 12, 2048, 32000),
    "llama-1.3b-layer": (2048, 1, 5461, 32000),
    "tiny": (64, 2, 128, 1000),
}


def llama_named_shapes(hidden: int, layers: int, intermediate: int,
                       vocab: int) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, role) of every parameter of an untied ``LlamaForCausalLM``, without building it."""
    out: list[tuple[str, tuple[int, ...], str]] = [("model.embed_tokens.weight", (vocab, hidden), "embedding")]
    for i in range(layers):
        prefix = f"model.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out.append((f"{prefix}.self_attn.{proj}.weight", (hidden, hidden), "hidden"))
        out.append((f"{prefix}.mlp.gate_proj.weight", (intermediate, hidden), "hidden"))
        out.append((f"{prefix}.mlp.up_proj.weight", (intermediate, hidden), "hidden"))
        out.append((f"{prefix}.mlp.down_proj.weight", (hidden, intermediate), "hidden"))
        out.append((f"{prefix}.input_layernorm.weight", (hidden,), "vector"))
        out.append((f"{prefix}.post_attention_layernorm.weight", (hidden,), "vector"))
    out.append(("model.norm.weight", (hidden,), "vector"))
    out.append(("lm_head.weight", (vocab, hidden), "head"))
    return out


class PeakAllocations(TorchDispatchMode):
    """Tracks the tensors allocated by torch ops inside the ``with`` block: ``peak`` is the largest number
    of bytes alive at once, ``live`` what is still alive. Works on every device (CPU has no allocator stats).

    An op output counts when its storage is new (not a view of, or in-place on, an input); it stops
    counting when its storage is freed, views included.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._tracked: set[int] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in inputs or key in self._tracked or storage.nbytes() == 0:
                continue
            self._tracked.add(key)
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._release, key, storage.nbytes())
        return out

    def _release(self, key: int, nbytes: int) -> None:
        self._tracked.discard(key)
        self.live -= nbytes


def _make_params(shapes: Sequence[tuple[str, tuple[int, ...], str]], device: str,
                 seed: int = 0) -> list[tuple[str, torch.nn.Parameter, str]]:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    params = []
    for name, shape, role in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=gen).mul_(0.02).to(device))
        p.grad = torch.randn(shape, generator=gen).mul_(1e-3).to(device)
        params.append((name, p, role))
    return params


def _hybrid_groups(params: Sequence[tuple[str, torch.nn.Parameter, str]]) -> list[dict[str, Any]]:
    groups: dict[str, dict[str, Any]] = {}
    for name, p, role in params:
        group = groups.setdefault(role, {"params": [], "param_names": [], "role": role,
                                         "rule": "sinkgd" if role == "hidden" else "sage"})
        group["params"].append(p)
        group["param_names"].append(name)
    return list(groups.values())


class NaiveLoopSinkSAGE:
    """The research-code-style baseline: a Python loop per parameter, Sinkhorn rewriting the matrix every
    iteration, and the SAGE update with full-size temporaries (a clone of the momentum)."""

    def __init__(self, params: Sequence[tuple[str, torch.nn.Parameter, str]], lr: float = 2e-3,
                 betas: tuple[float, float] = (0.9, 0.99), eps: float = 1e-8, weight_decay: float = 1e-2,
                 scale: float = 10.0, iters: int = 5) -> None:
        self.params, self.lr, self.betas, self.eps = params, lr, betas, eps
        self.weight_decay, self.scale, self.iters = weight_decay, scale, iters
        self.state: dict[torch.nn.Parameter, dict[str, Tensor]] = {}
        self.t = 0

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        beta1, beta2 = self.betas
        for _, p, role in self.params:
            g = p.grad
            p.mul_(1 - self.lr * self.weight_decay)
            if role == "hidden":
                x = g.clone()
                for _ in range(self.iters):
                    x = x / (x.norm(dim=1, keepdim=True) + self.eps)
                    x = x / (x.norm(dim=0, keepdim=True) + self.eps)
                p.add_(x, alpha=-self.lr * self.scale)
                continue
            st = self.state.setdefault(p, {"m": torch.zeros_like(p),
                                           "S": torch.zeros(p.shape[1:] if p.ndim >= 2 else p.shape, device=p.device)})
            s = g.abs().mean(0) if g.ndim >= 2 else g.abs()
            st["S"] = beta2 * st["S"] + (1 - beta2) * s
            s_hat = st["S"] / (1 - beta2**self.t)
            h = torch.minimum(torch.minimum(s_hat.pow(2).mean().sqrt() / (s_hat + self.eps),
                                            s.pow(2).mean().sqrt() / (s + self.eps)), torch.ones_like(s))
            c = (st["m"].clone() * beta1 + g * (1 - beta1)).sign()
            p.add_(c * h, alpha=-self.lr)
            st["m"] = st["m"] * beta2 + g * (1 - beta2)


@dataclass
class Case:
    label: str
    build: Callable[[list], Any]
    #: full-tensor passes a step must make, per role: (hidden, other); each pass moves 4 B per fp32 element
    min_passes: tuple[float, float]
    #: torch.compile refuses to run under a dispatch mode, so compiled steps cannot be tracked
    track_peak: bool = True


def _cases(iters: int, with_compile: bool, with_fused: bool = False) -> list[Case]:
    import sage_optim as so

    sinkgd_passes = iters + 3  # SPEC §3: one read of G per iteration, then read G, read/write θ
    adamw, sage, lion = 7, 5, 5

    def hidden(ps: list) -> list:
        return [p for _, p, r in ps if r == "hidden"]

    cases = [
        Case("torch AdamW (foreach)", lambda ps: torch.optim.AdamW([p for _, p, _ in ps], lr=1e-4, foreach=True),
             (adamw, adamw)),
        Case("torch AdamW (fused)", lambda ps: torch.optim.AdamW([p for _, p, _ in ps], lr=1e-4, fused=True),
             (adamw, adamw)),
        Case("naive per-parameter loop", lambda ps: NaiveLoopSinkSAGE(ps), (sinkgd_passes, sage)),
        Case("SinkSAGE (for-loop)", lambda ps: so.SinkSAGE(_hybrid_groups(ps), foreach=False, fused=False), (sinkgd_passes, sage)),
        Case("SinkSAGE (foreach)", lambda ps: so.SinkSAGE(_hybrid_groups(ps), foreach=True, fused=False), (sinkgd_passes, sage)),
        Case("SAGE, every param (for-loop)", lambda ps: so.SAGE([p for _, p, _ in ps], foreach=False, fused=False), (sage, sage)),
        Case("SAGE, every param (foreach)", lambda ps: so.SAGE([p for _, p, _ in ps], foreach=True, fused=False), (sage, sage)),
        Case("SinkGD, hidden only (for-loop)", lambda ps: so.SinkGD(hidden(ps), lr=2e-3, foreach=False, fused=False),
             (sinkgd_passes, 0)),
        Case("SinkGD, hidden only (foreach)", lambda ps: so.SinkGD(hidden(ps), lr=2e-3, foreach=True, fused=False),
             (sinkgd_passes, 0)),
        Case("Lion (for-loop)", lambda ps: so.Lion([p for _, p, _ in ps], foreach=False, fused=False), (lion, lion)),
    ]
    if with_compile:
        cases.append(Case("SinkSAGE (compile)", lambda ps: so.SinkSAGE(_hybrid_groups(ps), compile=True),
                          (sinkgd_passes, sage), track_peak=False))
    if with_fused:
        cases += [
            Case("SinkSAGE (fused)", lambda ps: so.SinkSAGE(_hybrid_groups(ps), fused=True), (sinkgd_passes, sage)),
            Case("SAGE, every param (fused)", lambda ps: so.SAGE([p for _, p, _ in ps], fused=True), (sage, sage)),
            Case("SinkGD, hidden only (fused)", lambda ps: so.SinkGD(hidden(ps), lr=2e-3, fused=True),
                 (sinkgd_passes, 0)),
            Case("Lion (fused)", lambda ps: so.Lion([p for _, p, _ in ps], fused=True), (lion, lion)),
            # 8-bit momentum: m moves 1 byte each way instead of 4 (its per-block decode/encode is torch ops)
            Case("SinkSAGE int8 momentum (fused)", lambda ps: so.SinkSAGE(_hybrid_groups(ps), fused=True,
                                                                          state_dtype=torch.int8),
                 (sinkgd_passes, sage - 1.5)),
        ]
    return cases


def _median_ms(step: Callable[[], Any], repeats: int, sync: Callable[[], None]) -> float:
    step()  # warm-up: lazy state, allocator, compilation
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def copy_bandwidth(numel: int, device: str, repeats: int, sync: Callable[[], None]) -> float:
    """Bytes per second of ``dst.copy_(src)`` (read + write counted) on ``numel`` float32 elements."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), repeats, sync)
    return 2 * src.nbytes / (ms / 1e3)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="sage-optim bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(SHAPE_PRESETS), default="llama-130m",
                        help="parameter shapes (default: llama-130m)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per case (median; default 5)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    parser.add_argument("--only", nargs="*", default=None, metavar="LABEL",
                        help="run only the cases whose label contains one of these substrings")
    parser.add_argument("--compile", action="store_true", help="also time SinkSAGE(compile=True)")
    parser.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the fused=True paths: C kernels on CPU, Triton on CUDA (default: on)")
    parser.add_argument("--no-peak", action="store_true", help="skip measuring step temporaries")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be ≥ 1, got {args.repeats}")
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = _cases(iters=5, with_compile=args.compile, with_fused=args.fused)
    shapes = llama_named_shapes(*SHAPE_PRESETS[args.preset])
    numel = {"hidden": sum(math.prod(s) for _, s, r in shapes if r == "hidden")}
    numel["other"] = sum(math.prod(s) for _, s, r in shapes) - numel["hidden"]
    largest = max(math.prod(s) for _, s, _ in shapes) * 4
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    bandwidth = copy_bandwidth(min(numel["hidden"] + numel["other"], 1 << 26), args.device, args.repeats, sync)
    print(f"# {args.preset}: {sum(numel.values()) / 1e6:.1f}M params, device {args.device} "
          f"({device_name(args.device)}), torch {torch.__version__}, median of {args.repeats}; "
          f"copy bandwidth {bandwidth / 1e9:.1f} GB/s")

    # One set of parameters and gradients serves every case (each optimizer keeps only its own state), and
    # the cases take turns step by step: drift on a shared machine then hits them all alike.
    params = _make_params(shapes, args.device)
    optimizers: dict[str, Any] = {}
    for case in cases:
        if args.only and not any(s in case.label for s in args.only):
            continue
        try:
            optimizers[case.label] = case.build(params)
            optimizers[case.label].step()  # warm-up: lazy state, allocator, compilation
        except (RuntimeError, ValueError, ImportError) as exc:  # e.g. fused AdamW or Triton unavailable here
            print(f"{case.label:32s}  unavailable: {exc}")
            optimizers.pop(case.label, None)
    sync()
    times: dict[str, list[float]] = {label: [] for label in optimizers}
    for _ in range(args.repeats):
        for label, opt in optimizers.items():
            start = time.perf_counter()
            opt.step()
            sync()
            times[label].append(time.perf_counter() - start)
    results: dict[str, tuple[float, float, Optional[int]]] = {}
    for case in cases:
        if case.label not in optimizers:
            continue
        peak = None
        if not args.no_peak and case.track_peak:
            with PeakAllocations() as tracker:
                optimizers[case.label].step()
            peak = tracker.peak
        min_bytes = 4 * (case.min_passes[0] * numel["hidden"] + case.min_passes[1] * numel["other"])
        results[case.label] = (statistics.median(times[case.label]) * 1e3, min_bytes, peak)

    base_label = "torch AdamW (fused)" if "torch AdamW (fused)" in results else "torch AdamW (foreach)"
    base = results[base_label][0] if base_label in results else None
    naive = results.get("naive per-parameter loop", (None,))[0]
    print(f"{'optimizer / path':32s} {'ms/step':>8s} {'x fused AdamW':>13s} {'naive / this':>12s} "
          f"{'min GB':>7s} {'% copy BW':>9s} {'peak temps MB':>13s} {'/ largest param':>15s}")
    for label, (ms, min_bytes, peak) in results.items():
        ratio = f"{ms / base:12.2f}x" if base else f"{'':>13s}"
        speedup = f"{naive / ms:11.2f}x" if naive else f"{'':>12s}"
        share = 100 * (min_bytes / (ms / 1e3)) / bandwidth
        temps = f"{peak / 2**20:13.1f} {peak / largest:15.2f}" if peak is not None else f"{'n/a':>13s}"
        print(f"{label:32s} {ms:8.2f} {ratio} {speedup} {min_bytes / 1e9:7.2f} {share:9.0f} {temps}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
