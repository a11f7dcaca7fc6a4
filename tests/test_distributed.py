"""Sharded (FSDP2 / DTensor ``Shard(0)``) and data-parallel steps equal the single-process step.

Process groups are real: ``_dist_utils.launch`` starts gloo ranks on the CPU, each running the named
scenarios and writing its results; the tests below assert on them. Every scenario feeds identical
gradients to every rank, so the plain single-process optimizer run inside the same worker is the
reference. World size 2 runs by default (one launch for all parity scenarios); world size 4 is slow.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from _dist_utils import MATRIX_SHAPES, TOLERANCE, VECTOR_SHAPES, launch, result

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

ROOT = Path(__file__).resolve().parents[1]
PARITY_SCENARIOS = ["raw_sage", "raw_sage_code_compat", "raw_sinkgd", "raw_fused", "raw_int8", "llama_sinksage",
                    "llama_int8", "muon_sharded", "llama_verify_step",
                    "reduction_skipped", "tp_refused", "two_shard_groups_refused", "nonfinite_agree", "ddp_plain"]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return launch(2, PARITY_SCENARIOS, tmp_path_factory.mktemp("two_ranks"))


def assert_parity(run: dict[str, Any], label: str) -> None:
    errors = {**run["param_rel_err"], **run.get("state_rel_err", {})}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOLERANCE, f"{label}: {worst} differs from the single-process run by {errors[worst]:.2e}"


def assert_ranks_agree(results: list[dict[str, Any]], scenario: str) -> None:
    """Each rank gathered the full parameters and compared them itself: all must see the same numbers."""
    first = result(results, scenario, 0)
    for rank in range(1, len(results)):
        assert result(results, scenario, rank) == first, f"{scenario}: rank {rank} disagrees with rank 0"


# ---------------------------------------------------------------------------------------- parity
def test_sage_on_shard0_dtensors_matches_single_process_with_uneven_and_empty_shards(two_ranks) -> None:
    # (5, 3), (7,): uneven; (1, 4), (1,): rank 1 holds no rows at all
    for label, run in result(two_ranks, "raw_sage").items():
        assert set(run["param_rel_err"]) == {f"p{i}{s}" for i, s in enumerate(MATRIX_SHAPES + VECTOR_SHAPES)}
        assert_parity(run, f"SAGE {label}")
    assert_parity(result(two_ranks, "raw_sage_code_compat"), "SAGE code_compat")
    assert_ranks_agree(two_ranks, "raw_sage")


def test_sinkgd_on_shard0_dtensors_matches_single_process_uniform_and_sr(two_ranks) -> None:
    runs = result(two_ranks, "raw_sinkgd")
    assert set(runs) == {f"{k} foreach={f}" for k in ("sinkgd-uniform", "sinkgd-sr") for f in (None, False)}
    for label, run in runs.items():
        assert_parity(run, label)
    assert_ranks_agree(two_ranks, "raw_sinkgd")


def test_fused_kernels_on_shard0_dtensors_match_single_process(two_ranks) -> None:
    runs = result(two_ranks, "raw_fused")
    backends = ["c"] + (["triton"] if importlib.util.find_spec("triton") is not None else [])
    assert set(runs) == {f"{b} {k}" for b in backends for k in ("sage", "sinkgd-uniform", "sinkgd-sr")}
    for label, run in runs.items():
        assert_parity(run, f"fused {label}")
        assert all(step == run["planned"] for step in run["collectives"]), label
        if "sinkgd" in label:  # the fused path reduces each matrix's float64 column sums once per iteration
            assert len(run["collectives"][0]) == 1 + 5 * len(MATRIX_SHAPES)
    assert_ranks_agree(two_ranks, "raw_fused")


def test_sinksage_on_fsdp2_llama_matches_single_process_tied_and_untied(two_ranks) -> None:
    runs = result(two_ranks, "llama_sinksage")
    for label, run in runs.items():
        assert_parity(run, f"LlamaForCausalLM {label}")
        assert run["moved"] > 1e-3, "the test must move the parameters to mean anything"
    tied_roles = {g["role"] for g in runs["tied"]["groups"]}
    assert tied_roles == {"embedding", "vector", "hidden"}  # the tied head is the embedding, stepped once
    assert {g["role"] for g in runs["untied"]["groups"]} == {"embedding", "head", "vector", "hidden"}
    assert_ranks_agree(two_ranks, "llama_sinksage")


def test_int8_momentum_on_shard0_dtensors_stores_the_codes_one_process_would(two_ranks) -> None:
    # exact parity of the codes is what TOLERANCE asks of them: one code step is a relative error of ~1/127
    runs = result(two_ranks, "raw_int8")
    assert set(runs) == {f"{k} {p}" for k in ("sage", "lion") for p in ("foreach=None", "foreach=False", "fused")}
    for label, run in runs.items():
        assert {"p13(700,).exp_avg", "p13(700,).exp_avg_absmax", "p12(5, 300).exp_avg_absmax"} \
            <= set(run["state_rel_err"]), label
        assert_parity(run, f"int8 {label}")
        assert all(step == run["planned"] for step in run["collectives"]), label
        # the vectors' block maxima travel in one max all-reduce per group: 1 + 1 + 1 + 1 + 3 blocks
        assert run["collectives"][0][-1][:2] == ["all_reduce", 7], label
    assert_ranks_agree(two_ranks, "raw_int8")


def test_sinksage_int8_on_fsdp2_llama_matches_single_process_and_passes_verify_step(two_ranks) -> None:
    runs = result(two_ranks, "llama_int8")
    for label, run in runs.items():
        assert_parity(run, f"LlamaForCausalLM int8 {label}")
        assert run["moved"] > 1e-3
        assert all(step == run["planned"] for step in run["collectives"]), label
    assert runs["tied verified"]["verified"], "verify_step checked nothing"
    assert_ranks_agree(two_ranks, "llama_int8")


def test_muon_on_shard0_matrices_and_fsdp2_llama_matches_single_process(two_ranks) -> None:
    runs = result(two_ranks, "muon_sharded")
    for label, run in runs.items():
        assert_parity(run, f"Muon {label}")
        assert all(step == run["planned"] for step in run["collectives"]), label
    # one all-gather of each whole matrix, after the finite flag; (1, 4) has no rows on rank 1 and still joins
    raw = runs["raw foreach=None"]["collectives"][0]
    assert [c[:2] for c in raw] == [["all_reduce", 1]] + [["all_gather", 3 * 5], ["all_gather", 4], *[
        ["all_gather", 9]] * 3, ["all_gather", 14], ["all_gather", 14], ["all_gather", 36], ["all_gather", 36]]
    assert runs["llama untied"]["moved"] > 1e-3
    assert "model.layers.0.self_attn.q_proj.weight" in runs["llama tied verified"]["verified"]
    assert_ranks_agree(two_ranks, "muon_sharded")


# ---------------------------------------------------------------------------------------- communication
def test_plan_collectives_predicts_every_all_reduce_a_step_issues(two_ranks) -> None:
    runs = {**{f"sage {k}": v for k, v in result(two_ranks, "raw_sage").items()},
            **{f"sinkgd {k}": v for k, v in result(two_ranks, "raw_sinkgd").items()},
            **{f"llama {k}": v for k, v in result(two_ranks, "llama_sinksage").items()}}
    for label, run in runs.items():
        assert all(step == run["planned"] for step in run["collectives"]), label


def test_sage_sends_one_all_reduce_per_group_with_its_column_sums_and_the_vector_statistics(two_ranks) -> None:
    run = result(two_ranks, "raw_sage")["foreach=None"]
    expected_stats = sum(s[1] * (s[2] if len(s) > 2 else 1) for s in MATRIX_SHAPES) + 2 * len(VECTOR_SHAPES)
    for step in run["collectives"]:
        # the finite-gradient flag, then every parameter's statistics in one flat buffer
        assert [c[:2] for c in step] == [["all_reduce", 1], ["all_reduce", expected_stats]]


def test_sinkgd_sends_one_all_reduce_per_iteration_per_same_shape_chunk(two_ranks) -> None:
    run = result(two_ranks, "raw_sinkgd")["sinkgd-uniform foreach=None"]
    # same-shape groups of MATRIX_SHAPES, chunked by global size (budget: the largest, 6·2·2 = 24
    # elements), so the three (3, 3) go as two chunks, 2 + 1; each sends its column statistics
    chunks = [3, 4, 2 * 3, 3, 2 * 2, 2, 7]
    expected = [["all_reduce", 1]] + [["all_reduce", m] for m in chunks for _ in range(5)]
    assert all([c[:2] for c in step] == expected for step in run["collectives"])
    per_matrix = result(two_ranks, "raw_sinkgd")["sinkgd-uniform foreach=False"]["collectives"][0]
    assert len(per_matrix) == 1 + 5 * len(MATRIX_SHAPES)  # the for-loop path: one per matrix per iteration


def test_fsdp2_llama_step_reduces_each_sage_group_once(two_ranks) -> None:
    run = result(two_ranks, "llama_sinksage")["untied"]
    step = run["collectives"][0]
    # the finite flag; then, in group order, embedding and head (d = 32 column sums each) and the five
    # norm gains (2 scalars each) in one call per group; then SinkGD's hidden matrices
    assert [c[:2] for c in step[:4]] == [["all_reduce", 1], ["all_reduce", 32], ["all_reduce", 32],
                                         ["all_reduce", 10]]
    assert len(step) == 4 + 5 * 12  # 14 hidden matrices in 12 same-shape chunks, 5 iterations each


def test_ddp_plain_tensors_need_no_collective_and_match_single_process(two_ranks) -> None:
    run = result(two_ranks, "ddp_plain")
    assert run["collectives"] == 0
    assert max(run["param_rel_err"].values()) == 0.0


# ---------------------------------------------------------------------------------------- failure modes
def test_parity_check_fails_when_the_reduction_is_skipped(two_ranks) -> None:
    """Turn the sum all-reduce into a no-op: the same checks must then fail (they can catch it)."""
    runs = result(two_ranks, "reduction_skipped")
    for label in ("sage", "sinkgd", "llama"):
        assert max(runs[label]["param_rel_err"].values()) > 1e3 * TOLERANCE, label
    assert runs["verify_error"] is not None
    assert re.search(r"sharded update of model\.embed_tokens\.weight at step 1 differs", runs["verify_error"])


def test_verify_step_checks_sharded_updates_of_every_group_without_false_alarms(two_ranks) -> None:
    run = result(two_ranks, "llama_verify_step")
    assert_parity(run, "verify_step run")
    # one check per step, rotating across groups: embedding (SAGE matrix), vector (SAGE), hidden (SinkGD)
    assert run["verified"] == ["model.embed_tokens.weight", "model.layers.0.input_layernorm.weight",
                               "model.layers.0.self_attn.q_proj.weight"]


def test_tensor_parallel_placement_is_refused_with_the_parameter_name(two_ranks) -> None:
    runs = result(two_ranks, "tp_refused")
    for kind in ("sage", "sinkgd-uniform"):
        message = runs[kind]["error"]
        assert message and "blocks.0.attn.q_proj.weight" in message and "Shard(dim=1)" in message
        assert "Replicate or Shard(0)" in message
        assert runs[kind]["unchanged"] == 0.0  # refused before anything moved
    assert runs["lion"]["error"] is None and runs["lion"]["rel_err"] == 0.0  # element-wise: exact
    message = runs["lion int8"]["error"]
    assert message and "blocks.0.attn.q_proj.weight" in message and "whole rows" in message


def test_one_group_sharded_over_two_process_groups_is_refused(two_ranks) -> None:
    message = result(two_ranks, "two_shard_groups_refused")["message"]
    assert re.search(r"b is sharded over process groups .* but a over", message)


def test_nonfinite_gradient_on_one_rank_skips_or_raises_on_every_rank(two_ranks) -> None:
    for rank in range(2):
        runs = result(two_ranks, "nonfinite_agree", rank)
        assert runs["skip"] == {"raised": None, "skipped": 1, "unchanged": True}
        assert runs["raise"]["raised"] and "in w" in runs["raise"]["raised"] and runs["raise"]["unchanged"]


# ---------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("state_dtype", ["bfloat16", "int8"])
def test_dcp_checkpoint_saved_on_2_ranks_loads_on_1_and_back_with_the_same_next_step(tmp_path: Path,
                                                                                     state_dtype: str) -> None:
    ckpt = {"ckpt_a": str(tmp_path / "two_ranks"), "ckpt_b": str(tmp_path / "one_rank"), "state_dtype": state_dtype}
    saved = result(launch(2, ["dcp_save_sharded"], tmp_path / "save", args=ckpt), "dcp_save_sharded")
    single = result(launch(1, ["dcp_load_single"], tmp_path / "single", args=ckpt), "dcp_load_single")
    again = result(launch(2, ["dcp_load_sharded"], tmp_path / "again", args=ckpt), "dcp_load_sharded")
    for name, expected in saved["params"].items():
        expected = torch.tensor(expected)
        for label, run in (("1 rank", single), ("2 ranks again", again)):
            err = (torch.tensor(run["params"][name]) - expected).abs().max() / expected.abs().max()
            assert err <= TOLERANCE, f"{label}: next step of {name} differs by {err:.2e}"
    for label, run in (("1 rank", single), ("2 ranks again", again)):
        # groups (role, rule, param_names, state_dtype) and state (dtype, shape, values) came through
        assert run["groups"] == saved["groups"], label
        assert run["state_layout"].keys() == saved["state_layout"].keys(), label
        for name, keys in saved["state_layout"].items():
            for key, (dtype, shape, total) in keys.items():
                got = run["state_layout"][name][key]
                assert got[:2] == [dtype, shape], f"{label}: {name}.{key}"
                assert abs(got[2] - total) <= 1e-5 * max(1.0, abs(total)), f"{label}: {name}.{key}"
    embedding = saved["state_layout"]["model.embed_tokens.weight"]
    assert embedding["exp_avg"][0] == f"torch.{state_dtype}"
    assert embedding["step"][2] == 4.0
    if state_dtype == "int8":  # vocab 101 × d 32: one block per row; a norm gain (32,): one block
        assert embedding["exp_avg_absmax"][:2] == ["torch.float32", [101, 1]]
        assert saved["state_layout"]["model.norm.weight"]["exp_avg_absmax"][:2] == ["torch.float32", [1, 1]]


def test_init_optimizer_state_lets_dcp_build_a_state_dict_without_stepping() -> None:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from sage_optim import SinkSAGE
    from sage_optim.distributed import init_optimizer_state

    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4))
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = SinkSAGE(model)
    init_optimizer_state(optimizer)
    state = get_optimizer_state_dict(model, optimizer)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert float(optimizer.state[model[0].weight]["step"]) == 0.0
    assert state["param_groups"][0]["role"] == "embedding"


def test_dcp_state_dict_of_a_fresh_optimizer_steps_once_with_zero_gradients_and_moves_nothing() -> None:
    """Without init_optimizer_state, DCP creates state by stepping with zero gradients and lr = 0: the
    parameters must survive it (SinkGD once turned all-zero gradients into NaN), but ``step`` counts it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from sage_optim import SinkSAGE

    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4))
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = SinkSAGE(model)
    get_optimizer_state_dict(model, optimizer)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert float(optimizer.state[model[0].weight]["step"]) == 1.0  # the off-by-one init_optimizer_state avoids


