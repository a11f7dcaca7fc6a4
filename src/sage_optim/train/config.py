"""Typed run configuration: dataclass sections, a config file, and ``--section.key=value`` overrides.

A run is described by one :class:`RunConfig`. Presets (``presets.py``) are functions that return one;
a JSON or TOML file and command-line overrides then change individual fields. Every value is checked
against the field's type, and an unknown section or key is an error that names it (nanoGPT's
configurator checks, without its ``exec``).

Precedence, lowest first: the preset, then the config file, then the flags.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

__all__ = [
    "ConfigError",
    "ModelConfig",
    "DataConfig",
    "OptimConfig",
    "TrainConfig",
    "EvalConfig",
    "OutputConfig",
    "RunConfig",
    "SECTIONS",
    "apply_mapping",
    "apply_overrides",
    "load_config_file",
    "config_to_dict",
    "parse_value",
    "validate",
]

Precision = Literal["fp32", "bf16", "auto"]
NonfiniteLoss = Literal["stop", "skip"]
ParallelMode = Literal["none", "ddp", "fsdp"]


class ConfigError(ValueError):
    """A config file, key or value the user gave is wrong; the message names it."""


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """A LlamaForCausalLM (RMSNorm, SwiGLU, RoPE)."""

    hidden_size: int = 512
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int | None = None
    """Grouped-query attention; ``None`` means as many as ``num_heads``."""
    intermediate_size: int = 1376
    vocab_size: int | None = None
    """``None``: the tokenizer's vocabulary rounded up to a multiple of 64."""
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    init_std: float = 0.02


@dataclass(kw_only=True, slots=True)
class DataConfig:
    source: str | None = None
    """``None``/"default", "embedded", "full", or a path (.txt, directory, .jsonl(.gz), .bin)."""
    tokenizer_vocab_size: int = 8192
    """Vocabulary of the BPE tokenizer trained on (or loaded for) the corpus."""
    seq_len: int = 512
    cache_dir: str | None = None


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    lr: float | None = None
    """Peak learning rate; ``None`` uses the registry's default for the optimizer."""
    weight_decay: float = 0.01
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for ``create_optimizer`` (the CLI's ``--opt.KEY=VALUE``)."""


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    steps: int = 50_000
    """Optimizer steps; the schedule spans all of them."""
    micro_batch_size: int = 64
    grad_accum_steps: int = 4
    warmup_fraction: float = 0.1
    """Linear warmup over this fraction of ``steps``."""
    lr_floor_fraction: float = 0.0
    """The cosine decays to this fraction of the peak learning rate."""
    grad_clip_norm: float | None = 1.0
    precision: Precision = "auto"
    device: str = "auto"
    """"auto" (CUDA when available, else CPU), "cpu", "cuda", "cuda:1", ..."""
    log_every_steps: int = 10
    stop_at_step: int | None = None
    """Save a checkpoint and exit once this many steps are done (the schedule still spans ``steps``)."""
    spike_factor: float | None = 3.0
    """Log a "loss_spike" row when a step's loss exceeds this multiple of its moving average (None: off)."""
    nonfinite_loss: NonfiniteLoss = "stop"
    """A NaN/Inf training loss: "stop" logs it, saves a checkpoint of the last good state and exits (code 1);
    "skip" logs it and drops the batch (no optimizer update; the schedule moves on)."""
    flush_denormal: bool = False
    """On CPU, flush subnormal floats (below ~1.2e-38 in float32) to zero while training: x86 handles them
    far slower, and a run whose activations underflow (SinkGD-hybrid on cpu-bench, |w| ~ 60) trained 3.3x
    faster with it. Off by default: that same run, flushed, collapsed to a dead network (loss = ln V,
    zero gradients) at step ~370, where the unflushed one kept training (docs/harness.md). No effect on GPUs."""
    parallel: ParallelMode = "none"
    """Data parallelism under torchrun: "ddp" (DistributedDataParallel) or "fsdp" (FSDP2 ``fully_shard``);
    each rank takes its share of every micro-batch's rows, so ``micro_batch_size`` is the global one."""


@dataclass(kw_only=True, slots=True)
class EvalConfig:
    every_steps: int = 1000
    batch_size: int = 64
    val_batches: int = 16
    """Fixed validation batches (the same ones at every evaluation)."""
    test_batches: int = 64


@dataclass(kw_only=True, slots=True)
class OutputConfig:
    out_dir: str | None = None
    """``None``: ``runs/<preset>/<optimizer>-seed<seed>``."""
    checkpoint_every_steps: int = 1000
    keep_checkpoints: int = 2


@dataclass(kw_only=True, slots=True)
class RunConfig:
    preset: str = "custom"
    optimizer: str = "adamw"
    seed: int = 42
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    @property
    def tokens_per_step(self) -> int:
        return self.train.micro_batch_size * self.train.grad_accum_steps * self.data.seq_len

    @property
    def warmup_steps(self) -> int:
        return int(round(self.train.warmup_fraction * self.train.steps))


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "output": OutputConfig,
}
_TOP_LEVEL = ("preset", "optimizer", "seed")


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """The config as plain JSON-able data (top-level keys ``preset``, ``optimizer``, ``seed``, then sections)."""
    return dataclasses.asdict(cfg)


