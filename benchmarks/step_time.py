"""Step time of sage-optim's optimizers vs torch AdamW, measured side by side in one run.

Parameters have Llama-130M shapes (hidden 768, 12 layers, intermediate 2048, vocab 32000, untied) by
default; gradients are fixed random tensors, so only ``optimizer.step()`` is timed. Ratios are to
torch's fused AdamW from the same run (these machines are noisy: compare ratios, not milliseconds).

    python benchmarks/step_time.py [--preset llama-130m|llama-1.3b-layer] [--repeats 5] [--device cpu]
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Callable

import torch

import sage_optim as so

PRESETS = {
    # name: (hidden, layers, intermediate, vocab)
    "llama-130m": (768, 12, 2048, 32000),
    "llama-1.3b-layer": (2048, 1, 5461, 32000),
    "tiny": (64, 2, 128, 1000),
}


def llama_named_shapes(hidden: int, layers: int, intermediate: int, vocab: int) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, role) of an untied LlamaForCausalLM, without building the model."""
    out = [("model.embed_tokens.weight", (vocab, hidden), "embedding")]
    for i in range(layers):
        p = f"model.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out.append((f"{p}.self_attn.{proj}.weight", (hidden, hidden), "hidden"))
        out.append((f"{p}.mlp.gate_proj.weight", (intermediate, hidden), "hidden"))
        out.append((f"{p}.mlp.up_proj.weight", (intermediate, hidden), "hidden"))
        out.append((f"{p}.mlp.down_proj.weight", (hidden, intermediate), "hidden"))
        out.append((f"{p}.input_layernorm.weight", (hidden,), "vector"))
        out.append((f"{p}.post_attention_layernorm.weight", (hidden,), "vector"))
    out.append(("model.norm.weight", (hidden,), "vector"))
    out.append(("lm_head.weight", (vocab, hidden), "head"))
    return out


def make_params(shapes, device: str, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    params = []
    for name, shape, role in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=g).mul_(0.02).to(device))
        p.grad = torch.randn(shape, generator=g).to(device)
        params.append((name, p, role))
    return params


def hybrid_groups(params):
    groups = {}
    for name, p, role in params:
        g = groups.setdefault(role, {"params": [], "param_names": [], "role": role,
                                     "rule": "sinkgd" if role == "hidden" else "sage"})
        g["params"].append(p)
        g["param_names"].append(name)
    return list(groups.values())


class NaiveLoopSinkSAGE:
    """The research-code style baseline: a Python loop per parameter, Sinkhorn rewriting the matrix
    every iteration, and the SAGE update with full-size temporaries (clone of the momentum)."""

    def __init__(self, params, lr=2e-3, betas=(0.9, 0.99), eps=1e-8, wd=1e-2, scale=10.0, iters=5):
        self.params, self.lr, self.betas, self.eps, self.wd, self.scale, self.iters = params, lr, betas, eps, wd, scale, iters
        self.state = {}
        self.t = 0

    @torch.no_grad()
    def step(self):
        self.t += 1
        b1, b2 = self.betas
        for _, p, role in self.params:
            g = p.grad
            p.mul_(1 - self.lr * self.wd)
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
            st["S"] = b2 * st["S"] + (1 - b2) * s
            s_hat = st["S"] / (1 - b2**self.t)
            h = torch.minimum(torch.minimum(s_hat.pow(2).mean().sqrt() / (s_hat + self.eps),
                                            s.pow(2).mean().sqrt() / (s + self.eps)), torch.ones_like(s))
            c = (st["m"].clone() * b1 + g * (1 - b1)).sign()
            p.add_(c * h, alpha=-self.lr)
            st["m"] = st["m"] * b2 + g * (1 - b2)


def time_steps(step: Callable[[], None], repeats: int, sync: Callable[[], None]) -> float:
    step()  # warm-up: lazy state, allocator
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llama-130m")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = llama_named_shapes(*PRESETS[args.preset])
    n_params = sum(math.prod(s) for _, s, _ in shapes)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    print(f"# {args.preset}: {n_params / 1e6:.1f}M params, device {args.device}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, median of {args.repeats}")

    cases: list[tuple[str, Callable[[list], object]]] = [
        ("torch AdamW (foreach)", lambda ps: torch.optim.AdamW([p for _, p, _ in ps], lr=1e-4, foreach=True)),
        ("torch AdamW (fused)", lambda ps: torch.optim.AdamW([p for _, p, _ in ps], lr=1e-4, fused=True)),
        ("naive per-parameter loop", lambda ps: NaiveLoopSinkSAGE(ps)),
        ("SinkSAGE (for-loop)", lambda ps: so.SinkSAGE(hybrid_groups(ps), foreach=False)),
        ("SinkSAGE (foreach)", lambda ps: so.SinkSAGE(hybrid_groups(ps), foreach=True)),
        ("SAGE, every param (for-loop)", lambda ps: so.SAGE([p for _, p, _ in ps], foreach=False)),
        ("SAGE, every param (foreach)", lambda ps: so.SAGE([p for _, p, _ in ps], foreach=True)),
        ("SinkGD, hidden only (for-loop)", lambda ps: so.SinkGD([p for _, p, r in ps if r == "hidden"], lr=2e-3, foreach=False)),
        ("SinkGD, hidden only (foreach)", lambda ps: so.SinkGD([p for _, p, r in ps if r == "hidden"], lr=2e-3, foreach=True)),
        ("Lion (foreach)", lambda ps: so.Lion([p for _, p, _ in ps], foreach=True)),
    ]
    results = {}
    for label, build in cases:
        params = make_params(shapes, args.device)
        try:
            opt = build(params)
        except (RuntimeError, ValueError) as exc:  # e.g. fused AdamW unavailable on this device/torch
            print(f"{label:34s}  unavailable: {exc}")
            continue
        results[label] = time_steps(opt.step, args.repeats, sync)
        del opt, params
    base = results.get("torch AdamW (fused)") or results["torch AdamW (foreach)"]
    naive = results.get("naive per-parameter loop")
    print(f"{'optimizer / path':34s} {'ms/step':>9s} {'× fused AdamW':>14s} {'naive loop ÷ this':>18s}")
    for label, ms in results.items():
        speedup = f"{naive / ms:17.2f}×" if naive else ""
        print(f"{label:34s} {ms:9.1f} {ms / base:13.2f}× {speedup}")


if __name__ == "__main__":
    main()
