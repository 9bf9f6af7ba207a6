"""Block Krylov rounds in the pipeline (``rounds=q``, ``target_rel_err=``; pipeline/rounds.py):
the settings refused before any job, the stage graph with a basis job and a measurement round
per Krylov block, the checks' file and an old layout, and the whole local pipeline with a
target that ends the rounds early, every bound checked against the dense Hessian's
eigenvalues at both recorded steps (as the exhaustive stage checks them; its eigenvectors
would take a minute a step here). Three fixed rounds run in tests/test_hessian_stages.py
(nqm), and in row blocks in the sbatch chain of tests/test_slurm_pipeline.py.

The adaptive run's expectations come from its own numbers, which are far from the target on
both sides: the top 3 eigenvalues of step 300 are bounded within 0.16 relative after round 2
and 7e-4 after round 3; those of step 100 within 4e-2 after round 3 and 5e-4 after round 4,
against ``target_rel_err = 1e-2``. Rounding moves a bound by about ``g(D) |lambda|_max``
(tolerances.py), orders of magnitude less than those margins, so the rounds taken are the
same on every machine.
"""

import dataclasses
import json
import math
import shutil
from pathlib import Path

import h5py
import pytest
import torch

from conftest import TARGET, run_hessov
from hessov.config import load_run_config, saved_run_config
from hessov.errors import ConfigError
from hessov.hessian import hessian_at_step
from hessov.launch.graph import plan_run
from hessov.rounds import (
    RoundCheck,
    product_rounds,
    read_checks,
    record_check,
    round_name,
    round_number,
    stopped_after,
)
from hessov.rundir import RunDir
from hessov.skerch_ext.operator import dense_matrix
from hessov.sketchspec import SketchSpec, check_same_layout, resolve_spec
from hessov.stages.exhaustive import check_bounds

TINY = ["problem=mnist_mini", "preset=tiny", "HESSIAN_SPLITS=[train]"]
EIGEN = "eigen/step_300_train.h5"


def test_round_names_run_first_second_then_numbered():
    assert [round_name(n) for n in (1, 2, 3, 7)] == ["first", "second", "round3", "round7"]
    assert [round_number(round_name(n)) for n in range(1, 9)] == list(range(1, 9))
    assert product_rounds(2) == ["second"] and product_rounds(4) == ["second", "round3", "round4"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["rounds=1"], "rounds: one round of products is single-pass recovery"),
        (["rounds=3", "target_rel_err=0.01"], "rounds: with target_rel_err the rounds are"),
        (["recovery=single_pass", "target_rel_err=0.01"], "target_rel_err: is for two_pass"),
        (["target_rel_err=1.5"], "target_rel_err: must be in"),
        (["target_rel_err=0.01", "max_rounds=1"], "max_rounds: must be >= 2"),
        (["target_rel_err=0.01", "max_rounds=2"], "max_rounds: must be >= 3 with target_rel_err"),
        (["target_eigenpairs=5"], "target_eigenpairs: says which pairs target_rel_err covers"),
        (["problem=nqm", "target_rel_err=0.01"], "pass rounds=0 .*nqm's rounds: 3"),
    ],
)
def test_bad_round_settings_are_refused_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config([*TINY, *overrides])


def test_rounds_beyond_the_dimension_or_an_unboundable_target_are_refused():
    cfg = load_run_config([*TINY, "rounds=5", "k=30"])
    with pytest.raises(ConfigError, match="rounds: 5 rounds of k=30 products exceed D=100"):
        resolve_spec(cfg, 100, [100, 300])
    cfg = load_run_config([*TINY, "target_rel_err=0.01", "target_eigenpairs=26"])
    with pytest.raises(ConfigError, match="target_eigenpairs: 26 > k - 5 = 25"):
        resolve_spec(cfg, 7030, [100, 300])


def test_the_plan_holds_a_basis_job_and_a_round_per_krylov_block():
    plan = plan_run(load_run_config([*TINY, "rounds=3", "HESSIAN_STEPS=[300]"]))
    names = [job.name for job in plan.jobs]
    where = "step=300 split=train"
    chain = [
        f"measure first {where}",
        f"basis {where}",
        f"measure second {where}",
        f"basis round3 {where}",
        f"measure round3 {where}",
        f"solve {where}",
    ]
    assert [name for name in names if name in chain] == chain
    jobs = {job.name: job for job in plan.jobs}
    assert jobs[f"basis round3 {where}"].after == (f"measure second {where}",)
    assert jobs[f"measure round3 {where}"].hvps == 30 and jobs[f"measure round3 {where}"].tasks
    assert plan.run.two_pass_basis(300, "train", "round3") in jobs[f"basis round3 {where}"].outputs
    assert plan.as_dict()["rounds"] == ["first", "second", "round3", "apost"]
    # A target plans its worst case: every round up to max_rounds.
    target = plan_run(load_run_config([*TINY, *TARGET, "HESSIAN_STEPS=[300]"]))
    assert f"measure round4 {where}" in [job.name for job in target.jobs]


