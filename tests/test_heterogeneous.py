"""A heterogeneous cluster: the array tasks of one sketch run on different kernel paths (one
task per setting of tests/kernel_paths.py, rotated between rounds), as node types of one
job array would: the real local Slurm cluster gets one ``sbatch --export`` of
slurm/job.sbatch per task. They reproduce the single-process eigenpairs within the
tolerances of tests/equivalence.py, and `hessov solve` accepts every measurement (checksums
are of the bits each task wrote).
"""

import os
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import REPO, laid_out, measured_and_solved
from equivalence import compare_eigen_files
from kernel_paths import on_path, setting_of, torch_has_vector_kernels
from slurm_cluster import sbatch, slurm_cluster, wait_for_jobs

pytestmark = pytest.mark.kernel_path

HESSOV = str(Path(sys.executable).parent / "hessov")
WHERE = ["step=300", "split=train"]
# preset=tiny: two-pass, three array tasks per sketch round, one for the 10 a-posteriori probes.
ROUNDS = ("first", "second", "apost")
TASKS = {"first": 3, "second": 3, "apost": 1}
EIGEN = "eigen/step_300_train.h5"


def script_env(setting: dict | None = None, **extra: str) -> dict[str, str]:
    """The job script's environment; with ``setting``, on exactly that kernel path."""
    env = {**os.environ, "HESSOV": HESSOV, **extra}
    return env if setting is None else on_path(env, setting)


def job_args(run: Path, stage: str, *args: str) -> list[str]:
    """slurm/job.sbatch's arguments for ``stage`` of step 300's train split."""
    return [str(REPO / "slurm" / "job.sbatch"), stage, str(run), *WHERE, *args]


def assert_mixed_and_equivalent(reference: Path, run: Path):
    if torch_has_vector_kernels():  # otherwise ATEN_CPU_CAPABILITY=default changes nothing
        # The reference ran on this process's path, which is one of the tasks' paths at most:
        # another task's part must differ from it.
        parts = sorted((run / "measurements/step_300_train/first").glob("part_*.h5"))
        differ = []
        for part in parts:
            with h5py.File(reference / part.relative_to(run)) as a, h5py.File(part) as b:
                differ.append(not np.array_equal(a["outer"][:], b["outer"][:]))
        assert any(differ), "kernel paths not mixed"
    figures = compare_eigen_files(reference / EIGEN, run / EIGEN)
    assert figures.bounds


@pytest.fixture(scope="module")
def reference(tiny_trained, tmp_path_factory):
    return measured_and_solved(
        laid_out(tiny_trained, tmp_path_factory.mktemp("reference") / "run"), two_pass=True
    )


@pytest.mark.slurm
def test_slurm_array_tasks_on_mixed_kernel_paths(slurm_cluster, tiny_trained, reference, tmp_path):
    run = laid_out(tiny_trained, tmp_path / "run")
    logs = f"--output={tmp_path}/%x-%j_%a.out"

    def submit(args: list[str], *options: str, setting: dict | None = None) -> str:
        env = {**slurm_cluster, **script_env()}
        env = env if setting is None else on_path(env, setting)
        return sbatch(env, logs, *options, *args)

    previous: list[str] = []
    for number, round_name in enumerate(ROUNDS):
        after = [f"--dependency=afterok:{':'.join(previous)}"] if previous else []
        if round_name == "second":
            previous = [submit(job_args(run, "basis"), *after)]
            after = [f"--dependency=afterok:{previous[0]}"]
        previous = [
            submit(
                job_args(run, "measure", f"round={round_name}"),
                f"--array={task}",
                *after,
                setting=setting_of(task, number),
            )  # fmt: skip
            for task in range(TASKS[round_name])
        ]
    solve = submit(job_args(run, "solve"), f"--dependency=afterok:{':'.join(previous)}")
    assert wait_for_jobs(slurm_cluster, solve, timeout=600)[solve] == ("COMPLETED", "0:0")
    assert_mixed_and_equivalent(reference, run)
