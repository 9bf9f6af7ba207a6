"""`hessov run backend=slurm` (submitit) on the real local Slurm cluster: the whole chain to the
local backend's eigenpairs, `hessov status` with job states, a cancelled array task finished by
`hessov resume backend=slurm`, bounded waits, and bad input refused before any submission.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import REPO, TARGET, last_line, run_hessov
from equivalence import assert_equivalent_runs
from oracles import dense_hessian
from slurm_cluster import slurm_cluster

# The tiny config's train split, three measurement array tasks per round; every chain here
# sketches step 300 only (13 short jobs for the plain run): both steps go through the sbatch
# chain in tests/test_slurm_pipeline.py.
TINY = ["problem=mnist_mini", "preset=tiny", "HESSIAN_SPLITS=[train]"]
ONE_STEP = [*TINY, "HESSIAN_STEPS=[300]"]
# Short polls for tests; a bound far above the chain's duration, so that a hang still ends.
FOLLOW = ["slurm.poll_seconds=1", "slurm.wait_timeout_minutes=12"]


#: Step 300 with a target that its third round meets (tests/test_rounds.py): four rounds
#: planned, the fourth's jobs submitted and finding nothing to do.
ONE_STEP_TARGET = [*ONE_STEP, *TARGET]


#: The diagonal from one array task of 64 probes (its finish is one more job).
DIAGONAL = ["estimates=[diagonal]", "diagonal_probes=64"]


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    return Path(last_line(run_hessov("run", *ONE_STEP, f"OUTPUT_DIR={out}").stdout))


@pytest.fixture
def own_jobs():
    """Run directories whose jobs this test submitted; any still queued at the end are
    cancelled, so that a failing test leaves nothing on the shared cluster.
    """
    runs: list[Path] = []
    yield runs
    for run in runs:
        ids = [job["job_id"] for sub in submissions(run) for job in sub["jobs"]]
        if ids:
            subprocess.run(["scancel", *ids], capture_output=True, timeout=30, check=False)


def submissions(run: Path) -> list[dict]:
    store = run / "slurm" / "jobs.json"
    return json.loads(store.read_text())["submissions"] if store.is_file() else []


def wait_until_dequeued(job_ids: list[str], timeout: float) -> None:
    """Poll squeue until none of ``job_ids`` is pending or running (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        queue = subprocess.run(
            ["squeue", "-h", "-r", "-o", "%i"], capture_output=True, text=True, timeout=30
        ).stdout.split()
        if not set(queue) & set(job_ids):
            return
        assert time.monotonic() < deadline, f"jobs {job_ids} still queued after {timeout} s"
        time.sleep(0.5)


def assert_same_eigenpairs(reference: Path, other: Path, steps: list[int]):
    """Within the tolerances of tests/equivalence.py: the jobs may round differently."""
    assert_equivalent_runs(reference, other, [(step, "train") for step in steps], analysis=False)


def part_times(run: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in run.glob("measurements/*/*/part_*.h5")}


# ---------------------------------------------------------------------------------------------
# Without a cluster: the job graph and the checks before submission


@pytest.mark.parametrize(
    "override, key",
    [
        ("slurm.stages.measure.time_minutes=-1", "slurm.stages.measure.time_minutes"),
        ("slurm.cpus_per_task=0", "slurm.cpus_per_task"),
        ("slurm.stages.nosuch.time_minutes=5", "slurm.stages.nosuch"),
        ("slurm.additional_parameters={dependency: x}", "slurm.additional_parameters.dependency"),
        ("slurm.wait_timeout_minutes=0", "slurm.wait_timeout_minutes"),
    ],
)
def test_bad_slurm_settings_are_refused_naming_the_key(override, key):
    from hessov.config import load_run_config
    from hessov.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"^{key}:"):
        load_run_config([*TINY, override])


def test_no_sbatch_on_path_is_refused_before_anything_exists(tmp_path):
    out = tmp_path / "runs"
    result = run_hessov(
        "run", *TINY, "backend=slurm", f"OUTPUT_DIR={out}", check=False, env={"PATH": str(tmp_path)}
    )
    assert result.returncode == 2
    assert "backend: backend=slurm needs the Slurm clients" in result.stderr
    assert "sbatch" in result.stderr
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# On the real local cluster


