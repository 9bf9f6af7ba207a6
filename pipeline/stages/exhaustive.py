"""The exhaustive check: exact eigendecomposition next to the sketch, for small networks.

For D up to about 10,000 the whole Hessian fits in memory: ``H @ I`` a block of columns at
a time gives the dense matrix (in float64), ``eigh`` its exact eigenpairs, sorted by
``|lambda|`` (with ``which=smallest``, ascending: the sketch's order). Next to it the
sketched result at the run's settings: the solve stage's eigenpairs when they exist,
otherwise the in-core sketch with the layout's settings and seeds (the same math,
:func:`hessov.skerch_ext.incore.sketched_eigh`). Reported, as in the paper's
script 12a but comparing against the top-|lambda| eigenvectors and sign-invariantly (the
paper compared with eigh's ascending order, so every residual it logged was about
sqrt(2)): relative errors of the top eigenvalues, eigenvector residuals
``min(||w - v||, ||w + v||)``, and subspace overlaps ``||W[:, :k]^T V[:, :k]||_F^2 / k``.
The trace, diagonal and density estimates of the step and split, where computed, next to
their exact values (:mod:`hessov.exact_estimates`).
"""

from __future__ import annotations

import time
from pathlib import Path

import h5py
import numpy as np
import torch

from hessov import summary
from hessov.analysis.subspaces import sign_invariant_residuals
from hessov.config import RunConfig
from hessov.errors import ConfigError
from hessov.exact_estimates import compare_estimates
from hessov.hessian import hessian_at_step
from hessov.rundir import RunDir
from hessov.runlog import get_logger, log_event
from hessov.skerch_ext.incore import sketched_eigh
from hessov.skerch_ext.operator import dense_matrix
from hessov.sketchspec import SketchSpec
from hessov.spectralshift import hessian_eigenvalues, shift_of, shifted

#: Largest D the exhaustive check accepts: a dense float64 D x D Hessian and its
#: eigenvectors take 16 D^2 bytes (1.6 GB at 10,000).
MAX_EXHAUSTIVE_DIM = 12_000
OVERLAP_KS = (1, 5, 10, 20, 50, 100)
NUM_REPORTED_EIGENVALUES = 20


def sketched_eigenpairs(run: RunDir, spec: SketchSpec, hessian, step: int, split: str):
    """The pipeline's eigenpairs of ``step``/``split`` if solved, else the in-core sketch
    with the same settings and seeds. Returns ``(eigenvalues (k,), W (D, k), source,
    bounds (k,) or None)``.
    """
    path = run.eigen(step, split)
    if path.is_file():
        with h5py.File(path, "r") as handle:
            values = torch.from_numpy(handle["eigenvalues"][:]).double()
            vectors = torch.from_numpy(handle["eigenvectors"][:]).double()
            stored = handle.get("error_bounds")
            bounds = None if stored is None else torch.from_numpy(stored[:])
        return values, vectors, "solve stage", bounds
    layout = spec.layout
    sigma = shift_of(run, spec, step, split)
    result = sketched_eigh(
        shifted(hessian.matmat, sigma),
        layout.dim,
        layout.num_outer,
        layout.num_inner if spec.recovery == "single_pass" else None,
        seed=layout.seed,
        noise=layout.noise,
        recovery=spec.recovery,
        block_size=layout.block_size,
        dtype=hessian.dtype,
        device=hessian.device,
        num_apost=spec.num_apost,
        rounds=spec.krylov_rounds,
    )
    bounds = None if result.bounds is None else result.bounds.error_bounds
    values = hessian_eigenvalues(result.eigenvalues.double().cpu(), sigma)
    return values, result.eigenvectors.double().cpu(), "in-core", bounds


def _rounds_and_hvps(run: RunDir, spec: SketchSpec, step: int, split: str, source: str):
    """The rounds and HVPs of the eigenpairs compared: the solve's (a target may have ended
    its rounds early), or the in-core sketch's at the layout's settings.
    """
    if source == "solve stage":
        with h5py.File(run.eigen(step, split), "r") as handle:
            attrs = handle.attrs
            before_rounds = 2 if spec.recovery == "two_pass" else 1  # a file from before them
            return {"hvps": int(attrs["hvps"]), "rounds": int(attrs.get("rounds", before_rounds))}
    rounds = spec.krylov_rounds if spec.recovery == "two_pass" else 1
    return {"hvps": spec.total_hvps, "rounds": rounds}


def check_bounds(exact_values: torch.Tensor, values: torch.Tensor, bounds) -> dict:
    """Whether every finite per-eigenvalue bound ``(k,)`` holds: ``|values_i - exact_i|`` for
    eigenvalues of the same rank in ``|lambda|``. ``bounds_violated`` must be 0: a bound that
    does not hold is a bug.
    """
    if bounds is None:
        return {
            "bounds_checked": 0,
            "bounds_violated": 0,
            "bounds_violated_at": [],
            "bounds_over_errors": None,
        }
    errors = (values - exact_values[: values.shape[0]]).abs()
    finite = bounds.isfinite()
    violated = torch.nonzero(finite & (errors > bounds)).flatten()
    ratios = bounds[finite] / errors[finite].clamp(min=torch.finfo(errors.dtype).tiny)
    return {
        "bounds_checked": int(finite.sum()),
        "bounds_violated": int(violated.numel()),
        "bounds_violated_at": violated[:10].tolist(),
        "bounds_over_errors": float(ratios.median()) if finite.any() else None,
    }