def dense_eigenvalues(run: RunDir, step: int) -> torch.Tensor:
    """Every eigenvalue ``(D,)`` of the step's Hessian, dense in float64, by ``|lambda|``."""
    cfg = dataclasses.replace(saved_run_config(run), dtype="float64")
    hessian = hessian_at_step(run, cfg, step, "train")
    dense = dense_matrix(
        hessian.matmat, hessian.dim, block_size=64, dtype=torch.float64, device="cpu"
    )
    exact = torch.linalg.eigvalsh(dense)
    return exact[exact.abs().argsort(descending=True)]


def test_a_met_target_ends_the_rounds_and_every_bound_holds(adaptive_run):
    summary = json.loads(run_hessov("summary", adaptive_run).stdout)
    step300, step100 = summary["solve"]["300"]["train"], summary["solve"]["100"]["train"]
    assert (step300["rounds"], step300["rounds_planned"], step300["hvps"]) == (3, 4, 90)
    assert step300["rounds_stopped_by"] == "target_rel_err" and step300["target_met"]
    assert [check["met"] for check in step300["round_checks"]] == [False, True]
    assert step300["max_relative_error_bound"] < 0.01
    assert step100["rounds"] == 4 and len(step100["round_checks"]) == 2
    assert step100["rounds_stopped_by"] == "max_rounds" and step100["target_met"]
    run = RunDir(Path(adaptive_run))
    for step in (100, 300):  # the exhaustive stage's check, on the dense eigenvalues
        with h5py.File(run.eigen(step, "train"), "r") as handle:
            values = torch.from_numpy(handle["eigenvalues"][:]).double()
            bounds = torch.from_numpy(handle["error_bounds"][:])
        checked = check_bounds(dense_eigenvalues(run, step), values, bounds)
        assert checked["bounds_checked"] >= 3 and checked["bounds_violated"] == 0, checked
    status = run_hessov("status", adaptive_run).stdout
    assert "round4 round not needed" in status
    assert "target_rel_err=0.01 met: no more rounds" in status
    planned = run_hessov("plan", "--jobs", adaptive_run).stdout.splitlines()
    assert planned[0].startswith("run_dir") and planned[1:] == []  # nothing left to run
    with h5py.File(f"{adaptive_run}/{EIGEN}") as handle:
        assert handle.attrs["rounds"] == 3
        finite = int((handle["error_bounds"][:] < float("inf")).sum())
    assert step300["error_bounds_resolved"] == finite >= 3
    assert len(step300["eigenvalue_error_bounds"]) == len(step300["residual_norms"]) == 30
    assert step300["error_bounds_from"].startswith("the products of rounds 2..3")


def test_the_checks_file_writes_null_for_an_unresolved_bound(tmp_path):
    run = RunDir(tmp_path)
    run.krylov_checks(300, "train").parent.mkdir(parents=True)
    record_check(run, 300, "train", RoundCheck(2, math.inf, 1, 3, 0.01, False))
    record_check(run, 300, "train", RoundCheck(3, 6e-4, 3, 3, 0.01, True))
    record_check(run, 300, "train", RoundCheck(3, 6e-4, 3, 3, 0.01, True))  # a job run again
    entries = json.loads(run.krylov_checks(300, "train").read_text())  # strict JSON
    assert [entry["max_relative_bound"] for entry in entries] == [None, 6e-4]
    assert [check.max_relative_bound for check in read_checks(run, 300, "train")] == [
        math.inf,
        6e-4,
    ]
    assert stopped_after(run, 300, "train") == 3


def test_a_layout_from_before_the_rounds_loads_as_two_rounds():
    cfg = load_run_config(TINY)
    spec = resolve_spec(cfg, 7030, [100, 300])
    payload = spec.to_json()
    for key in ("krylov_rounds", "target_rel_err", "target_eigenpairs"):
        del payload[key]  # as a layout written before them
    old = SketchSpec.from_json(payload)
    assert (old.krylov_rounds, old.checked_eigenpairs) == (2, 25)
    assert check_same_layout(old, spec, "sketch.json") is old


def test_a_later_job_of_a_round_not_needed_removes_its_row_block_work(adaptive_run, tmp_path):
    """On Slurm the ``check`` phase that meets the target and the round's ``finish`` are two
    jobs; the work the check leaves is removed by any later job of the round, or the solve.
    """
    run = tmp_path / "run"
    shutil.copytree(adaptive_run, run)
    left = RunDir(run).row_work(300, "train", "basis_round4", 1000)
    left.mkdir()
    run_hessov("basis", str(run), "step=300", "split=train", "round=round4")
    assert not left.exists()