# ---------------------------------------------------------------------------------------- helpers in-process
def test_plain_tensors_pass_through_prepare_untouched() -> None:
    from sage_optim.distributed import prepare
    from sage_optim.optim._rules import RULES

    params, grads = [torch.zeros(3, 2)], [torch.ones(3, 2)]
    local_params, local_grads, shards = prepare(params, grads, ["w"], RULES["sage"])
    assert local_params is params and local_grads is grads
    assert shards.all_reduce is None and shards.sharded is None


def test_batched_all_reduce_packs_every_tensor_and_writes_each_back(monkeypatch: pytest.MonkeyPatch) -> None:
    from sage_optim.distributed import _collectives, record_collectives

    def double(tensor: torch.Tensor, group: Any, op: Any = None) -> None:
        _collectives._record("all_reduce", tensor, group)
        tensor.mul_(2)  # what a sum over two identical ranks gives

    monkeypatch.setattr(_collectives, "_all_reduce", double)
    tensors = [torch.arange(3.0), torch.ones(2, 2), torch.tensor([5.0, 6.0], dtype=torch.float64), torch.zeros(0)]
    expected = [2 * t for t in tensors]
    with record_collectives() as log:
        _collectives.make_all_reduce(["group"])(tensors)
    assert all(torch.equal(t, e) for t, e in zip(tensors, expected))
    assert [(c.numel, c.dtype) for c in log] == [(7, torch.float32), (2, torch.float64)]  # one per dtype