@pytest.mark.slurm
def test_unknown_partition_or_impossible_resources_submit_nothing(slurm_cluster, tmp_path):
    out = tmp_path / "runs"
    partition = run_hessov(
        "run", *TINY, "backend=slurm", f"OUTPUT_DIR={out}",
        "slurm.stages.measure.partition=nosuch", check=False,
    )  # fmt: skip
    assert partition.returncode == 2
    assert "slurm.stages.measure.partition: unknown partition 'nosuch'" in partition.stderr
    gpus = run_hessov(
        "run", *TINY, "backend=slurm", f"OUTPUT_DIR={out}", "slurm.stages.solve.gpus_per_node=1",
        check=False,
    )  # fmt: skip
    assert gpus.returncode == 2
    assert "slurm.stages.solve: Slurm refuses the solve job's resources" in gpus.stderr
    assert "--gpus-per-node=1" in gpus.stderr
    assert not out.exists()


@pytest.mark.slurm
@pytest.mark.kernel_path
def test_run_on_slurm_reproduces_the_local_backend_and_never_measures_twice(
    slurm_cluster, local_reference, tmp_path, own_jobs
):
    out = tmp_path / "runs"
    args = [*ONE_STEP, *DIAGONAL, "backend=slurm", f"OUTPUT_DIR={out}", *FOLLOW, "--wait"]
    result = run_hessov("run", *args)
    run = Path(last_line(result.stdout))
    own_jobs.append(run)
    # 1 train, 1 layout; for step 300: 3 + 3 measurement tasks, the a-posteriori round's
    # task, basis, solve, the diagonal's task and finish, analyze; the report.
    expected = 2 + 12 + 1
    assert f"all {expected} jobs completed" in result.stderr  # the verdict, on stderr
    assert_same_eigenpairs(local_reference, run, [300])
    (submission,) = submissions(run)
    jobs = {job["name"]: job for job in submission["jobs"]}
    assert len(jobs) == expected
    assert jobs["layout"]["after"] == [jobs["train"]["job_id"]]
    master = jobs["measure first step=300 split=train task=2"]["job_id"].split("_")[0]
    assert jobs["basis step=300 split=train"]["after"] == [master]
    assert f"{jobs['train']['job_id']} train" in result.stdout  # job ids printed on stdout
    # The diagonal's job on a Slurm node: within its interval of the exact one
    # (tests/test_estimates.py).
    with h5py.File(run / "estimates/step_300_train/diagonal.h5") as handle:
        estimate = torch.from_numpy(handle["diagonal"][:])
        ci95 = torch.from_numpy(handle["ci95"][:])
    exact = dense_hessian(run, 300, "train").diagonal()
    assert (estimate - exact).norm() <= 2 * ci95.norm()

    status = run_hessov("status", str(run)).stdout
    assert (
        "step 300 train: first round 30/30 measured; second round 30/30 measured; "
        "apost round 10/10 measured; solved" in status
    )
    for name, job in jobs.items():
        assert any(
            line.split()[-2:] == [job["job_id"], "COMPLETED"] and name in line
            for line in status.splitlines()
        ), (name, status)

    # Submitting the same run again measures nothing twice: nothing is submitted at all.
    before = part_times(run)
    again = run_hessov("resume", str(run), "backend=slurm", *FOLLOW, "--wait")
    assert "nothing to submit" in again.stderr
    assert len(submissions(run)) == 1
    assert part_times(run) == before
    rerun = run_hessov("run", *ONE_STEP, *DIAGONAL, "backend=slurm", f"RUN_DIR={run}", check=False)
    assert rerun.returncode == 2
    assert f"hessov resume {run} backend=slurm" in rerun.stderr
    assert len(submissions(run)) == 1

    # Without Slurm, status still prints the file state, and says so in one line.
    offline = run_hessov("status", str(run), env={"PATH": "/nonexistent"}).stdout
    assert "step 300 train: first round 30/30 measured" in offline
    unreachable = [line for line in offline.splitlines() if "Slurm not reachable" in line]
    assert len(unreachable) == 1 and "squeue is not on PATH" in unreachable[0]
    assert "COMPLETED" not in offline


