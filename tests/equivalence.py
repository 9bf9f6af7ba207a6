"""Two runs of one sketch, compared within the tolerances of :mod:`skerch_ext.tolerances`.

Used wherever the two runs' products may round differently: another backend (Slurm tasks
run with other thread counts), another kernel path (the heterogeneous-cluster tests), or
another CPU (CI's reruns under ``ATEN_CPU_CAPABILITY`` and ``MKL_*``). Where the bits are
the same by construction the tests compare with ``np.array_equal`` instead.

- Eigenvalues the sketch resolves (the top ``m`` for the largest gapped size ``m`` below)
  agree within ``2 g(D) ||H||``; all ``k`` agree within the two runs' own a-posteriori
  errors, doubled for the estimate's chance of reading low.
- The top-``m`` eigenvector spaces are compared only for sizes ``m <= MAX_SIZE`` with a gap
  that defines them, by Davis-Kahan; at least one such size must exist.
- The analysis overlap curve at such an ``m`` depends only on that space: it moves by at most
  ``2 sin theta`` (``|tr(P_mask (P_a - P_b))| <= rank(P_a - P_b) ||P_a - P_b||_2 / m``), plus
  the departure of each stored basis from orthonormality.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import torch

from skerch_ext.tolerances import (
    eigenvalue_tolerance,
    largest_angle_sine,
    subspace_tolerance,
)

#: The largest top-m space compared (the analysis reports k = 1, 5, 10, ...).
MAX_SIZE = 10


def _read(path: Path) -> dict:
    with h5py.File(path, "r") as handle:
        return {
            "values": torch.from_numpy(handle["eigenvalues"][:]),
            "vectors": torch.from_numpy(handle["eigenvectors"][:]),
            "dtype": getattr(torch, handle.attrs["dtype"]),
            "apost_error": float(handle.attrs["apost_error"]),
        }


def _non_orthonormality(vectors: torch.Tensor) -> float:
    gram = vectors.double().T @ vectors.double()
    return torch.linalg.matrix_norm(gram - torch.eye(gram.shape[0], dtype=gram.dtype), 2).item()


def compare_eigen_files(reference: Path, other: Path) -> dict:
    """Check ``other``'s eigenpairs against ``reference``'s; returns the figures compared:
    ``tolerance``, ``gapped_sizes`` with their ``sines`` and ``bounds``, and the largest
    eigenvalue differences (``resolved_difference`` and ``all_difference``)."""
    a, b = _read(reference), _read(other)
    dim = a["vectors"].shape[0]
    norm = max(a["values"].abs().max().item(), b["values"].abs().max().item())
    tolerance = eigenvalue_tolerance(norm, dim, a["dtype"])
    bounds = {}
    for size in range(1, min(MAX_SIZE, len(a["values"]) - 1) + 1):
        bound_a = subspace_tolerance(a["values"], size, tolerance)
        bound_b = subspace_tolerance(b["values"], size, tolerance)
        if bound_a is not None and bound_b is not None:
            bounds[size] = max(bound_a, bound_b)
    assert bounds, f"no gap among the top {MAX_SIZE} eigenvalues of {reference} defines a space"
    sines = {m: largest_angle_sine(a["vectors"][:, :m], b["vectors"][:, :m]) for m in bounds}
    for size, sine in sines.items():
        assert sine <= bounds[size], f"top-{size} spaces: sin {sine:.3g} > {bounds[size]:.3g}"
    resolved = max(bounds)
    difference = (a["values"].double() - b["values"].double()).abs()
    assert difference[:resolved].max() <= tolerance, (difference[:resolved], tolerance)
    sketch_error = 2 * (a["apost_error"] + b["apost_error"])
    loose = eigenvalue_tolerance(norm, dim, a["dtype"], sketch_error=sketch_error)
    assert difference.max() <= loose, (difference, loose)
    return {
        "tolerance": tolerance,
        "gapped_sizes": sorted(bounds),
        "sines": sines,
        "bounds": bounds,
        "resolved_difference": difference[:resolved].max().item(),
        "all_difference": difference.max().item(),
        "non_orthonormality": max(map(_non_orthonormality, (a["vectors"], b["vectors"]))),
    }


def assert_equivalent_runs(reference: Path, other: Path, sketches, analysis: bool = True):
    """:func:`compare_eigen_files` for every ``(step, split)`` of ``sketches``; with
    ``analysis``, also the overlap curves at the gapped sizes (module docstring)."""
    for step, split in sketches:
        name = f"step_{step}_{split}.h5"
        figures = compare_eigen_files(reference / "eigen" / name, other / "eigen" / name)
        if not analysis:
            continue
        with (
            h5py.File(reference / "analysis/steps" / name) as a,
            h5py.File(other / "analysis/steps" / name) as b,
        ):
            for size in figures["gapped_sizes"]:
                allowed = 2 * figures["sines"][size] + 2 * figures["non_orthonormality"]
                moved = abs(float(a["overlap"][size - 1]) - float(b["overlap"][size - 1]))
                assert moved <= allowed, (name, size, moved, allowed)
    if analysis:
        assert (other / "analysis/report.md").is_file()