def test_default_foreach_batches_dtensors_and_cuda_tensors() -> None:
    from sage_optim.distributed import default_foreach

    assert default_foreach([]) is False
    assert default_foreach([torch.zeros(2)]) is False


def test_verify_step_validates_its_arguments() -> None:
    from sage_optim import SAGE
    from sage_optim.distributed import verify_step

    optimizer = SAGE([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match=r"every must be an integer >= 1.*got 0"):
        verify_step(optimizer, every=0)
    with pytest.raises(TypeError, match="sage-optim optimizer"):
        verify_step(torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1), every=1)
    verifier = verify_step(optimizer, every=1)  # plain tensors: nothing sharded, nothing checked
    optimizer.param_groups[0]["params"][0].grad = torch.ones(2)
    optimizer.step()
    verifier.remove()
    assert verifier.checks == 0


def test_apply_fsdp2_needs_blocks_to_shard() -> None:
    from sage_optim.distributed import apply_fsdp2

    with pytest.raises(ValueError, match="pass layers="):
        apply_fsdp2(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------------------------------- example
@pytest.mark.parametrize("momentum", ["fp32", "int8"])
def test_fsdp2_torchrun_example_trains_on_two_cpu_ranks(tmp_path: Path, momentum: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore",
           "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "examples" / "fsdp2_torchrun.py"), "--steps", "8", "--verify-every", "3",
                           "--momentum", momentum, "--checkpoint", str(tmp_path / "ckpt")],
                          capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    first = float(re.search(r"step 1: loss ([\d.]+)", done.stdout).group(1))
    final = float(re.search(r"final loss ([\d.]+) on 2 rank\(s\); verified 2 sharded updates", done.stdout).group(1))
    assert final < first
    assert (tmp_path / "ckpt" / ".metadata").exists()


# ---------------------------------------------------------------------------------------- world size 4
@pytest.mark.slow
def test_four_ranks_match_single_process_including_2d_meshes_and_hsdp(tmp_path: Path) -> None:
    # raw_int8 on 4 ranks: the 700-vector is cut at 175, 350 and 525, inside blocks 0, 1 and 2
    scenarios = ["raw_sage", "raw_sinkgd", "raw_int8", "llama_sinksage", "mesh_2d", "llama_hsdp"]
    results = launch(4, scenarios, tmp_path, timeout=420)
    for scenario in scenarios:
        for label, run in result(results, scenario).items():
            assert_parity(run, f"4 ranks {scenario} {label}")
        assert_ranks_agree(results, scenario)
