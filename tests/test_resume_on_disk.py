"""`hessov resume` and `hessov status` finish the sketch the run directory holds, not the
one its config's defaults would lay out: a layout made by hand with other k, s, block_size
or recovery, with measurements partly taken with indices=a:b. A worker killed by SIGKILL and
rerun is tested in tests/test_hessian_stages.py, a resume on the real Slurm cluster in
tests/test_slurm_submitit.py (a cancelled task).
"""

from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import TINY_SKETCH, laid_out, measured_and_solved, run_hessov

pytestmark = pytest.mark.kernel_path

# preset=tiny's defaults are two_pass, k=30, block_size=10, MEAS_PER_JOB=10: each hand-made
# layout below differs from them.
SINGLE_PASS_BY_HAND = ["recovery=single_pass", "k=24", "s=48", "block_size=4", "MEAS_PER_JOB=16"]
EIGEN = "eigen/step_300_train.h5"


def reference_of(trained: Path, tmp_path: Path, layout: list[str]) -> Path:
    """The hand-made ``layout`` measured and solved with nothing killed."""
    run = laid_out(trained, tmp_path / "ref", *layout)
    return measured_and_solved(run, two_pass="recovery=single_pass" not in layout)


def assert_same_eigen_file(reference: Path, other: Path):
    """Bitwise: the same machine, kernel path and blocks computed the same products."""
    with h5py.File(reference / EIGEN) as a, h5py.File(other / EIGEN) as b:
        assert np.array_equal(a["eigenvalues"][:], b["eigenvalues"][:])
        assert np.array_equal(a["eigenvectors"][:], b["eigenvectors"][:])
        assert a.attrs["k"] == b.attrs["k"] and a.attrs["recovery"] == b.attrs["recovery"]


def test_resume_finishes_partial_indices_of_a_hand_made_single_pass_layout(tiny_trained, tmp_path):
    reference = reference_of(tiny_trained, tmp_path, SINGLE_PASS_BY_HAND)
    run = laid_out(tiny_trained, tmp_path / "partial", *SINGLE_PASS_BY_HAND)
    run_hessov("measure", str(run), *TINY_SKETCH, "indices=0:20")
    status = run_hessov("status", str(run)).stdout
    assert "step 300 train: first round 20/48 measured (missing indices 20-47" in status
    assert "array tasks [1, 2]" in status and "second round" not in status
    run_hessov("resume", str(run))
    assert (
        "first round 48/48 measured; apost round 10/10 measured; solved"
        in run_hessov("status", str(run)).stdout
    )
    assert_same_eigen_file(reference, run)


def test_layout_with_other_settings_is_still_refused(tiny_trained, tmp_path):
    run = laid_out(tiny_trained, tmp_path / "run", *SINGLE_PASS_BY_HAND)
    refused = run_hessov("layout", str(run), "k=30", check=False)
    assert refused.returncode == 2 and "already fixes" in refused.stderr
