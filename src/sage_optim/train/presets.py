"""Presets: functions that return a :class:`RunConfig`.

Paper scale (``llama-*``) follows the SAGE paper's setup (arXiv 2604.07663, §5 of SPEC.md): sequence
length 512, 256 sequences per step (micro-batch 64 × 4 accumulation = 131,072 tokens), 50k steps,
10% linear warmup then cosine to 0, gradient clipping 1.0, weight decay 0.01, untied embeddings,
a 32,000-token vocabulary. The paper did not release its model configs; the shapes are GaLore/APOLLO's
published LLaMA configs where one exists at that size, and otherwise chosen here:

=============  ======  ======  =====  ============  ===========================================
preset         hidden  layers  heads  intermediate  parameters (vocab 32000, untied)
=============  ======  ======  =====  ============  ===========================================
llama-60m         512       8      8          1376   58,073,600   (GaLore 60m)
llama-130m        768      12     12          2048  134,105,856   (GaLore 130m)
llama-270m       1024      16     16          2736  267,158,528   (GaLore 350m's width, 16 layers)
llama-0.6b       1536      18     12          4096  607,968,768   (chosen: 8/3·h SwiGLU, head dim 128)
llama-1.3b       2048      24     32          5461  1,339,082,752 (GaLore 1b)
=============  ======  ======  =====  ============  ===========================================

GaLore's "350m" (h1024, 24 layers) has 368M parameters at vocab 32000; 16 layers of the same width
give 267M, the closest match to the paper's 270M. The counts are checked by ``tests/test_harness.py``.

CPU scale: ``cpu-tiny`` (tests, seconds), ``cpu-demo`` (a few minutes per optimizer on 2 cores) and
``cpu-bench`` (a longer comparison with a fixed 64 × 256-token validation set).
"""
from __future__ import annotations

from typing import Callable

from .config import ConfigError, DataConfig, EvalConfig, ModelConfig, OutputConfig, RunConfig, TrainConfig

__all__ = ["PRESETS", "get_preset", "preset_names"]


def _paper(name: str, *, hidden: int, layers: int, heads: int, intermediate: int) -> RunConfig:
    return RunConfig(
        preset=name,
        model=ModelConfig(hidden_size=hidden, num_layers=layers, num_heads=heads,
                          intermediate_size=intermediate, tie_word_embeddings=False),
        data=DataConfig(tokenizer_vocab_size=32000, seq_len=512),
        train=TrainConfig(steps=50_000, micro_batch_size=64, grad_accum_steps=4, warmup_fraction=0.1,
                          lr_floor_fraction=0.0, grad_clip_norm=1.0, precision="auto", log_every_steps=10),
        eval=EvalConfig(every_steps=1000, batch_size=64, val_batches=16, test_batches=64),
        output=OutputConfig(checkpoint_every_steps=1000, keep_checkpoints=2),
    )


def llama_60m() -> RunConfig:
    return _paper("llama-60m", hidden=512, layers=8, heads=8, intermediate=1376)


def llama_130m() -> RunConfig:
    return _paper("llama-130m", hidden=768, layers=12, heads=12, intermediate=2048)


def llama_270m() -> RunConfig:
    return _paper("llama-270m", hidden=1024, layers=16, heads=16, intermediate=2736)


def llama_0_6b() -> RunConfig:
    return _paper("llama-0.6b", hidden=1536, layers=18, heads=12, intermediate=4096)


def llama_1_3b() -> RunConfig:
    return _paper("llama-1.3b", hidden=2048, layers=24, heads=32, intermediate=5461)


def cpu_tiny() -> RunConfig:
    """For tests: a 58k-parameter model that trains 20 steps in a couple of seconds."""
    return RunConfig(
        preset="cpu-tiny",
        model=ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=88),
        data=DataConfig(tokenizer_vocab_size=512, seq_len=32),
        train=TrainConfig(steps=20, micro_batch_size=4, grad_accum_steps=2, warmup_fraction=0.1,
                          lr_floor_fraction=0.1, grad_clip_norm=1.0, precision="fp32", log_every_steps=5),
        eval=EvalConfig(every_steps=10, batch_size=4, val_batches=2, test_batches=2),
        output=OutputConfig(checkpoint_every_steps=10, keep_checkpoints=2),
    )


def cpu_demo() -> RunConfig:
    """A 2.9M-parameter model, 300 steps of 16 × 256 tokens: a few minutes per optimizer on 2 cores."""
    return RunConfig(
        preset="cpu-demo",
        model=ModelConfig(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=352),
        data=DataConfig(tokenizer_vocab_size=8192, seq_len=256),
        train=TrainConfig(steps=300, micro_batch_size=16, grad_accum_steps=1, warmup_fraction=0.1,
                          lr_floor_fraction=0.1, grad_clip_norm=1.0, precision="fp32", log_every_steps=10),
        eval=EvalConfig(every_steps=50, batch_size=16, val_batches=4, test_batches=8),
        output=OutputConfig(checkpoint_every_steps=100, keep_checkpoints=2),
    )


def cpu_bench() -> RunConfig:
    """A 7.4M-parameter untied model, 1500 steps; validation on a fixed 64 × 256-token set."""
    return RunConfig(
        preset="cpu-bench",
        model=ModelConfig(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=704,
                          tie_word_embeddings=False),
        data=DataConfig(tokenizer_vocab_size=8192, seq_len=256),
        train=TrainConfig(steps=1500, micro_batch_size=16, grad_accum_steps=1, warmup_fraction=0.1,
                          lr_floor_fraction=0.1, grad_clip_norm=1.0, precision="fp32", log_every_steps=25),
        eval=EvalConfig(every_steps=250, batch_size=16, val_batches=4, test_batches=16),
        output=OutputConfig(checkpoint_every_steps=250, keep_checkpoints=2),
    )


PRESETS: dict[str, Callable[[], RunConfig]] = {
    "llama-60m": llama_60m,
    "llama-130m": llama_130m,
    "llama-270m": llama_270m,
    "llama-0.6b": llama_0_6b,
    "llama-1.3b": llama_1_3b,
    "cpu-tiny": cpu_tiny,
    "cpu-demo": cpu_demo,
    "cpu-bench": cpu_bench,
}


def preset_names() -> list[str]:
    return list(PRESETS)


def get_preset(name: str) -> RunConfig:
    """A fresh config for preset ``name`` (each call returns a new object)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()
