"""SinkSAGE on transformers' LlamaForCausalLM: role routing, state layout, partition in the state dict."""
from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

import sage_optim as so
from sage_optim import Role

transformers = pytest.importorskip("transformers")


def tiny_llama(vocab: int, tied: bool, hidden: int = 16) -> nn.Module:
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                      tie_word_embeddings=tied)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


@pytest.mark.parametrize("vocab", [32000, 128256])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_roles_follow_the_module_tree_at_any_vocabulary(vocab, tied):
    model = tiny_llama(vocab, tied)
    opt = so.SinkSAGE(model)
    roles = {name: group["role"] for group in opt.param_groups for name in group["param_names"]}
    rules = {group["role"]: group["rule"] for group in opt.param_groups}
    assert roles["model.embed_tokens.weight"] == "embedding"
    if tied:
        assert "lm_head.weight" not in roles  # one tensor, routed once, as the embedding
    else:
        assert roles["lm_head.weight"] == "head"  # an untied head is never sent to SinkGD
    assert all(roles[n] == "vector" for n in roles if "norm" in n)
    assert all(roles[n] == "hidden" for n in roles if "proj" in n)
    assert rules == {"embedding": "sage", **({} if tied else {"head": "sage"}), "vector": "sage", "hidden": "sinkgd"}
    # every parameter exactly once
    all_params = [p for group in opt.param_groups for p in group["params"]]
    assert len(all_params) == len({id(p) for p in all_params}) == len(list(model.parameters()))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_state_bytes_are_momentum_plus_a_vector_and_hidden_matrices_hold_none(tied):
    model = tiny_llama(1000, tied)
    opt = so.SinkSAGE(model)
    x = torch.randint(0, 1000, (2, 8))
    model(x, labels=x).loss.backward()
    opt.step()
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state[p]
            if group["rule"] == "sinkgd":
                assert len(state) == 0
            else:
                col = p.shape[1:] if p.ndim >= 2 else p.shape
                assert state["exp_avg"].shape == p.shape and state["col_ema"].shape == col
    hidden = 16
    n_vectors_numel = sum(p.numel() for p in model.parameters() if p.ndim == 1)
    n_matrices = 2 if not tied else 1
    expected = (n_matrices * (1000 * hidden * 4 + hidden * 4 + 4)  # m, S, step per embedding/head
                + n_vectors_numel * 8 + 4 * sum(1 for p in model.parameters() if p.ndim == 1))
    counted = opt.state_nbytes()
    assert int(counted) == expected
    assert counted.by_rule["sinkgd"] == 0 and counted.by_role["hidden"] == 0
    actual = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values())
    assert actual == expected