# ---------------------------------------------------------------------------------------------
# value parsing and checking


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _unknown(kind: str, name: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(known)}"
    return ConfigError(f"unknown config {kind} {name!r}{hint}")


def _check_value(key: str, value: Any, tp: Any) -> Any:
    """Check an already-typed value (from JSON/TOML) against a field type; return it, normalised."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_value(key, value, option)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: expected one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table/object, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"config field {key} has an unsupported type {tp!r}")  # a bug in this module


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(t) for t in typing.get_args(tp))
    if origin is Literal:
        return "one of " + "/".join(map(str, typing.get_args(tp)))
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string",
            type(None): "none"}.get(tp, _type_name(tp))


def parse_value(key: str, text: str, tp: Any) -> Any:
    """Parse a command-line string into a value of the field type ``tp``; errors name ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if type(None) in options and text.strip().lower() in ("none", "null"):
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return parse_value(key, text, option)
            except ConfigError:
                pass
        raise ConfigError(f"--{key}: expected {_describe(tp)}, got {text!r}")
    if origin is Literal:
        return _check_value(f"--{key}", text, tp)
    if origin is dict or tp is dict:
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            raise ConfigError(f"--{key}: expected a JSON object, got {text!r}") from None
        return _check_value(f"--{key}", value, tp)
    if tp is bool:
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"--{key}: expected true or false, got {text!r}")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            pass
        try:
            value = float(text)  # accept "1e3" when it is a whole number; reject "1.5"
        except ValueError:
            value = 0.5
        if not value.is_integer():
            raise ConfigError(f"--{key}: expected an integer, got {text!r}")
        return int(value)
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"--{key}: expected a number, got {text!r}") from None
    if tp is str:
        return text
    raise TypeError(f"config field {key} has an unsupported type {tp!r}")


# ---------------------------------------------------------------------------------------------
# applying a mapping (config file) and overrides (flags)


def apply_mapping(cfg: RunConfig, data: Mapping[str, Any], *, origin: str = "config") -> RunConfig:
    """Set fields from nested data ``{"seed": 1, "train": {"steps": 10}}`` (a parsed file), in place."""
    hints = _hints(RunConfig)
    for name, value in data.items():
        if name in _TOP_LEVEL:
            setattr(cfg, name, _check_value(f"{origin}: {name}", value, hints[name]))
        elif name in SECTIONS:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{origin}: section {name!r} must be a table/object, got {value!r}")
            section = getattr(cfg, name)
            section_hints = _hints(type(section))
            for key, item in value.items():
                if key not in section_hints:
                    raise _unknown("key", f"{name}.{key}",
                                   [f"{name}.{k}" for k in section_hints])
                setattr(section, key, _check_value(f"{origin}: {name}.{key}", item, section_hints[key]))
        else:
            raise _unknown("section or key", name, [*_TOP_LEVEL, *SECTIONS])
    return cfg


