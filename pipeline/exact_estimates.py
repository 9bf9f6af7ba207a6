"""The estimates that reuse a sketch next to their exact values (the exhaustive check).

With the dense Hessian's eigenvalues ``(D,)`` and diagonal ``(D,)`` in hand, each estimate
file of a step and split (:mod:`hessov.probes`) is compared with its exact counterpart:

* trace: the error, relative and in standard errors of the probes' mean (``ci95 / Z95``);
* diagonal: ``||estimate - exact|| / ||exact||`` over all of ``D`` and per layer, next to the
  relative 95% half-width the probes gave;
* density: the Wasserstein-1 distance between the quadrature's measure and the exact
  eigenvalues (weight ``1/D`` each), next to that of the sketch's eigenvalues alone with the
  rest of the spectrum put at 0 (what the bulk's Lanczos runs add).

Only the estimates whose files exist are compared.
"""

from __future__ import annotations

import json

import h5py
import torch

from hessov.rundir import RunDir
from hessov.skerch_ext.hutchinson import Z95
from hessov.skerch_ext.slq import wasserstein1


def _trace(handle: h5py.File, exact_values: torch.Tensor, _diagonal) -> dict:
    exact = float(exact_values.sum())
    value, ci95 = float(handle.attrs["value"]), float(handle.attrs["ci95"])
    return {
        "exact": exact,
        "value": value,
        "ci95": ci95,
        "rel_err": abs(value - exact) / abs(exact),
        "standard_errors": abs(value - exact) / (ci95 / Z95),
    }


def _diagonal(handle: h5py.File, _values, exact_diagonal: torch.Tensor) -> dict:
    estimate = torch.from_numpy(handle["diagonal"][:])
    layers = json.loads(handle.attrs["layers"])
    errors, start = {}, 0
    for name, layer in layers.items():
        rows = slice(start, start + layer["size"])
        error = (estimate[rows] - exact_diagonal[rows]).norm() / exact_diagonal[rows].norm()
        errors[name] = {"rel_err": float(error), "relative_ci95": layer["relative_ci95"]}
        start += layer["size"]
    total = (estimate - exact_diagonal).norm() / exact_diagonal.norm()
    return {"rel_err": float(total), "layers": errors}


def _density(handle: h5py.File, exact_values: torch.Tensor, _diagonal) -> dict:
    dim = len(exact_values)
    uniform = torch.full((dim,), 1 / dim, dtype=torch.float64)
    nodes = torch.from_numpy(handle["nodes"][:])
    weights = torch.from_numpy(handle["weights"][:])
    outliers = torch.from_numpy(handle["outliers"][:])
    sketch_only = torch.cat([outliers, torch.zeros(dim - len(outliers), dtype=torch.float64)])
    return {
        "wasserstein1": wasserstein1(nodes, weights, exact_values, uniform),
        "wasserstein1_sketch_only": wasserstein1(sketch_only, uniform, exact_values, uniform),
    }


COMPARISONS = {"trace": _trace, "diagonal": _diagonal, "density": _density}


def compare_estimates(
    run: RunDir, where: tuple[int, str], exact_values: torch.Tensor, exact_diagonal: torch.Tensor
) -> dict:
    """``{name: fields}`` for every estimate of ``where`` (step, split) on disk."""
    fields = {}
    for name, compare in COMPARISONS.items():
        path = run.estimate(*where, name)
        if path.is_file():
            with h5py.File(path, "r") as handle:
                fields[name] = compare(handle, exact_values.double(), exact_diagonal.double())
    return fields
