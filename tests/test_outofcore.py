"""The basis and solve in row blocks (``row_block``) on a real run: the same eigenpairs as in
memory within the tolerances of skerch_ext/tolerances.py (tests/equivalence.py), whatever the
row block, and a phase killed half-way leaves its finished row blocks, whose rerun does only
the rest and gives the same bits.

TSQR, block sums and a row-wise ``W = [Q, P] U`` are backward stable like their in-memory
counterparts, so the two computations differ as two kernel paths do: by rounding, which the
equivalence tolerances bound (Weyl for the eigenvalues, Davis-Kahan for the gapped spaces).
"""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import REPO, TINY_SKETCH, laid_out, run_hessov
from equivalence import compare_eigen_files
from hessov.skerch_ext.tolerances import eigenvalue_tolerance

EIGEN = "eigen/step_300_train.h5"


@pytest.fixture(scope="module")
def first_round(tiny_trained, tmp_path_factory):
    """A run whose first round and a-posteriori round are measured (in memory layout)."""
    run = laid_out(tiny_trained, tmp_path_factory.mktemp("first") / "run", "row_block=-1")
    run_hessov("measure", str(run), *TINY_SKETCH)
    return run


def finish(run, *solve_args: str):
    """The basis, the second round and the solve, with ``solve_args`` for the basis and solve."""
    run_hessov("basis", str(run), *TINY_SKETCH, *solve_args)
    run_hessov("measure", str(run), *TINY_SKETCH, "round=second")
    run_hessov("solve", str(run), *TINY_SKETCH, *solve_args)
    return run


@pytest.fixture(scope="module")
def in_memory(first_round, tmp_path_factory):
    run = tmp_path_factory.mktemp("memory") / "run"
    shutil.copytree(first_round, run)
    return finish(run)


@pytest.fixture(scope="module")
def rows_of_30(first_round, tmp_path_factory):
    """The run finished uninterrupted in 234 row blocks of 30 rows."""
    run = tmp_path_factory.mktemp("rows") / "run"
    shutil.copytree(first_round, run)
    return finish(run, "row_block=30")


@pytest.mark.parametrize("row_block", [30, 1000, 7030])
def test_row_block_solve_equals_the_in_memory_one(
    first_round, in_memory, rows_of_30, tmp_path, row_block
):
    run = rows_of_30
    if row_block != 30:
        run = tmp_path / "run"
        shutil.copytree(first_round, run)
        finish(run, f"row_block={row_block}")
    compare_eigen_files(in_memory / EIGEN, run / EIGEN)
    with h5py.File(run / EIGEN) as rows, h5py.File(in_memory / EIGEN) as memory:
        assert rows["eigenvectors"].shape == memory["eigenvectors"].shape == (7030, 30)
        # The same probes and products: the estimates differ by rounding only.
        assert rows.attrs["apost_rel_err"] == pytest.approx(memory.attrs["apost_rel_err"], 1e-4)
        # The resolved pairs' residuals and bounds are functions of resolved eigenpairs:
        # within the eigenvalue tolerance of two runs (hessov.skerch_ext.tolerances).
        both = np.isfinite(rows["error_bounds"][:]) & np.isfinite(memory["error_bounds"][:])
        norm = float(abs(memory["eigenvalues"][0]))
        tolerance = eigenvalue_tolerance(norm, 7030, torch.float32)
        assert both[0]
        for name in ("residual_norms", "error_bounds"):
            np.testing.assert_allclose(
                rows[name][:][both], memory[name][:][both], atol=tolerance, rtol=0
            )
    with h5py.File(run / "measurements/step_300_train/basis.h5") as basis:
        assert basis.attrs["row_block"] == row_block
    assert not list((run / "measurements/step_300_train").glob("*_rows_*"))  # work removed


def test_single_pass_in_row_blocks_equals_the_in_memory_one(tiny_trained, tmp_path):
    memory = laid_out(tiny_trained, tmp_path / "memory", "recovery=single_pass", "row_block=-1")
    run_hessov("measure", str(memory), *TINY_SKETCH)
    rows = tmp_path / "rows"
    shutil.copytree(memory, rows)
    run_hessov("solve", str(memory), *TINY_SKETCH)
    run_hessov("solve", str(rows), *TINY_SKETCH, "row_block=1000")  # 7 row blocks
    compare_eigen_files(memory / EIGEN, rows / EIGEN)
    with h5py.File(rows / EIGEN) as blocked, h5py.File(memory / EIGEN) as whole:
        assert blocked.attrs["apost_rel_err"] == pytest.approx(whole.attrs["apost_rel_err"], 1e-4)


