"""The local Slurm cluster (slurm/local-cluster.sh) runs what hessov's measure stage relies on:
batch jobs, job arrays, afterok dependencies, failures reported by sacct, and jobs that share the
node's CPUs. Each job writes into the test's tmp_path; every wait is bounded.
"""

# The fixture is imported by name, and each test's parameter of that name "redefines" it.

import subprocess

import pytest

import slurm_cluster as cluster
from slurm_cluster import slurm_cluster  # noqa: F401

pytestmark = pytest.mark.slurm


def submit(env, tmp_path, *args):
    """Run sbatch with the job's working directory and output in tmp_path."""
    return cluster.sbatch(env, f"--chdir={tmp_path}", f"--output={tmp_path}/slurm-%j.out", *args)


def test_batch_job_writes_file_and_completes(slurm_cluster, tmp_path):
    job = submit(slurm_cluster, tmp_path, "--job-name=hello", "--wrap", "echo hello > out.txt")
    rows = cluster.wait_for_jobs(slurm_cluster, job)
    assert rows[job] == ("COMPLETED", "0:0")
    assert (tmp_path / "out.txt").read_text() == "hello\n"


def test_job_array_tasks_see_their_index(slurm_cluster, tmp_path):
    job = cluster.sbatch(
        slurm_cluster,
        f"--chdir={tmp_path}",
        f"--output={tmp_path}/slurm-%A_%a.out",
        "--array=0-2",
        "--wrap",
        'echo "$SLURM_ARRAY_TASK_ID" > "task-$SLURM_ARRAY_TASK_ID.txt"',
    )
    rows = cluster.wait_for_jobs(slurm_cluster, job, count=3)
    assert rows == {f"{job}_{i}": ("COMPLETED", "0:0") for i in range(3)}
    for i in range(3):
        assert (tmp_path / f"task-{i}.txt").read_text() == f"{i}\n"


def test_afterok_dependency_runs_after_its_parent(slurm_cluster, tmp_path):
    # The parent sleeps so that, without the dependency, the child would run first and find
    # no file; with it, the child copies what the parent wrote.
    first = submit(slurm_cluster, tmp_path, "--wrap", "sleep 1; echo parent > first.txt")
    second = submit(
        slurm_cluster,
        tmp_path,
        f"--dependency=afterok:{first}",
        "--wrap",
        "cat first.txt > second.txt",
    )
    assert cluster.wait_for_jobs(slurm_cluster, second)[second] == ("COMPLETED", "0:0")
    assert cluster.sacct_jobs(slurm_cluster, first)[first] == ("COMPLETED", "0:0")
    assert (tmp_path / "second.txt").read_text() == "parent\n"


def test_failed_job_is_reported_and_its_dependent_never_runs(slurm_cluster, tmp_path):
    failing = submit(slurm_cluster, tmp_path, "--wrap", "sleep 1; exit 3")
    dependent = submit(
        slurm_cluster,
        tmp_path,
        f"--dependency=afterok:{failing}",
        "--kill-on-invalid-dep=yes",
        "--wrap",
        "touch dependent-ran.txt",
    )
    assert cluster.wait_for_jobs(slurm_cluster, failing)[failing] == ("FAILED", "3:0")
    # Slurm cancels the dependent once its dependency can never be satisfied.
    assert cluster.wait_for_jobs(slurm_cluster, dependent)[dependent][0] == "CANCELLED"
    assert not (tmp_path / "dependent-ran.txt").exists()


def test_two_jobs_share_the_node(slurm_cluster, tmp_path):
    """Two one-CPU jobs run at the same time (DefMemPerCPU keeps a job from taking all memory).

    Each job announces itself and waits (bounded) for the other's announcement, so both complete
    only if they ran together; no timing is measured.
    """
    cpus = int(cluster.slurm(slurm_cluster, "sinfo", "-h", "-N", "-o", "%c").split()[0])
    if cpus < 2:
        pytest.skip(f"the node has {cpus} CPU")
    script = "touch {me}; for i in $(seq 300); do [ -e {other} ] && exit 0; sleep 0.1; done; exit 1"
    a = submit(slurm_cluster, tmp_path, "-c1", "--wrap", script.format(me="a", other="b"))
    b = submit(slurm_cluster, tmp_path, "-c1", "--wrap", script.format(me="b", other="a"))
    assert cluster.wait_for_jobs(slurm_cluster, a)[a] == ("COMPLETED", "0:0")
    assert cluster.wait_for_jobs(slurm_cluster, b)[b] == ("COMPLETED", "0:0")


def test_status_reports_running_cluster(slurm_cluster):
    result = subprocess.run(
        ["bash", str(cluster.SCRIPT), "status"],
        env=slurm_cluster,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    last_line = result.stdout.strip().splitlines()[-1]
    assert last_line == f"export SLURM_CONF={slurm_cluster['SLURM_CONF']}"
