"""The sbatch chain on a real local Slurm cluster runs the tiny mnist_mini pipeline to the
numbers of `hessov run backend=local`, within the tolerances of tests/equivalence.py (the
Slurm tasks may round differently), and finishes after a cancelled task. The sequential
emulation without Slurm (slurm/run_sequential.sh) is tested in tests/test_graph.py.
"""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest

from conftest import REPO, last_line
from equivalence import assert_equivalent_runs
from slurm_cluster import sacct_jobs, slurm_cluster, wait_for_jobs

pytestmark = pytest.mark.kernel_path

# Two recorded steps, three measurement array tasks per round; the train split only, to
# keep the ~20 short jobs of the chain within the test suite's time.
TINY = ["problem=mnist_mini", "preset=tiny", "HESSIAN_SPLITS=[train]"]
SKETCHES = [(100, "train"), (300, "train")]
HESSOV = str(Path(sys.executable).parent / "hessov")


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory):
    from conftest import run_hessov

    out = tmp_path_factory.mktemp("local")
    result = run_hessov("run", *TINY, f"OUTPUT_DIR={out}")
    run = Path(last_line(result.stdout))
    (run / "local.log").write_text(result.stderr)  # the jobs it ran, "[job i/N] NAME"
    return run


def local_log(run: Path) -> str:
    return (run / "local.log").read_text()


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


@pytest.mark.slurm
def test_sbatch_chain_with_a_cancelled_task_resumes_to_the_local_result(
    slurm_cluster, local_reference, tmp_path, hessov
):
    run_dir, jobs = submit_chain(slurm_cluster, tmp_path)
    # train, layout, per step and split: 3 arrays (first, second, a-posteriori), basis,
    # solve, analyze; then the report.
    assert len(jobs) == 2 + 6 * len(SKETCHES) + 1
    # The jobs the local backend ran for the same config, array tasks folded into their job.
    ran = re.findall(r"\[job \d+/\d+\] (.+?)(?: task=\d+)?$", local_log(local_reference), re.M)
    assert list(jobs) == list(dict.fromkeys(ran))
    # The fault: task 1 of step 300's first measurement round dies (still pending behind
    # training, so it never runs); everything downstream of it is cancelled by Slurm.
    killed = jobs["measure first step=300 split=train"]
    subprocess.run(["scancel", f"{killed}_1"], env=slurm_cluster, check=True, timeout=30)
    states = {}
    for name, job_id in jobs.items():
        # Jobs cancelled while pending (the killed task, and everything that depended on it)
        # never start, and sacct keeps an unexpanded array record for them: wait for each
        # job to leave the queue instead, then read the states sacct has.
        wait_until_dequeued(slurm_cluster, job_id, timeout=600)
        states[name] = {state for state, _ in sacct_jobs(slurm_cluster, job_id).values()}
    assert states["solve step=100 split=train"] == {"COMPLETED"}
    assert "COMPLETED" in states["measure first step=300 split=train"]  # tasks 0 and 2
    assert states["solve step=300 split=train"] == {"CANCELLED"}
    assert states["analyze step=100 split=train"] == {"COMPLETED"}
    assert states["analyze step=300 split=train"] == {"CANCELLED"}
    assert states["report"] == {"CANCELLED"}

    status = hessov("status", str(run_dir)).stdout
    assert "step 100 train: first round 30/30 measured" in status
    assert "step 300 train: first round 20/30 measured (missing indices 10-19" in status
    assert "array tasks [1]" in status
    hessov("resume", str(run_dir))
    assert_equivalent_runs(local_reference, run_dir, SKETCHES)
    parts = sorted(run_dir.glob("measurements/*/*/part_*.h5"))
    before = [p.stat().st_mtime_ns for p in parts]
    again = hessov("resume", str(run_dir))  # submitted twice: nothing is measured twice
    assert "HVPs/s" not in again.stderr
    assert [p.stat().st_mtime_ns for p in parts] == before


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
    run_dir, jobs = submit_chain(slurm_cluster, tmp_path, *ONE_STEP_TARGET, "row_block=4096")
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
    solved = json.loads((run_dir / "summary/solve/300/train.json").read_text())
    assert solved["rounds_stopped_by"] == "max_rounds" and solved["target_met"]  # by the last
    checks = json.loads((run_dir / "measurements/step_300_train/krylov_checks.json").read_text())
    assert [(check["after_round"], check["met"]) for check in checks] == [(2, False)]