def apply_overrides(cfg: RunConfig, overrides: Mapping[str, str]) -> RunConfig:
    """Set fields from ``{"train.steps": "20", "seed": "1"}`` (strings from the command line), in place."""
    for dotted, text in overrides.items():
        if "." not in dotted:
            if dotted not in _TOP_LEVEL:
                raise _unknown("key", dotted, [*_TOP_LEVEL, *(f"{s}.*" for s in SECTIONS)])
            setattr(cfg, dotted, parse_value(dotted, text, _hints(RunConfig)[dotted]))
            continue
        section_name, key = dotted.split(".", 1)
        if section_name not in SECTIONS:
            raise _unknown("section", section_name, list(SECTIONS))
        section = getattr(cfg, section_name)
        section_hints = _hints(type(section))
        if key not in section_hints:
            raise _unknown("key", dotted, [f"{section_name}.{k}" for k in section_hints])
        setattr(section, key, parse_value(dotted, text, section_hints[key]))
    return cfg


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a ``.json`` or ``.toml`` config file into nested data (checked later by :func:`apply_mapping`)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    if path.suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            raise ConfigError(f"reading {path} needs Python 3.11+ (tomllib); use a .json config file") from None
        try:
            return tomllib.loads(raw.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a JSON object, got {type(data).__name__}")
    return data


def validate(cfg: RunConfig) -> RunConfig:
    """Cross-field checks that a single field's type cannot express."""
    def positive(key: str, value: int | float | None) -> None:
        if value is not None and value <= 0:
            raise ConfigError(f"{key} must be positive, got {value!r}")

    positive("train.steps", cfg.train.steps)
    positive("train.micro_batch_size", cfg.train.micro_batch_size)
    positive("train.grad_accum_steps", cfg.train.grad_accum_steps)
    positive("train.log_every_steps", cfg.train.log_every_steps)
    positive("train.grad_clip_norm", cfg.train.grad_clip_norm)
    positive("data.seq_len", cfg.data.seq_len)
    positive("eval.every_steps", cfg.eval.every_steps)
    positive("eval.batch_size", cfg.eval.batch_size)
    positive("eval.val_batches", cfg.eval.val_batches)
    positive("eval.test_batches", cfg.eval.test_batches)
    positive("output.checkpoint_every_steps", cfg.output.checkpoint_every_steps)
    positive("output.keep_checkpoints", cfg.output.keep_checkpoints)
    positive("optim.lr", cfg.optim.lr)
    if not 0.0 <= cfg.train.warmup_fraction < 1.0:
        raise ConfigError(f"train.warmup_fraction must be in [0, 1), got {cfg.train.warmup_fraction!r}")
    if not 0.0 <= cfg.train.lr_floor_fraction <= 1.0:
        raise ConfigError(f"train.lr_floor_fraction must be in [0, 1], got {cfg.train.lr_floor_fraction!r}")
    if cfg.optim.weight_decay < 0:
        raise ConfigError(f"optim.weight_decay must be >= 0, got {cfg.optim.weight_decay!r}")
    if cfg.train.spike_factor is not None and not cfg.train.spike_factor > 1.0:
        raise ConfigError(f"train.spike_factor must be > 1 or none, got {cfg.train.spike_factor!r}")
    stop = cfg.train.stop_at_step
    if stop is not None and not 0 < stop <= cfg.train.steps:
        raise ConfigError(f"train.stop_at_step must be in 1..{cfg.train.steps} (train.steps), got {stop}")
    if cfg.model.hidden_size % cfg.model.num_heads:
        raise ConfigError(f"model.hidden_size ({cfg.model.hidden_size}) must be a multiple of "
                          f"model.num_heads ({cfg.model.num_heads})")
    return cfg
