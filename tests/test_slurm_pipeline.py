"""The sbatch chain (slurm/submit_chain.sh) on a real local Slurm cluster runs the tiny
mnist_mini pipeline, in row blocks and three Krylov rounds, to the numbers of `hessov run
backend=local` in memory, within the tolerances of tests/equivalence.py (the Slurm tasks may
round differently). That the chain submits exactly the plan's jobs is tested in
tests/test_graph.py, with the sequential emulation without Slurm (slurm/run_sequential.sh);
a cancelled task and its resume on Slurm in tests/test_slurm_submitit.py.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest

from conftest import REPO, last_line
from equivalence import assert_equivalent_runs
from hessov.skerch_ext.hutchinson import Z95
from oracles import dense_hessian
from slurm_cluster import slurm_cluster, wait_for_jobs

pytestmark = pytest.mark.kernel_path

# Three measurement array tasks per round; the train split only, to keep the chain's short
# jobs within the test suite's time.
TINY = ["problem=mnist_mini", "preset=tiny", "HESSIAN_SPLITS=[train]"]
HESSOV = str(Path(sys.executable).parent / "hessov")


def wait_until_dequeued(env: dict, job_id: str, timeout: float) -> None:
    """Poll squeue until no task of ``job_id`` is pending or running (bounded)."""
    deadline = time.monotonic() + timeout
    while subprocess.run(
        ["squeue", "-h", "-j", job_id], env=env, capture_output=True, text=True, timeout=30
    ).stdout.strip():
        assert time.monotonic() < deadline, f"job {job_id} still queued after {timeout} s"
        time.sleep(0.5)


def submit_chain(slurm_cluster: dict, tmp_path: Path, *settings: str) -> tuple[Path, dict]:
    """slurm/submit_chain.sh on the tiny config with ``settings``: the run directory and the
    jobs, ``{NAME: ID}`` in the order of the stage graph `hessov plan` lists.
    """
    submitted = subprocess.run(
        ["bash", "slurm/submit_chain.sh", *TINY, *settings, f"OUTPUT_DIR={tmp_path / 'runs'}"],
        cwd=REPO,
        env={**slurm_cluster, "HESSOV": HESSOV, "HESSOV_SLURM_LOGS": str(tmp_path / "logs")},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    jobs = dict(line.rsplit(" ", 1) for line in submitted.stdout.splitlines()[:-1])
    return Path(last_line(submitted.stdout)), jobs


#: Step 300 with a target its third round meets (tests/test_rounds.py), at most three rounds:
#: the check after the second round (a row-block phase) asks for the third. Skipping a round
#: on Slurm is tested in tests/test_slurm_submitit.py.
ONE_STEP_TARGET = [
    "HESSIAN_STEPS=[300]",
    "target_rel_err=0.01",
    "target_eigenpairs=3",
    "max_rounds=3",
]


@pytest.mark.slurm
def test_sbatch_chain_runs_the_row_block_phases_and_rounds_as_job_arrays(
    slurm_cluster, adaptive_run, tmp_path
):
    """With row blocks (2 of them: 4,096 rows and the 2,934 left of D = 7,030), the basis
    (of each Krylov round) and the solve are one job per phase, a per-block phase an array
    with a task per row block, and the chain of three rounds ends at the in-memory local
    run's eigenpairs within the equivalence tolerances.
    """
    trace = ["estimates=[trace]", "trace_probes=128"]  # two array tasks of 64 probes
    run_dir, jobs = submit_chain(
        slurm_cluster, tmp_path, *ONE_STEP_TARGET, "row_block=4096", *trace
    )
    where = "step=300 split=train"
    basis = [name for name in jobs if name.startswith("basis ") and " round" not in name]
    krylov = [name for name in jobs if name.startswith("basis ") and " round3 " in name]
    solve = [name for name in jobs if name.startswith("solve ")]
    assert basis == [f"basis {phase} {where}" for phase in ("local", "tree", "apply", "finish")]
    assert len(krylov) == 11 and krylov[-2:] == [
        f"basis {p} round3 {where}" for p in ("check", "finish")
    ]
    assert len(solve) == 14 and solve[-1] == f"solve finish {where}"
    per_block = [
        f"{phase} {where}"
        for phase in (
            "basis local",
            "basis apply",
            "basis reorth_apply round3",
            "solve extend_local",
            "solve eigenvectors",
            "trace probes",
        )
    ]
    tasks = {}
    for name, job_id in jobs.items():
        wait_until_dequeued(slurm_cluster, job_id, timeout=900)
        # sacct may list an array's tasks a moment after they leave the queue.
        records = wait_for_jobs(slurm_cluster, job_id, 2 if name in per_block else 1)
        assert {state for state, _ in records.values()} == {"COMPLETED"}, (name, records)
        tasks[name] = sorted(record.partition("_")[2] for record in records)
    for name in per_block:
        assert tasks[name] == ["0", "1"]  # an array task per row block
    assert tasks[f"solve extend_tree {where}"] == [""]  # one job
    assert_equivalent_runs(Path(adaptive_run), run_dir, [(300, "train")])
    assert not list(run_dir.glob("measurements/*/*_rows_*"))  # the work directories are gone
    with h5py.File(run_dir / "eigen/step_300_train.h5") as handle:
        assert handle.attrs["rounds"] == 3
    # The trace's probes read the basis and its products by row blocks: within 4 standard
    # errors of the exact trace (tests/test_estimates.py).
    names = list(jobs)
    assert names.index(f"trace finish {where}") == names.index(f"trace probes {where}") + 1
    with h5py.File(run_dir / "estimates/step_300_train/trace.h5") as handle:
        value, ci95 = float(handle.attrs["value"]), float(handle.attrs["ci95"])
        assert handle.attrs["basis_width"] == 60  # two exactly projected blocks of k = 30
    exact = float(dense_hessian(run_dir, 300, "train").diagonal().sum())
    assert abs(value - exact) <= 4 * ci95 / Z95
    solved = json.loads((run_dir / "summary/solve/300/train.json").read_text())
    assert solved["rounds_stopped_by"] == "max_rounds" and solved["target_met"]  # by the last
    checks = json.loads((run_dir / "measurements/step_300_train/krylov_checks.json").read_text())
    assert [(check["after_round"], check["met"]) for check in checks] == [(2, False)]