def killed_when(args: list[str], watched: Path, pattern: str, count: int) -> None:
    """Run ``hessov ARGS`` and SIGKILL it once ``count`` files match ``pattern`` in
    ``watched``: a task killed by the scheduler or the out-of-memory killer, mid-phase.
    """
    process = subprocess.Popen(
        [sys.executable, "-m", "hessov.cli", *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        if len(list(watched.glob(pattern))) >= count:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    assert process.wait() == -signal.SIGKILL, "the program finished before it was killed"


@pytest.mark.parametrize(("stage", "phase"), [("solve", "reorth_local")])
def test_a_killed_row_block_task_reruns_to_the_same_bits(
    first_round, rows_of_30, tmp_path, stage, phase
):
    run = tmp_path / "run"
    shutil.copytree(first_round, run)
    args = [str(run), *TINY_SKETCH, "row_block=30"]
    if stage == "solve":
        run_hessov("basis", *args)
        run_hessov("measure", str(run), *TINY_SKETCH, "round=second")
    work = run / f"measurements/step_300_train/{stage}_rows_30"
    killed_when([stage, *args], work, f"{phase}.block*.h5", 100)
    output = run / ("measurements/step_300_train/basis.h5" if stage == "basis" else EIGEN)
    assert not output.exists()  # nothing half-written under the output's name
    before = {path.name: path.stat().st_mtime_ns for path in work.glob(f"{phase}.block*.h5")}
    assert 100 <= len(before) < 234
    status = run_hessov("status", str(run)).stdout
    assert f"{stage}: phase {phase}, {len(before)}/234 row blocks done" in status
    run_hessov(stage, *args, f"phase={phase}")  # the killed phase alone: only what is missing
    after = {path.name: path.stat().st_mtime_ns for path in work.glob(f"{phase}.block*.h5")}
    assert len(after) == 234 and all(after[name] == mtime for name, mtime in before.items())
    run_hessov(stage, *args)  # and everything after it
    if stage == "basis":
        run_hessov("measure", str(run), *TINY_SKETCH, "round=second")
        run_hessov("solve", *args)
    assert not work.exists()  # removed with the outputs written
    # Bitwise by construction: the same blocks on the same machine and kernel path.
    with h5py.File(rows_of_30 / EIGEN) as a, h5py.File(run / EIGEN) as b:
        for name in ("eigenvalues", "eigenvectors"):
            assert np.array_equal(a[name][:], b[name][:])


def test_a_corrupt_measurement_stops_the_row_block_solve_and_is_named(first_round, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(first_round, run)
    args = [str(run), *TINY_SKETCH, "row_block=1000"]
    run_hessov("basis", *args)
    run_hessov("measure", str(run), *TINY_SKETCH, "round=second")
    part = run / "measurements/step_300_train/second/part_00000.h5"
    with h5py.File(part, "r+") as handle:
        handle["outer"][6500, 3] += 1.0  # a flipped value in the last row block, column 3
    refused = run_hessov("solve", *args, check=False)
    assert refused.returncode == 2
    assert "second round): measurements missing: none; corrupt: 3." in refused.stderr
    assert not (run / EIGEN).exists()
    # What was built on the bad column is gone: a rerun after re-measuring starts afresh.
    work = run / "measurements/step_300_train/solve_rows_1000"
    assert not list(work.glob("project.block*.h5"))


def test_the_layout_chooses_row_blocks_when_memory_does_not_fit(tiny_trained, tmp_path):
    # In memory the tiny solve needs the 300 MiB floor + 8 D x k float32 + the probes:
    # 308 MiB, over 0.3 GiB (307 MiB). Out of core, the smallest aligned block (4,096 rows).
    small = laid_out(tiny_trained, tmp_path / "small", "memory_gb=0.3")
    assert json.loads((small / "measurements/sketch.json").read_text())["row_block"] == 4096
    assert not list((small / "measurements").glob("merged_*.h5"))  # no D x k arrays
    large = laid_out(tiny_trained, tmp_path / "large", "memory_gb=1")
    assert json.loads((large / "measurements/sketch.json").read_text())["row_block"] == 0
    assert (large / "measurements/merged_train.h5").is_file()


def test_a_run_laid_out_before_the_a_posteriori_round_is_finished_by_resume(first_round, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(first_round, run)
    shutil.rmtree(run / "measurements/step_300_train/apost")
    spec_file = run / "measurements/sketch.json"
    spec = json.loads(spec_file.read_text())
    del spec["row_block"]  # as an older layout wrote it
    spec_file.write_text(json.dumps(spec))
    assert "apost round 0/10 measured" in run_hessov("status", str(run)).stdout
    run_hessov("resume", str(run))
    status = run_hessov("status", str(run)).stdout
    assert "apost round 10/10 measured; solved" in status


def test_resume_takes_a_row_block_for_what_is_left(first_round, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(first_round, run)
    refused = run_hessov("resume", str(run), "memory_gb=0.3", check=False)  # the analysis: 756 MiB
    assert refused.returncode == 2 and "analyze: " in refused.stderr
    run_hessov("resume", str(run), "row_block=4096")
    assert json.loads((run / "measurements/sketch.json").read_text())["row_block"] == 4096
    with h5py.File(run / "measurements/step_300_train/basis.h5") as basis:
        assert basis.attrs["row_block"] == 4096
    assert (run / EIGEN).is_file()