def test_routing_ignores_names_and_shapes():
    """A module tree with misleading names: what counts is the module type and the head, not the name."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_proj = nn.Linear(8, 8)        # "embed" in the name, but a hidden matrix
            self.table = nn.Embedding(60000, 4)      # no "embed" in the name, rows > 50 000
            self.huge_hidden = nn.Linear(4, 60000, bias=False)
            self.out = nn.Linear(8, 10)

    net = Net()
    roles = so.classify(net, head=net.out)
    assert roles["embed_proj.weight"] is Role.HIDDEN
    assert roles["table.weight"] is Role.EMBEDDING
    assert roles["huge_hidden.weight"] is Role.HIDDEN
    assert roles["out.weight"] is Role.HEAD and roles["out.bias"] is Role.VECTOR


def test_rules_make_the_baselines_as_configurations():
    model = tiny_llama(500, False)
    adam_hybrid = so.SinkSAGE(model, rules={"embedding": "adamw", "head": "adamw", "vector": "adamw"})
    assert {g["role"]: g["rule"] for g in adam_hybrid.param_groups} == {
        "embedding": "adamw", "head": "adamw", "vector": "adamw", "hidden": "sinkgd"}
    assert {g["role"]: g["betas"] for g in adam_hybrid.param_groups if g["rule"] == "adamw"}["head"] == (0.9, 0.999)
    lion = so.SinkSAGE(model, rules={"embedding": ("lion", {"lr": 1e-4})})
    embedding_group = next(g for g in lion.param_groups if g["role"] == "embedding")
    assert embedding_group["rule"] == "lion" and embedding_group["lr"] == 1e-4
    x = torch.randint(0, 500, (2, 8))
    for opt in (adam_hybrid, lion):
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("rules, error, match", [
    ({"embeddings": "sage"}, ValueError, r"unknown role 'embeddings'"),
    ({"hidden": "adam"}, ValueError, r"unknown rule 'adam'"),
    ({"vector": "sinkgd"}, ValueError, r"SinkGD needs parameters with ndim >= 2, but model.layers.0.input_layernorm.weight.*vector"),
    ({"hidden": ("sinkgd",)}, TypeError, r"rules\['hidden'\] must be a rule name"),
])
def test_bad_rules_are_refused_with_the_role_named(rules, error, match):
    with pytest.raises(error, match=match):
        so.SinkSAGE(tiny_llama(100, False), rules=rules)


def test_partition_table_prints_every_parameter_with_role_rule_and_bytes():
    model = tiny_llama(100, False)
    text = str(so.SinkSAGE(model).partition)
    assert text.splitlines()[0].split() == ["name", "shape", "role", "rule", "state", "bytes"]
    for name, _ in model.named_parameters():
        assert name in text
    assert "lm_head.weight" in text and "100×16" in text


def test_loading_a_state_dict_from_another_partition_fails_naming_the_difference():
    model = tiny_llama(100, False)
    x = torch.randint(0, 100, (2, 8))
    source = so.SinkSAGE(model, rules={"embedding": "lion"})
    model(x, labels=x).loss.backward()
    source.step()
    with pytest.raises(ValueError, match=r"partition differs.*group 0 rule is 'lion' in the checkpoint but 'sage' here"):
        so.SinkSAGE(model).load_state_dict(copy.deepcopy(source.state_dict()))
    other = tiny_llama(100, True)
    with pytest.raises(ValueError, match=r"partition differs"):
        so.SinkSAGE(other).load_state_dict(copy.deepcopy(source.state_dict()))


def test_explicit_head_and_a_model_without_get_output_embeddings():
    net = nn.Sequential(nn.Embedding(30, 8), nn.Linear(8, 8), nn.Linear(8, 30))
    roles = so.classify(net)
    assert roles["2.weight"] is Role.HIDDEN  # no get_output_embeddings and no head=: just a matrix
    roles = so.classify(net, head=net[2])
    assert roles["2.weight"] is Role.HEAD
    with pytest.raises(ValueError, match="head= is not a parameter of this model"):
        so.classify(net, head=nn.Linear(8, 30))


def test_lr_scheduler_drives_every_group():
    model = tiny_llama(100, False)
    opt = so.SinkSAGE(model, rules={"embedding": ("adamw", {"lr": 1e-4})})
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    assert {g["role"]: g["lr"] for g in opt.param_groups} == {"embedding": 5e-5, "head": 1e-3, "vector": 1e-3,
                                                            "hidden": 1e-3}
    del sched


def test_muon_rule_runs_torch_muon_on_hidden_matrices_and_refuses_vectors():
    if not hasattr(torch.optim, "Muon"):
        pytest.skip("this torch has no torch.optim.Muon")
    from sage_optim.optim.registry import create_optimizer

    model = tiny_llama(200, False)
    opt = create_optimizer("muon-hybrid", model)
    assert {g["role"]: g["rule"] for g in opt.param_groups} == {
        "embedding": "adamw", "head": "adamw", "vector": "adamw", "hidden": "muon"}
    x = torch.randint(0, 200, (2, 8))
    losses = []
    for _ in range(4):
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    hidden = next(g for g in opt.param_groups if g["rule"] == "muon")
    assert all(set(opt.state[p]) == {"momentum_buffer"} for p in hidden["params"])
    with pytest.raises(ValueError, match="Muon needs 2-D parameters, but model.layers.0.input_layernorm.weight"):
        so.SinkSAGE(model, rules={"vector": "muon"})


def test_ablation_configurations_change_only_what_they_name() -> None:
    from sage_optim.optim.registry import ABLATIONS, available_optimizers, create_optimizer

    assert set(available_optimizers()) <= set(available_optimizers(include_ablations=True))
    assert not {n for names in ABLATIONS.values() for n in names} - set(available_optimizers(include_ablations=True))
    model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 16), nn.LayerNorm(16))

    def groups(name: str) -> dict[str, dict]:
        return {g["role"]: g for g in create_optimizer(name, model).param_groups}

    base = groups("sage-hybrid")
    for name, changed in [("hybrid-embed-sage-no-instant", {"instant_damper": False}),
                          ("hybrid-embed-sage-code-compat", {"code_compat": True})]:
        ablated = groups(name)
        for role, group in base.items():
            expected = {**group, **changed} if group["rule"] == "sage" else group
            assert {k: v for k, v in ablated[role].items() if k != "params"} == \
                {k: v for k, v in expected.items() if k != "params"}, (name, role)
    adamw = groups("hybrid-embed-adamw")
    assert adamw["hidden"]["rule"] == "sinkgd" and adamw["hidden"]["lr"] == 2e-3
    assert adamw["hidden"]["scale"] == base["hidden"]["scale"] == 10.0
    assert {adamw[r]["rule"] for r in ("embedding", "vector")} == {"adamw"}
    assert {adamw[r]["lr"] for r in ("embedding", "vector")} == {1e-4}
    # embed_lr gives every embedding rule its own lr with the dense part unchanged (SAGE's too)
    for name in ("sage-hybrid", "hybrid-embed-sage-no-instant", "lion-hybrid", "hybrid-embed-adamw", "sinkgd-hybrid",
                 "muon-hybrid"):
        plain = {g["role"]: g for g in create_optimizer(name, model).param_groups}
        tuned = {g["role"]: g for g in create_optimizer(name, model, embed_lr=3e-4).param_groups}
        for role, group in plain.items():
            expected = {**group, "lr": 3e-4, "initial_lr": 3e-4} if role != "hidden" else group
            assert {k: v for k, v in tuned[role].items() if k not in ("params", "initial_lr")} == \
                {k: v for k, v in expected.items() if k not in ("params", "initial_lr")}, (name, role)
    # adamw's embed_lr (the two-lr control): torch's AdamW per element, so each part moves exactly as a plain
    # AdamW at its own lr would
    split = {g["role"]: g for g in create_optimizer("adamw", model, lr=1e-3, embed_lr=3e-2).param_groups}
    assert {r: g["lr"] for r, g in split.items()} == {"hidden": 1e-3, "embedding/head/vector": 3e-2}
    assert len(split["hidden"]["params"]) == 1 and len(split["embedding/head/vector"]["params"]) == 4
    models = [copy.deepcopy(model) for _ in range(3)]
    optimizers = [create_optimizer("adamw", models[0], lr=1e-3, embed_lr=3e-2),
                  create_optimizer("adamw", models[1], lr=1e-3), create_optimizer("adamw", models[2], lr=3e-2)]
    tokens = torch.randint(0, 50, (4, 5), generator=torch.Generator().manual_seed(0))
    for m, opt in zip(models, optimizers):  # one step: the three see the same gradients
        m(tokens).square().mean().backward()
        opt.step()
    hidden = {id(p) for p in split["hidden"]["params"]}
    for p_model, p_split, p_lr, p_embed in zip(model.parameters(), *(m.parameters() for m in models)):
        expected = p_lr if id(p_model) in hidden else p_embed
        assert torch.equal(p_split, expected) and not torch.equal(p_split, p_model)
    with pytest.raises(ValueError, match="sage-hybrid: give embed_lr or rules, not both"):
        create_optimizer("sage-hybrid", model, embed_lr=1e-3, rules={"vector": "adamw"})


def test_lr_and_weight_decay_reach_every_rule() -> None:
    """The docstring's promise, for every rule a role can take: a Muon group once kept its own 1e-3 whatever lr
    SinkSAGE was given, so muon-hybrid's lr sweep moved only its AdamW part."""
    from sage_optim.optim._rules import RULES
    from sage_optim.optim.registry import create_optimizer

    model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 16), nn.LayerNorm(16))

    def hidden_group(**kwargs: Any) -> dict:
        return next(g for g in so.SinkSAGE(model, **kwargs).param_groups if g["role"] == "hidden")

    for rule in RULES:
        hidden = hidden_group(lr=3e-4, weight_decay=0.05, rules={"hidden": rule})
        assert (hidden["rule"], hidden["lr"], hidden["weight_decay"]) == (rule, 3e-4, 0.05)
        if "state_dtype" in RULES[rule].defaults:  # every rule with momentum takes the state dtype too
            hidden = hidden_group(state_dtype=torch.bfloat16, rules={"hidden": rule})
            assert hidden["state_dtype"] in (torch.bfloat16, "bfloat16"), rule  # stored by name
    tokens = torch.randint(0, 50, (4, 5), generator=torch.Generator().manual_seed(0))
    moved = []
    for lr in (1e-3, 1e-2):
        m = copy.deepcopy(model)
        opt = create_optimizer("muon-hybrid", m, lr=lr)
        m(tokens).square().mean().backward()
        opt.step()
        moved.append((m[1].weight - model[1].weight).norm().item())
    assert moved[1] > 5 * moved[0], moved  # the hidden (Muon) step follows the lr
