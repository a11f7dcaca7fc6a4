"""The third-party baselines of the registry (issue #6): APOLLO-Mini (apollo-torch) and Adam-mini (adam-mini).

Both packages are in the ``dev`` extra, so CI runs these tests; without them the tests skip, except the
ones that check the missing-package errors (which fake a missing package).
"""
from __future__ import annotations

import io
import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from sage_optim.cli import main
from sage_optim.optim.registry import create_optimizer, default_lr, unavailable_reason
from sage_optim.routing import Role, classify
from sage_optim.train.model import build_meta_model, build_model
from sage_optim.train.presets import get_preset

BASELINES = ["apollo", "adam-mini"]
needs = {name: pytest.mark.skipif(unavailable_reason(name) is not None, reason=str(unavailable_reason(name)))
         for name in BASELINES}
each_baseline = pytest.mark.parametrize("name", [pytest.param(n, marks=needs[n]) for n in BASELINES])
FIXTURE = Path(__file__).parent / "fixtures" / "cc0-slice.jsonl.gz"


def tiny_model(seed: int = 0, *, tied: bool = False) -> nn.Module:
    cfg = get_preset("cpu-tiny").model
    cfg.tie_word_embeddings = tied
    torch.manual_seed(seed)
    return build_model(cfg, vocab_size=512, max_seq_len=32)


def batch(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(seed))


def train_step(model: nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor) -> float:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def state_dict_tensor_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state_dict()["state"].values() for v in s.values()
               if isinstance(v, torch.Tensor))


@each_baseline
def test_three_steps_on_one_batch_lower_the_loss(name: str) -> None:
    model = tiny_model()
    opt = create_optimizer(name, model)  # the default lr
    ids = batch()
    losses = [train_step(model, opt, ids) for _ in range(4)]  # 3 steps, then the loss after them
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[3] < losses[2] < losses[1] < losses[0], losses


def test_default_learning_rates_are_the_documented_ones() -> None:
    assert default_lr("apollo") == 1e-4  # SPEC §5: the SAGE paper's APOLLO lr
    assert default_lr("adam-mini") == default_lr("adamw") == 1e-4  # Adam-mini's README: AdamW's values


@each_baseline
def test_state_dict_round_trip_gives_the_identical_next_step(name: str) -> None:
    # update_proj_gap=2: the step after loading draws APOLLO's next projection, so its seed must survive
    kwargs = {"update_proj_gap": 2} if name == "apollo" else {}
    model = tiny_model()
    opt = create_optimizer(name, model, lr=1e-3, **kwargs)
    for seed in (1, 2):
        train_step(model, opt, batch(seed))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # the harness's checkpoints are read this way
    restored = tiny_model(seed=99)
    restored.load_state_dict(saved["model"])
    restored_opt = create_optimizer(name, restored, lr=1e-3, **kwargs)
    restored_opt.load_state_dict(saved["optimizer"])
    for seed in (3, 4):
        assert train_step(model, opt, batch(seed)) == train_step(restored, restored_opt, batch(seed))
    for (key, a), b in zip(model.state_dict().items(), restored.state_dict().values()):
        assert torch.equal(a, b), key