def compare_with_exact(exact_values, exact_vectors, values, vectors) -> dict:
    """Errors of a sketch ``(k,), (D, k)`` against exact eigenpairs sorted by ``|lambda|``."""
    top = min(NUM_REPORTED_EIGENVALUES, values.shape[0])
    rel_err = ((values[:top] - exact_values[:top]).abs() / exact_values[:top].abs()).tolist()
    residuals = sign_invariant_residuals(vectors[:, :top], exact_vectors[:, :top]).tolist()
    k_max = values.shape[0]
    overlaps = {}
    for k in sorted({*(k for k in OVERLAP_KS if k <= k_max), k_max}):
        overlaps[str(k)] = float((vectors[:, :k].T @ exact_vectors[:, :k]).pow(2).sum() / k)
    return {
        "eigenvalue_rel_err": rel_err,
        "eigenvector_residuals": residuals,
        "subspace_overlap": overlaps,
    }


def exact_eigenpairs(run: RunDir, cfg: RunConfig, spec: SketchSpec, step: int, split: str):
    """Every eigenvalue ``(D,)`` and the top-k eigenvectors ``(D, k)`` of the dense float64
    Hessian, in the sketch's order (by ``|lambda|``; ascending with ``which=smallest``), its
    diagonal ``(D,)``, and the seconds of building it and of ``eigh``.
    """
    exact_cfg = RunConfig(**{**cfg.__dict__, "dtype": "float64"})
    t0 = time.perf_counter()
    hessian = hessian_at_step(run, exact_cfg, step, split)
    dense = dense_matrix(
        hessian.matmat,
        spec.layout.dim,
        block_size=spec.layout.block_size,
        dtype=torch.float64,
        device=hessian.device,
    )
    dense_seconds = time.perf_counter() - t0
    diagonal = dense.diagonal().cpu().clone()
    t0 = time.perf_counter()
    all_values, all_vectors = torch.linalg.eigh(dense)
    # The order the sketch reports: by |lambda|, or most negative first (which=smallest).
    order = (
        all_values.argsort()
        if spec.which == "smallest"
        else all_values.abs().argsort(descending=True)
    )
    exact_values = all_values[order].cpu()
    exact_vectors = all_vectors[:, order[: spec.layout.num_outer]].cpu()
    eigh_seconds = time.perf_counter() - t0
    return exact_values, exact_vectors, diagonal, dense_seconds, eigh_seconds


def _write_exact(path: Path, exact_values: torch.Tensor, exact_vectors: torch.Tensor) -> None:
    """``exhaustive/step_T_SPLIT.h5``: the exact eigenvalues and top-k eigenvectors."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as handle:
        handle.create_dataset("exact_eigenvalues", data=exact_values.numpy())
        handle.create_dataset("exact_eigenvectors", data=exact_vectors.numpy().astype(np.float32))
        handle.attrs["note"] = (
            "eigenpairs in the sketch's order (by |lambda| descending; ascending with "
            "which=smallest); top k vectors kept"
        )


def exhaustive(run: RunDir, cfg: RunConfig, spec: SketchSpec, step: int, split: str) -> dict:
    """Run the exhaustive comparison of one step and split; returns the summary fields."""
    log = get_logger()
    dim = spec.layout.dim
    if dim > MAX_EXHAUSTIVE_DIM:
        raise ConfigError(
            f"problem: D={dim} is too large for the exhaustive check (at most "
            f"{MAX_EXHAUSTIVE_DIM}: the dense Hessian takes {16 * dim**2 / 1e9:.1f} GB)"
        )
    exact_values, exact_vectors, diagonal, dense_seconds, eigh_seconds = exact_eigenpairs(
        run, cfg, spec, step, split
    )
    k = spec.layout.num_outer
    sketch_hessian = hessian_at_step(run, cfg, step, split, check_deterministic=False)
    values, vectors, source, bounds = sketched_eigenpairs(run, spec, sketch_hessian, step, split)
    fields = compare_with_exact(exact_values, exact_vectors, values, vectors)
    fields |= check_bounds(exact_values, values, bounds)
    fields.update(
        {
            "exact_eigenvalues": exact_values[:NUM_REPORTED_EIGENVALUES].tolist(),
            "sketch_eigenvalues": values[:NUM_REPORTED_EIGENVALUES].tolist(),
            "sketch_source": source,
            "recovery": spec.recovery,
            "k": k,
            "s": spec.layout.num_inner,
            **_rounds_and_hvps(run, spec, step, split, source),
            "seconds": {"dense_hessian": round(dense_seconds, 3), "eigh": round(eigh_seconds, 3)},
            "estimates": compare_estimates(run, (step, split), exact_values, diagonal),
        }
    )
    _write_exact(run.exhaustive(step, split), exact_values, exact_vectors)
    summary.record(run, "exhaustive", fields, step, split)
    log_event(
        run.log,
        "exhaustive",
        "exhaustive",
        step=step,
        split=split,
        max_rel_err_top20=max(fields["eigenvalue_rel_err"]),
        subspace_overlap=fields["subspace_overlap"],
        bounds_checked=fields["bounds_checked"],
        bounds_violated=fields["bounds_violated"],
    )
    log.info(
        "exhaustive step %d %s (%s, %s): top-20 eigenvalue error max %.2e, overlap %s, "
        "%d error bounds checked",
        step,
        split,
        spec.recovery,
        source,
        max(fields["eigenvalue_rel_err"]),
        {key: round(v, 4) for key, v in fields["subspace_overlap"].items()},
        fields["bounds_checked"],
    )
    if fields["bounds_violated"]:  # a bug in the bounds, not noise: say it loudly
        log.error(
            "exhaustive step %d %s: %d error bounds do NOT hold, at eigenvalues %s",
            step,
            split,
            fields["bounds_violated"],
            fields["bounds_violated_at"],
        )
    return fields
