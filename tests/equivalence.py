"""Two runs of one sketch, compared within the tolerances of :mod:`hessov.skerch_ext.tolerances`.

Used wherever the two runs' products may round differently: another backend (Slurm tasks
run with other thread counts), another kernel path (the heterogeneous-cluster tests), or
another CPU (CI's reruns under ``ATEN_CPU_CAPABILITY`` and ``MKL_*``). Where the bits are
the same by construction the tests compare with ``np.array_equal`` instead.

- :func:`hessov.skerch_ext.tolerances.compare_eigenpairs`: eigenvalues the sketch resolves (the top
  ``m`` for the largest gapped size ``m``) within ``2 g(D) ||H||``, all ``k`` within the two
  runs' own a-posteriori errors (doubled for the estimate's chance of reading low), and the
  top-``m`` spaces, for ``m <= 10`` with a gap that defines them, by Davis-Kahan; at least
  one such size must exist.
- The analysis overlap curve at such an ``m`` depends only on that space: it moves by at most
  ``2 sin theta`` (``|tr(P_mask (P_a - P_b))| <= rank(P_a - P_b) ||P_a - P_b||_2``, over
  ``m``), plus each stored basis's departure from orthonormality.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import torch

from hessov.skerch_ext.tolerances import Agreement, compare_eigenpairs


def _read(path: Path) -> dict:
    with h5py.File(path, "r") as handle:
        return {
            "pairs": (
                torch.from_numpy(handle["eigenvalues"][:]),
                torch.from_numpy(handle["eigenvectors"][:]),
            ),
            "dtype": getattr(torch, handle.attrs["dtype"]),
            "apost_error": float(handle.attrs["apost_error"]),
        }


def _non_orthonormality(vectors: torch.Tensor) -> float:
    gram = vectors.double().T @ vectors.double()
    return torch.linalg.matrix_norm(gram - torch.eye(gram.shape[0], dtype=gram.dtype), 2).item()


def compare_eigen_files(reference: Path, other: Path) -> Agreement:
    """Assert that ``other``'s eigenpairs agree with ``reference``'s; returns the figures."""
    a, b = _read(reference), _read(other)
    agreement = compare_eigenpairs(
        a["pairs"], b["pairs"], a["dtype"], sketch_error=2 * (a["apost_error"] + b["apost_error"])
    )
    assert agreement.holds, (reference, other, agreement)
    return agreement


def assert_equivalent_runs(reference: Path, other: Path, sketches, analysis: bool = True):
    """:func:`compare_eigen_files` for every ``(step, split)`` of ``sketches``; with
    ``analysis``, also the overlap curves at the gapped sizes (module docstring).
    """
    for step, split in sketches:
        name = f"step_{step}_{split}.h5"
        agreement = compare_eigen_files(reference / "eigen" / name, other / "eigen" / name)
        if not analysis:
            continue
        slack = 2 * max(
            _non_orthonormality(_read(run / "eigen" / name)["pairs"][1])
            for run in (reference, other)
        )
        with (
            h5py.File(reference / "analysis/steps" / name) as a,
            h5py.File(other / "analysis/steps" / name) as b,
        ):
            for size, sine in agreement.sines.items():
                moved = abs(float(a["overlap"][size - 1]) - float(b["overlap"][size - 1]))
                assert moved <= 2 * sine + slack, (name, size, moved, sine)
    if analysis:
        assert (other / "analysis/report.md").is_file()
