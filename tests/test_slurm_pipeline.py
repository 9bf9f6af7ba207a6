"""The sbatch chain on a real local Slurm cluster, and the sequential emulation without it:
both run the tiny mnist_mini pipeline to the numbers of `hessov run backend=local`, within
the tolerances of tests/equivalence.py (the Slurm tasks may round differently)."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, last_line
from equivalence import assert_equivalent_runs
from kernel_paths import current
from slurm_cluster import sacct_jobs, slurm_cluster

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
    return Path(last_line(run_hessov("run", *TINY, f"OUTPUT_DIR={out}").stdout))


def wait_until_dequeued(env: dict, job_id: str, timeout: float) -> None:
    """Poll squeue until no task of ``job_id`` is pending or running (bounded)."""
    deadline = time.monotonic() + timeout
    while subprocess.run(
        ["squeue", "-h", "-j", job_id], env=env, capture_output=True, text=True, timeout=30
    ).stdout.strip():
        assert time.monotonic() < deadline, f"job {job_id} still queued after {timeout} s"
        time.sleep(0.5)


@pytest.mark.slurm
def test_sbatch_chain_with_a_cancelled_task_resumes_to_the_local_result(
    slurm_cluster, local_reference, tmp_path, hessov
):
    env = {**slurm_cluster, "HESSOV": HESSOV, "HESSOV_SLURM_LOGS": str(tmp_path / "logs")}
    submitted = subprocess.run(
        ["bash", "slurm/submit_chain.sh", *TINY, f"OUTPUT_DIR={tmp_path / 'runs'}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    run_dir = Path(last_line(submitted.stdout))
    jobs = [line.split() for line in submitted.stdout.splitlines()[:-1]]
    # 1 train, 1 layout, and per step and split: basis, 2 arrays, solve, analyze.
    assert len(jobs) == 2 + 5 * len(SKETCHES)
    # The fault: task 1 of step 300's first measurement round dies (still pending behind
    # training, so it never runs); everything downstream of it is cancelled by Slurm.
    killed = next(j[-1] for j in jobs if j[:3] == ["measure-first", "300", "train"])
    subprocess.run(["scancel", f"{killed}_1"], env=env, check=True, timeout=30)
    states = {}
    for kind, *where, job_id in jobs:
        # Jobs cancelled while pending (the killed task, and everything that depended on it)
        # never start, and sacct keeps an unexpanded array record for them: wait for each
        # job to leave the queue instead, then read the states sacct has.
        wait_until_dequeued(slurm_cluster, job_id, timeout=600)
        states[(kind, *where)] = {state for state, _ in sacct_jobs(slurm_cluster, job_id).values()}
    assert states[("solve", "100", "train")] == {"COMPLETED"}
    assert "COMPLETED" in states[("measure-first", "300", "train")]  # tasks 0 and 2
    assert states[("solve", "300", "train")] == {"CANCELLED"}
    assert states[("analyze", "100", "train")] == {"COMPLETED"}
    assert states[("analyze", "300", "train")] == {"CANCELLED"}

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


def test_sequential_emulation_matches_the_local_backend(local_reference, tmp_path):
    # A bare environment, so the scripts rely on nothing of the caller's but HESSOV; the
    # kernel path stays the reference's (training on another path gives other parameters).
    env = {"HESSOV": HESSOV, "PATH": "/usr/bin:/bin", **current()}
    result = subprocess.run(
        ["bash", "slurm/run_sequential.sh", *TINY, f"OUTPUT_DIR={tmp_path}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=True,
    )
    assert_equivalent_runs(local_reference, Path(last_line(result.stdout)), SKETCHES)
