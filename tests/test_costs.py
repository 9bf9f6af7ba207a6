"""The plan's prices (hessov.costs): the default k, the row block chosen from the budget, every
job priced in `hessov plan --json`, and refusals that name the keys, before anything runs.
"""

import json

import pytest

from hessov.config import load_run_config
from hessov.costs import (
    GIB,
    _training_bytes,
    choose_row_block,
    default_k,
    in_memory_solve_bytes,
    problem_facts,
    rechoose_row_block,
    row_block_solve_bytes,
)
from hessov.errors import ConfigError
from hessov.problems import build_problem
from hessov.sketchspec import resolve_spec

TINY = ["problem=mnist_mini", "preset=tiny", "HESSIAN_SPLITS=[train]"]


def test_default_k_follows_the_papers_choices():
    assert default_k(7030) == 352  # 5% of D on mnist_mini, as before
    assert default_k(20_000) == 1000
    assert default_k(895_210) == 1000  # CIFAR-10 3c3d
    assert default_k(11_689_512) == 1500  # ImageNet ResNet-18
    assert default_k(1_336_610) == 1065  # mnist_mlp
    assert default_k(5) == 1


def spec_for(dim: int, *overrides: str):
    cfg = load_run_config([*TINY, *overrides])
    return cfg, resolve_spec(cfg, dim, list(cfg.RECORD_STEPS))


def test_row_blocks_are_chosen_when_the_in_memory_solve_does_not_fit():
    cfg, spec = spec_for(10_000_000, "k=256", "memory_gb=2")
    assert in_memory_solve_bytes(spec) > 2 * GIB
    assert spec.row_block > 0 and spec.row_block % 4096 == 0
    assert row_block_solve_bytes(spec, spec.row_block) <= GIB  # half the budget
    assert row_block_solve_bytes(spec, spec.row_block + 4096) > GIB  # the largest that fits
    _, small = spec_for(7030, "k=30", "memory_gb=2")
    assert small.row_block == 0  # in memory: the fast path
    _, forced = spec_for(7030, "k=30", "row_block=100")
    assert forced.row_block == 100
    cfg.row_block = -1
    assert choose_row_block(cfg, spec) == 0


def test_a_row_block_smaller_than_k_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match="row_block: 20 rows is fewer than k=30"):
        spec_for(7030, "k=30", "row_block=20")


def test_problem_facts_of_mnist_mini():
    problem = build_problem(load_run_config(TINY))
    facts = problem_facts(problem)
    inputs = problem.train.inputs.numel() + problem.test.inputs.numel()
    assert facts.dim == 7030 and facts.data_bytes >= 4 * inputs
    assert facts.graph_bytes_per_example > 0 and facts.graph_bytes > 0


def test_examples_taken_out_of_the_splits_are_priced():
    cfg = load_run_config([*TINY, "BATCH_SIZE=10"])
    facts = problem_facts(build_problem(cfg))
    assert facts.example_bytes == 16 * 16 * 4 + 8 and facts.train_examples == 4000
    assert not facts.lazy_inputs
    batch = _training_bytes(cfg, facts)
    full = _training_bytes(load_run_config([*TINY, "BATCH_SIZE=0"]), facts)
    # Full batch takes the 4,000 examples instead of 10; its graph is one example's (no
    # PHYSICAL_BATCH_SIZE: 1) against 10.
    graph = facts.graph_bytes_per_example * (1 - 10)
    assert full - batch == facts.example_bytes * (4000 - 10) + graph
    gradients = _training_bytes(
        load_run_config([*TINY, "BATCH_SIZE=10", "RECORD_GRADIENTS=true"]), facts
    )
    assert gradients - batch == facts.example_bytes * cfg.NUM_HESSIAN_DATAPOINTS


def test_the_default_mnist_mlp_plan_fits_a_24_gb_machine(hessov):
    plan = json.loads(hessov("plan", "problem=mnist_mlp", "memory_gb=24", "--json").stdout)
    assert plan["k"] == 1065 and plan["row_block"] > 0
    assert all(0 < job["memory_bytes"] <= 24 * GIB for job in plan["jobs"])
    assert plan["peak_memory_bytes"] == max(job["memory_bytes"] for job in plan["jobs"])
    measures = [job for job in plan["jobs"] if job["stage"] == "measure"]
    assert sum(job["hvps"] for job in measures) == plan["hvps"]
    # Every step and split: two rounds of k HVPs and the 30 a-posteriori probes.
    assert plan["hvps"] == len(plan["sketches"]) * (2 * 1065 + 30)
    first = next(job for job in measures if "round=first" in job["argv"])
    assert first["disk_bytes"] == 1065 * plan["dim"] * 4


def test_run_refuses_a_job_over_its_budget_before_anything_starts(hessov, tmp_path):
    result = hessov("run", *TINY, "memory_gb=0.3", f"OUTPUT_DIR={tmp_path}", check=False)
    assert result.returncode == 2
    assert (
        "measure:" in result.stderr and "block_size, HESSIAN_BATCH_SIZE, memory_gb" in result.stderr
    )
    assert "(memory_gb)" in result.stderr
    assert list(tmp_path.iterdir()) == []  # nothing trained, nothing created
    lines = hessov("plan", *TINY, "memory_gb=4").stdout
    assert "basis and solve in memory" in lines and "per task" in lines


def test_a_posteriori_tasks_own_whole_blocks():
    _, spec = spec_for(7030, "k=20", "block_size=8", "MEAS_PER_JOB=0", "NUM_A_POSTERIORI=30")
    tasks = [spec.task_indices(t, "apost") for t in range(spec.round_tasks("apost"))]
    blocks = spec.round_layout("apost").blocks
    starts = {block.start for block in blocks} | {30}
    assert [i for rows in tasks for i in rows] == list(range(30))
    assert all(rows.start in starts and rows.stop in starts for rows in tasks)  # no cut block


def test_a_new_budget_chooses_the_row_block_again_over_the_saved_one():
    cfg, spec = spec_for(10_000_000, "k=256", "memory_gb=2")
    cfg.row_block = -1  # what a run started in memory saved into its config
    assert rechoose_row_block(cfg, spec, ["threads=2"]) is False
    spec.row_block = 0
    assert rechoose_row_block(cfg, spec, ["memory_gb=2"]) is True
    assert spec.row_block > 0
    cfg.row_block = 8192
    assert rechoose_row_block(cfg, spec, ["row_block=8192"]) and spec.row_block == 8192


def test_row_blocks_forced_where_two_pass_cannot_use_them_are_refused():
    needs = r"row_block: two-pass recovery in row blocks needs rounds x k <= D \(2 x 4000"
    with pytest.raises(ConfigError, match=needs):
        spec_for(7030, "k=4000", "row_block=4096")