@pytest.mark.slurm
def test_cancelled_task_is_reported_and_resumed_on_slurm(
    slurm_cluster, adaptive_run, tmp_path, own_jobs
):
    """A cancelled task of a run whose rounds a target ends: reported, resumed to the local
    run's eigenpairs, with only the missing task measured again and no fourth round.
    """
    out = tmp_path / "runs"
    command = ["run", *ONE_STEP_TARGET, "backend=slurm", f"OUTPUT_DIR={out}", *FOLLOW, "--wait"]
    follower = subprocess.Popen(
        [sys.executable, "-m", "hessov.cli", *command],
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # The fault: task 1 of the first measurement round is cancelled while it waits for
        # training; Slurm then cancels everything that depends on the array.
        name = "measure first step=300 split=train task=1"
        deadline = time.monotonic() + 120
        while True:
            runs = list(out.glob("*")) if out.is_dir() else []
            jobs = (
                {job["name"]: job for sub in submissions(runs[0]) for job in sub["jobs"]}
                if runs
                else {}
            )
            if name in jobs:
                break
            assert time.monotonic() < deadline and follower.poll() is None, "no submission"
            time.sleep(0.2)
        run = runs[0]
        own_jobs.append(run)
        killed = jobs[name]["job_id"]
        subprocess.run(["scancel", killed], check=True, timeout=30)
        stdout, stderr = follower.communicate(timeout=900)
    finally:
        follower.kill()
    assert follower.returncode == 1
    assert f"{name} ({killed}): CANCELLED" in stderr
    assert "step 300 train: first round missing indices 10-19 (array tasks [1])" in stderr
    assert f"hessov resume {run} backend=slurm --wait" in stderr
    assert last_line(stdout) == str(run)

    status = run_hessov("status", str(run)).stdout
    assert "step 300 train: first round 20/30 measured (missing indices 10-19" in status
    assert "array tasks [1]" in status
    # The job state next to the file state (a task cancelled while pending leaves no Slurm
    # record; hessov still names it cancelled).
    assert any(
        line.split()[:7] == [*name.split(), killed, "CANCELLED"] for line in status.splitlines()
    ), status

    measured = {p: t for p, t in part_times(run).items() if "/first/" in p}
    resumed = run_hessov("resume", str(run), "backend=slurm", *FOLLOW, "--wait")
    assert "all " in resumed.stderr and "jobs completed" in resumed.stderr
    assert_same_eigenpairs(Path(adaptive_run), run, [300])
    latest = [job["name"] for job in submissions(run)[-1]["jobs"]]
    where = "step=300 split=train"
    assert latest[:14] == [
        f"measure first {where} task=1",  # only the cancelled task; training and layout kept
        *(
            name
            for round_name in ("second", "round3", "round4")
            for name in (
                f"basis {where}" if round_name == "second" else f"basis {round_name} {where}",
                *(f"measure {round_name} {where} task={task}" for task in range(3)),
            )
        ),
        f"solve {where}",
    ]
    summary = json.loads(run_hessov("summary", str(run)).stdout)["solve"]["300"]["train"]
    assert (summary["rounds"], summary["rounds_stopped_by"]) == (3, "target_rel_err")
    assert "round4 round not needed" in run_hessov("status", str(run)).stdout
    remeasured = {p for p, t in part_times(run).items() if p in measured and measured[p] != t}
    assert remeasured == {p for p in measured if p.endswith("part_00001.h5")}


@pytest.mark.slurm
def test_wait_is_bounded_and_a_queued_run_is_not_submitted_twice(slurm_cluster, tmp_path, own_jobs):
    out = tmp_path / "runs"
    # The train job may not start for an hour (sbatch --begin, an extra option of one stage):
    # the whole chain stays queued for as long as this test looks at it.
    held = "slurm.stages.train.additional_parameters={begin: now+3600}"
    result = run_hessov(
        "run", *ONE_STEP, "backend=slurm", f"OUTPUT_DIR={out}", held,
        "slurm.wait_timeout_minutes=0.01", "slurm.poll_seconds=0.2", "--wait", check=False,
    )  # fmt: skip
    run = Path(last_line(result.stdout))
    own_jobs.append(run)
    assert result.returncode == 1
    assert "stopped waiting after slurm.wait_timeout_minutes=0.01" in result.stderr
    assert "train (" in result.stderr.split("still queued or running")[1]
    assert "train: not finished" in result.stderr  # the missing work, from the files
    ids = [job["job_id"] for job in submissions(run)[0]["jobs"]]

    status = run_hessov("status", str(run)).stdout
    assert any(line.split()[:3] == ["train", ids[0], "PENDING"] for line in status.splitlines())
    twice = run_hessov("resume", str(run), "backend=slurm", check=False)
    assert twice.returncode == 2
    assert "jobs of an earlier submission are still queued or running" in twice.stderr
    assert len(submissions(run)) == 1

    subprocess.run(["scancel", *ids], check=True, timeout=30)
    wait_until_dequeued(ids, timeout=120)
    status = run_hessov("status", str(run)).stdout
    assert "train:  not finished" in status
    assert any(line.split()[:3] == ["train", ids[0], "CANCELLED"] for line in status.splitlines())