@needs["apollo"]
def test_apollo_projects_exactly_the_attention_and_mlp_matrices(caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_model()
    with caplog.at_level(logging.INFO, logger="sage_optim.optim"):
        opt = create_optimizer("apollo", model)
    hidden = {n for n, role in classify(model).items() if role is Role.HIDDEN}
    assert hidden and all(".self_attn." in n or ".mlp." in n for n in hidden)
    projected = {n for g in opt.param_groups if "rank" in g for n in g["param_names"]}
    assert projected == hidden
    assert {row.name for row in opt.partition.rows if row.rule == "apollo"} == hidden
    assert all(n in caplog.text for n in hidden) and "projects 14 matrices" in caplog.text
    group = next(g for g in opt.param_groups if "rank" in g)
    assert (group["rank"], group["scale_type"], group["scale"], group["proj"]) == (1, "tensor", 128.0, "random")

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_step(model, opt, batch())
    for n, p in model.named_parameters():
        assert not torch.equal(p, before[n]), f"{n} did not move"
        state = opt.state[p]
        if n in hidden:
            rows, cols = p.shape
            assert state["projector"].ortho_matrix.shape == ((1, cols) if rows >= cols else (rows, 1)), n
            assert state["exp_avg"].shape == ((rows, 1) if rows >= cols else (1, cols)), n
        else:
            assert "projector" not in state and state["exp_avg"].shape == p.shape, n


@needs["apollo"]
def test_apollo_moves_a_hidden_matrix_along_its_gradient_and_embeddings_like_adam() -> None:
    # tensor-wise scaling: a hidden matrix's step is a multiple of its raw gradient (AdamW's is not)
    model = tiny_model().double()
    opt = create_optimizer("apollo", model, lr=1e-2, weight_decay=0.0)
    ids = batch()
    model(input_ids=ids, labels=ids).loss.backward()
    before = {n: (p.detach().clone(), p.grad.clone()) for n, p in model.named_parameters()}
    opt.step()
    roles = classify(model)
    for n, p in model.named_parameters():
        old, grad = before[n]
        cosine = nn.functional.cosine_similarity((old - p.detach()).flatten(), grad.flatten(), dim=0).item()
        if roles[n] is Role.HIDDEN:
            assert cosine == pytest.approx(1.0, abs=1e-9), n
        elif roles[n] is Role.EMBEDDING:
            assert cosine < 0.9, n


@pytest.mark.parametrize("kwargs, match", [
    ({"rank": 0}, "rank must be a positive int, got 0"),
    ({"scale": -1.0}, "scale must be positive, got -1.0"),
    ({"scale_type": "row"}, "scale_type must be one of .*got 'row'"),
    ({"proj_type": "svd"}, "proj_type must be one of .*got 'svd'"),
    ({"update_proj_gap": 0}, "update_proj_gap must be a positive int, got 0"),
])
@needs["apollo"]
def test_apollo_refuses_bad_settings_naming_the_value(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        create_optimizer("apollo", tiny_model(), **kwargs)


@needs["adam-mini"]
def test_adam_mini_takes_its_shape_from_the_llama_config_and_uses_one_v_per_head() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    opt = create_optimizer("adam-mini", model)
    assert (opt.dim, opt.n_heads, opt.n_kv_heads) == (32, 4, 2)
    ids = torch.randint(0, 64, (2, 8))
    train_step(model, opt, ids)
    q, k = model.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.k_proj.weight
    assert opt.state[q]["vmean"].shape == (4, 1) and opt.state[k]["vmean"].shape == (2, 1)  # per (kv) head
    rules = {row.name: row.rule for row in opt.partition.rows}
    assert rules["model.layers.0.self_attn.q_proj.weight"] == "adam-mini/head"
    assert rules["model.layers.0.mlp.down_proj.weight"] == rules["lm_head.weight"] == "adam-mini/row"
    assert rules["model.norm.weight"] == "adam-mini/tensor"
    assert opt.state_nbytes() == state_dict_tensor_bytes(opt)


@needs["adam-mini"]
def test_adam_mini_without_a_model_config_asks_for_dim_and_heads() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"Sequential has no Hugging Face config.*pass dim=, n_heads="):
        create_optimizer("adam-mini", model)
    opt = create_optimizer("adam-mini", model, dim=8, n_heads=2)
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    with pytest.raises(ValueError, match="n_heads=3 is not a multiple of n_kv_heads=2"):
        create_optimizer("adam-mini", model, dim=6, n_heads=3, n_kv_heads=2)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@each_baseline
def test_state_bytes_on_a_meta_model_equal_the_state_after_one_real_step(name: str, tied: bool) -> None:
    cfg = get_preset("cpu-tiny").model
    cfg.tie_word_embeddings = tied
    counted = create_optimizer(name, build_meta_model(cfg, vocab_size=512, max_seq_len=32)).state_nbytes()
    model = tiny_model(tied=tied)
    opt = create_optimizer(name, model)
    train_step(model, opt, batch())
    assert counted == state_dict_tensor_bytes(opt)
    assert sum(counted.by_role.values()) == counted


@each_baseline
def test_memory_command_rows_for_the_baselines(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["memory", "--model", "llama-1.3b", "--json", "--optimizers", "adamw", name]) == 0
    adamw, row = json.loads(capsys.readouterr().out)
    assert row["optimizer"] == name and isinstance(row["state_bytes"], int) and row["method"] == "state_nbytes"
    assert sum(row["by_role"].values()) == row["state_bytes"]
    if name == "apollo":  # rank-1 moments for the hidden matrices, AdamW's two moments elsewhere
        assert row["by_role"]["hidden"] < 1e-3 * adamw["by_role"]["hidden"]
        assert row["by_role"]["embedding"] == adamw["by_role"]["embedding"] - 4  # torch's AdamW: + a step tensor
    else:  # Adam's m everywhere, v per block: about half of AdamW
        assert 0.49 < row["ratio_to_adamw"] < 0.51


@pytest.mark.parametrize("name, module, package", [("apollo", "apollo_torch", "apollo-torch"),
                                                   ("adam-mini", "adam_mini", "adam-mini")])
def test_a_missing_package_is_a_clear_error_naming_the_extra(
        name: str, module: str, package: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # import and find_spec both see it as not installed
    reason = unavailable_reason(name)
    assert reason is not None and package in reason and 'pip install "sage-optim[baselines]"' in reason
    expected = rf"optimizer '{name}' is not available: .*{package}.*sage-optim\[baselines\]"
    with pytest.raises(ImportError, match=expected):
        create_optimizer(name, tiny_model())
    rc = main(["train", "--preset", "cpu-tiny", "--optimizer", name, "--steps", "2", "--out", str(tmp_path / "run"),
               "--data", str(FIXTURE), f"--data.cache_dir={tmp_path / 'cache'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("sage-optim: error: optimizer") and "sage-optim[baselines]" in err[-1]
    assert not any("Traceback" in line for line in err)


@needs["apollo"]
def test_a_run_prints_which_matrices_apollo_projects(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--preset", "cpu-tiny", "--optimizer", "apollo", "--steps", "2", "--out",
                 str(tmp_path / "run"), "--data", str(FIXTURE), f"--data.cache_dir={tmp_path / 'cache'}"]) == 0
    table = [line.split() for line in capsys.readouterr().err.splitlines()]
    projected = {row[0] for row in table if len(row) == 5 and row[2:4] == ["hidden", "apollo"]}
    model = tiny_model()
    hidden = {n for n, role in classify(model).items() if role is Role.HIDDEN}
    assert projected == hidden
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    adamw_hidden = 8 * sum(p.numel() for n, p in model.named_parameters() if n in hidden)  # two fp32 moments
    assert summary["state_bytes_by_role"]["hidden"] < 0.05 * adamw_hidden
