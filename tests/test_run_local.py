"""`hessov run` (local backend), `hessov status` and `hessov resume`, end to end."""

import shutil

import h5py
import numpy as np


def test_run_produces_every_stage_summary(tiny_run, summary_of):
    summary = summary_of(tiny_run)
    assert summary["train"]["recorded_steps"] == [100, 300]
    assert summary["layout"]["tasks_per_step_and_split"] == 3
    for step in ("100", "300"):
        for split in ("train", "test"):
            solved = summary["solve"][step][split]
            assert solved["recovery"] == "two_pass" and len(solved["eigenvalues"]) == 30
            assert solved["hvps"] == 60


def test_status_names_missing_indices_and_resume_completes(tiny_run, tmp_path, hessov):
    run = tmp_path / "partial"
    shutil.copytree(tiny_run, run)
    shutil.rmtree(run / "eigen")
    parts = run / "measurements/step_300_test/first"
    for part in ("part_00001.h5", "part_00002.h5"):  # indices 10-29: tasks 1 and 2
        with h5py.File(parts / part, "r+") as handle:
            handle["flags"][:] = 0
    status = hessov("status", str(run)).stdout
    assert "step 300 test: first round 10/30 measured (missing indices 10-29" in status
    assert "array tasks [1, 2]" in status and "not solved" in status
    hessov("resume", str(run))
    status = hessov("status", str(run)).stdout
    assert "missing indices" not in status and "not solved" not in status
    for step in (100, 300):
        for split in ("train", "test"):
            with (
                h5py.File(f"{tiny_run}/eigen/step_{step}_{split}.h5") as a,
                h5py.File(run / f"eigen/step_{step}_{split}.h5") as b,
            ):
                # Bitwise by construction: resume re-measures the same blocks on the same
                # machine and kernel path.
                assert np.array_equal(a["eigenvalues"][:], b["eigenvalues"][:])
