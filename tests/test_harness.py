"""The training harness pieces: config, presets, model, schedule, checkpoints, metrics, loop."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from sage_optim.train import checkpoint as ckpt
from sage_optim.train.config import (
    ConfigError,
    RunConfig,
    apply_mapping,
    apply_overrides,
    config_to_dict,
    load_config_file,
    validate,
)
from sage_optim.train.loop import resolve_precision, train
from sage_optim.train.metrics import MetricsLog, Progress, read_metrics, state_nbytes
from sage_optim.train.model import build_meta_model, build_model, count_params, round_vocab
from sage_optim.train.presets import PRESETS, get_preset
from sage_optim.train.schedule import WarmupCosine, warmup_cosine_scheduler

FIXTURE = Path(__file__).parent / "fixtures" / "cc0-slice.jsonl.gz"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("corpus-cache")


def tiny_config(out: Path, cache_dir: Path, **train: object) -> RunConfig:
    cfg = get_preset("cpu-tiny")
    cfg.data.source = str(FIXTURE)
    cfg.data.cache_dir = str(cache_dir)
    cfg.output.out_dir = str(out)
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


# ---------------------------------------------------------------------------------------------
# config


def test_overrides_are_typed_and_unknown_keys_are_errors() -> None:
    cfg = get_preset("cpu-tiny")
    apply_overrides(cfg, {"train.steps": "7", "optim.lr": "3e-4", "model.tie_word_embeddings": "true",
                          "train.stop_at_step": "none", "train.precision": "bf16", "seed": "5"})
    assert (cfg.train.steps, cfg.optim.lr, cfg.model.tie_word_embeddings) == (7, 3e-4, True)
    assert cfg.train.stop_at_step is None and cfg.train.precision == "bf16" and cfg.seed == 5
    with pytest.raises(ConfigError, match=r"unknown config key 'train.stpes'; did you mean 'train.steps'"):
        apply_overrides(cfg, {"train.stpes": "3"})
    with pytest.raises(ConfigError, match=r"unknown config section 'trian'"):
        apply_overrides(cfg, {"trian.steps": "3"})
    with pytest.raises(ConfigError, match=r"--train.steps: expected an integer, got '1.5'"):
        apply_overrides(cfg, {"train.steps": "1.5"})
    with pytest.raises(ConfigError, match=r"--train.precision: expected one of"):
        apply_overrides(cfg, {"train.precision": "fp16"})
    with pytest.raises(ConfigError, match=r"--model.tie_word_embeddings: expected true or false"):
        apply_overrides(cfg, {"model.tie_word_embeddings": "maybe"})


def test_config_file_json_and_toml(tmp_path: Path) -> None:
    (tmp_path / "run.toml").write_text('seed = 3\n[train]\nsteps = 9\nwarmup_fraction = 0\n')
    cfg = apply_mapping(get_preset("cpu-tiny"), load_config_file(tmp_path / "run.toml"))
    assert (cfg.seed, cfg.train.steps, cfg.train.warmup_fraction) == (3, 9, 0.0)
    (tmp_path / "bad.json").write_text(json.dumps({"train": {"steps": "many"}}))
    with pytest.raises(ConfigError, match=r"train.steps: expected an integer, got 'many'"):
        apply_mapping(get_preset("cpu-tiny"), load_config_file(tmp_path / "bad.json"))
    (tmp_path / "unknown.json").write_text(json.dumps({"model": {"hiden_size": 8}}))
    with pytest.raises(ConfigError, match=r"unknown config key 'model.hiden_size'"):
        apply_mapping(get_preset("cpu-tiny"), load_config_file(tmp_path / "unknown.json"))
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ConfigError, match=r"not valid JSON"):
        load_config_file(tmp_path / "broken.json")


def test_resolved_config_round_trips_through_a_config_file(tmp_path: Path) -> None:
    cfg = get_preset("cpu-bench")
    (tmp_path / "config.json").write_text(json.dumps(config_to_dict(cfg)))
    again = apply_mapping(RunConfig(), load_config_file(tmp_path / "config.json"))
    assert again == cfg


def test_cross_field_validation_names_the_key() -> None:
    cfg = get_preset("cpu-tiny")
    cfg.train.stop_at_step = 100
    with pytest.raises(ConfigError, match=r"train.stop_at_step must be in 1..20"):
        validate(cfg)
    cfg = get_preset("cpu-tiny")
    cfg.train.warmup_fraction = 1.0
    with pytest.raises(ConfigError, match=r"train.warmup_fraction"):
        validate(cfg)


# ---------------------------------------------------------------------------------------------
# presets and model


@pytest.mark.parametrize("name, params", [
    ("llama-60m", 58_073_600), ("llama-130m", 134_105_856), ("llama-270m", 267_158_528),
    ("llama-0.6b", 607_968_768), ("llama-1.3b", 1_339_082_752),
])
def test_paper_presets_have_the_documented_parameter_counts(name: str, params: int) -> None:
    cfg = validate(get_preset(name))
    assert cfg.tokens_per_step == 256 * 512 and cfg.train.steps == 50_000 and cfg.warmup_steps == 5000
    model = build_meta_model(cfg.model, vocab_size=round_vocab(cfg.data.tokenizer_vocab_size),
                             max_seq_len=cfg.data.seq_len)
    assert count_params(model) == params


def test_every_preset_is_valid_and_fresh() -> None:
    for name in PRESETS:
        assert validate(get_preset(name)).preset == name
    a, b = get_preset("cpu-tiny"), get_preset("cpu-tiny")
    a.train.steps = 1
    assert b.train.steps == 20
    with pytest.raises(ConfigError, match="unknown preset"):
        get_preset("llama-7b")


def test_model_is_a_llama_with_rounded_vocab_and_optional_tying() -> None:
    cfg = get_preset("cpu-tiny")
    assert round_vocab(500) == 512 and round_vocab(512) == 512 and round_vocab(513) == 576
    untied = build_model(cfg.model, vocab_size=512, max_seq_len=32)
    assert type(untied).__name__ == "LlamaForCausalLM"
    assert untied.get_output_embeddings().weight is not untied.get_input_embeddings().weight
    cfg.model.tie_word_embeddings = True
    tied = build_model(cfg.model, vocab_size=512, max_seq_len=32)
    assert tied.get_output_embeddings().weight is tied.get_input_embeddings().weight
    assert count_params(untied) - count_params(tied) == 512 * 32


# ---------------------------------------------------------------------------------------------
# schedule


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_the_floor() -> None:
    f = WarmupCosine(warmup_steps=10, total_steps=110, floor_fraction=0.1)
    assert [f(s) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    decay = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert WarmupCosine(0, 10, 0.0)(0) == 1.0


def test_scheduler_scales_every_group_and_round_trips_its_state() -> None:
    p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [p], "lr": 1.0}, {"params": [q], "lr": 0.5}])
    sched = warmup_cosine_scheduler(opt, warmup_steps=4, total_steps=20, floor_fraction=0.0)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.25, 0.125])
    for _ in range(7):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2 = torch.optim.SGD([{"params": [p], "lr": 1.0}, {"params": [q], "lr": 0.5}])
    sched2 = warmup_cosine_scheduler(opt2, warmup_steps=4, total_steps=20, floor_fraction=0.0)
    sched2.load_state_dict(state)
    opt2.step()
    sched2.step()
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
    assert math.isclose(opt.param_groups[0]["lr"], WarmupCosine(4, 20)(8))


# ---------------------------------------------------------------------------------------------
# checkpoints


def _payload() -> dict[str, object]:
    return {"model": {"w": torch.ones(3)}, "optimizer": {}, "scheduler": {}, "sampler": {}, "rng": {},
            "config": {}}


def test_checkpoints_are_atomic_and_only_the_last_k_are_kept(tmp_path: Path) -> None:
    for step in (10, 20, 30):
        ckpt.save_checkpoint(tmp_path, step, _payload(), keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["ckpt-00000020.pt", "ckpt-00000030.pt"]
    assert not list(tmp_path.glob(".*tmp*"))
    data = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))
    assert data["step"] == 30 and torch.equal(data["model"]["w"], torch.ones(3))


def test_numpy_rng_state_survives_a_weights_only_checkpoint(tmp_path: Path) -> None:
    import numpy as np

    np.random.seed(3)
    payload = {**_payload(), "rng": {"numpy": np.random.get_state()}}
    path = ckpt.save_checkpoint(tmp_path, 1, payload)
    expected = np.random.rand(3)
    np.random.set_state(ckpt.load_checkpoint(path)["rng"]["numpy"])
    assert np.array_equal(np.random.rand(3), expected)


def test_truncated_corrupt_or_foreign_checkpoints_give_one_line_errors(tmp_path: Path) -> None:
    good = ckpt.save_checkpoint(tmp_path, 5, _payload())
    data = good.read_bytes()
    truncated = tmp_path / "ckpt-00000006.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match=r"unreadable \(truncated or corrupt") as info:
        ckpt.load_checkpoint(truncated)
    assert "\n" not in str(info.value)
    garbage = tmp_path / "ckpt-00000007.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ckpt.CheckpointError, match=r"unreadable"):
        ckpt.load_checkpoint(garbage)
    flipped = tmp_path / "ckpt-00000008.pt"
    payload = _payload()
    payload["model"] = {"w": torch.ones(1000)}
    raw = bytearray(ckpt.save_checkpoint(tmp_path / "other", 8, payload).read_bytes())
    at = raw.find(torch.ones(4).numpy().tobytes()) + 400
    raw[at:at + 4] = torch.full((1,), 2.0).numpy().tobytes()  # still a valid zip: torch alone loads it
    flipped.write_bytes(raw)
    with pytest.raises(ckpt.CheckpointError, match=r"corrupt \(tensor checksum mismatch\)"):
        ckpt.load_checkpoint(flipped)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(1)}, foreign)
    with pytest.raises(ckpt.CheckpointError, match=r"not a sage-optim checkpoint"):
        ckpt.load_checkpoint(foreign)
    assert ckpt.load_checkpoint(good)["step"] == 5  # the good one is untouched


# ---------------------------------------------------------------------------------------------
# metrics


def test_metrics_log_drops_rows_after_the_resume_step(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "m.jsonl")
    for step in (1, 2, 3, 4):
        log.log({"step": step, "loss": float(step)})
    log.close()
    log = MetricsLog(tmp_path / "m.jsonl", resume_step=2)
    log.log({"step": 3, "loss": 30.0})
    log.close()
    assert [r["loss"] for r in read_metrics(tmp_path / "m.jsonl")] == [1.0, 2.0, 30.0]


def test_progress_is_a_bar_on_a_terminal_and_plain_lines_otherwise() -> None:
    import io

    plain = io.StringIO()
    progress = Progress(total=10, initial=0, every=5, stream=plain, interactive=False)
    for step in range(1, 11):
        progress.update(step, loss=1.0, lr=1e-3, tokens_per_s=100.0)
    progress.write("eval line")
    progress.close()
    lines = plain.getvalue().splitlines()
    assert [line.split()[1] for line in lines[:2]] == ["5/10", "10/10"] and lines[2] == "eval line"
    terminal = io.StringIO()
    progress = Progress(total=10, initial=0, every=5, stream=terminal, interactive=True)
    progress.update(5, loss=1.25, lr=1e-3, tokens_per_s=100.0)
    progress.write("eval line")
    progress.close()
    assert "loss=1.2500" in terminal.getvalue() and "eval line" in terminal.getvalue()


def test_state_nbytes_counts_tensor_state_of_any_optimizer() -> None:
    p = torch.nn.Parameter(torch.zeros(4, 3))
    opt = torch.optim.AdamW([p])
    assert state_nbytes(opt) == 0
    p.grad = torch.ones_like(p)
    opt.step()
    assert state_nbytes(opt) == 2 * 12 * 4 + 4  # exp_avg, exp_avg_sq, a float32 step


def test_auto_precision_is_bf16_only_with_hardware_support() -> None:
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    assert resolve_precision("auto", torch.device("cpu")) in ("fp32", "bf16")


# ---------------------------------------------------------------------------------------------
# the loop


def test_training_is_deterministic_given_the_seed(tmp_path: Path, cache_dir: Path) -> None:
    log = lambda message: None  # noqa: E731
    a = train(tiny_config(tmp_path / "a", cache_dir, steps=6, log_every_steps=1), log=log)
    b = train(tiny_config(tmp_path / "b", cache_dir, steps=6, log_every_steps=1), log=log)
    losses = [[r["loss"] for r in read_metrics(tmp_path / d / "metrics.jsonl") if "loss" in r] for d in "ab"]
    assert len(losses[0]) == 6 and losses[0] == losses[1]
    assert a is not None and b is not None and a["val_loss"] == b["val_loss"]
    assert math.isfinite(a["val_loss"]) and math.isfinite(a["test_loss"])


def _flushes_denormals() -> bool:
    return bool((torch.tensor([1e-30], dtype=torch.float32) * 1e-10).item() == 0.0)


@pytest.mark.parametrize("flush", [True, False])
def test_cpu_training_flushes_denormals_only_while_it_runs(tmp_path: Path, cache_dir: Path, flush: bool) -> None:
    seen: list[bool] = []
    assert not _flushes_denormals()
    train(tiny_config(tmp_path, cache_dir, steps=2, flush_denormal=flush), log=lambda m: seen.append(_flushes_denormals()))
    assert seen and all(s == flush for s in seen)
    assert not _flushes_denormals()  # process-wide mode restored for the caller


def test_bf16_autocast_trains_with_fp32_master_weights(tmp_path: Path, cache_dir: Path) -> None:
    summary = train(tiny_config(tmp_path, cache_dir, steps=3, precision="bf16"), log=lambda m: None)
    assert summary is not None and summary["precision"] == "bf16" and math.isfinite(summary["val_loss"])
    saved = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))
    assert all(t.dtype == torch.float32 for t in saved["model"].values() if t.is_floating_point())


def test_a_run_stopped_after_its_final_checkpoint_resumes_to_its_summary(tmp_path: Path, cache_dir: Path) -> None:
    # a kill during the final evaluation leaves the last checkpoint but no summary.json
    done = train(tiny_config(tmp_path, cache_dir, steps=4), log=lambda m: None)
    assert done is not None
    rows = read_metrics(tmp_path / "metrics.jsonl")
    (tmp_path / "summary.json").unlink()
    again = train(tiny_config(tmp_path, cache_dir, steps=4), resume=True, log=lambda m: None)
    assert again is not None and (tmp_path / "summary.json").exists()
    assert again["val_loss"] == done["val_loss"] and again["test_loss"] == done["test_loss"]
    assert read_metrics(tmp_path / "metrics.jsonl") == rows  # the final val row is not logged twice
    with pytest.raises(ckpt.CheckpointError, match=r"already reached step 4; pass more --steps"):
        train(tiny_config(tmp_path, cache_dir, steps=4), resume=True, log=lambda m: None)


def test_resuming_with_another_optimizer_is_refused(tmp_path: Path, cache_dir: Path) -> None:
    cfg = tiny_config(tmp_path, cache_dir, steps=6, stop_at_step=3)
    assert train(cfg, log=lambda m: None) is None
    other = tiny_config(tmp_path, cache_dir, steps=6)
    other.optimizer = "lion"
    with pytest.raises(ckpt.CheckpointError, match=r"from another run: optimizer is 'adamw' there but 'lion'"):
        train(other, resume=True, log=lambda m: None)
    wider = tiny_config(tmp_path, cache_dir, steps=6)
    wider.model.hidden_size = 64
    with pytest.raises(ckpt.CheckpointError, match=r"model is"):
        train(wider, resume=True, log=lambda m: None)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["ckpt-00000003.pt"]
