"""Trace and diagonal of a symmetric operator: exact on a sketched space, Hutchinson beyond it.

Given an orthonormal ``V`` ``(D, n)`` and the products ``H V`` ``(D, n)`` a sketch already
measured (two-pass: ``V = Q``, the basis the second round multiplied), the part of ``H`` that
``V`` captures is known exactly, ``C = V^T H V`` ``(n, n)``, and only the deflated remainder
``P H P``, ``P = I - V V^T``, needs random probes. This is Hutch++ (Meyer, Musco, Musco and
Woodruff 2021, "Hutch++: optimal stochastic trace estimation") with the sketch's basis in
place of its own first third of the products:

* trace: ``tr(H) = tr(C) + tr(P H P)``, and ``tr(P H P) = E[g^T P H P g]`` for Rademacher
  ``g`` (Hutchinson 1990), one product per probe, variance ``2 sum_{i != j} (P H P)_ij^2``:
  the energy that ``V`` leaves out, not ``H``'s;
* diagonal: ``H = V V^T H V V^T + V V^T H P + P H V V^T + P H P``; the first three terms'
  diagonal is exact, ``2 rowsum(V * H V) - rowsum(V * V C)`` (``*`` elementwise), and
  ``diag(P H P) = E[(P g) * (P H P g)]`` (Bekas, Kokiopoulou and Saad 2007, "An estimator for
  the diagonal of a matrix"), entry ``i`` with variance ``sum_{j != i} (P H P)_ij^2``. The
  product is projected too: ``E[(P g) * (H P g)] = diag(P H)``, which differs from
  ``diag(P H P)`` by ``diag(P H V V^T)``, zero only when ``V`` spans an invariant subspace
  (a sketch's basis never exactly does).

On the demo run (mnist_mini, step 1000, 500 points, ``k = 355``) ``tr(C) = 64.66`` of the
exact 67.87 and one probe's standard deviation is 0.79 against 21.4 for plain Hutchinson:
the 0.1% that takes about 525 probes here takes 200,000 without the basis
(bench/RESULTS.md).

Every probe is drawn from its own seed (:func:`rademacher`), so a probe has the same bits
whichever array task draws it and however the probes are split into tasks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from hessov.skerch_ext.operator import MatMat

#: ``G -> P G`` for ``G`` ``(D, b)``: the projection onto the complement of the sketched space.
Projection = Callable[[torch.Tensor], torch.Tensor]

#: The two-sided 95% quantile of the normal distribution (the probes' mean is close to normal).
Z95 = 1.959963984540054


def rademacher(dim: int, seeds: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """``(D, len(seeds))`` entries +-1, column ``j`` drawn from a CPU generator seeded with
    ``seeds[j]``: the same bits on every machine.
    """
    columns = torch.empty(dim, len(seeds), dtype=dtype)
    generator = torch.Generator(device="cpu")
    for j, seed in enumerate(seeds):
        generator.manual_seed(seed)
        bits = torch.randint(0, 2, (dim,), generator=generator, dtype=torch.int8)
        columns[:, j] = bits.to(dtype).mul_(2).sub_(1)
    return columns


def deflated_trace_samples(matmat: MatMat, project: Projection, probes: torch.Tensor):
    """``(b,)`` float64: ``g^T P H P g`` for each probe column ``g`` of ``probes`` ``(D, b)``,
    each an unbiased sample of ``tr(P H P)``.
    """
    projected = project(probes)
    products = matmat(projected)
    return (projected.double() * products.double()).sum(dim=0)


def deflated_diagonal_samples(matmat: MatMat, project: Projection, probes: torch.Tensor):
    """``(D, b)`` float64: ``(P g) * (P H P g)`` for each probe column ``g``, each an unbiased
    sample of ``diag(P H P)``.
    """
    projected = project(probes)
    return projected.double() * project(matmat(projected)).double()


def sketched_diagonal(basis: torch.Tensor, products: torch.Tensor, core: torch.Tensor):
    """``(rows,)`` float64: the exactly known part of ``diag(H)`` on rows of ``V`` and ``H V``
    (``(rows, n)`` each) with ``C = V^T H V`` ``(n, n)``: ``2 rowsum(V * H V) -
    rowsum(V * V C)``.
    """
    basis = basis.double()
    twice = 2 * (basis * products.double()).sum(dim=1)
    return twice - (basis * (basis @ core)).sum(dim=1)


def mean_and_ci95(count: int, total: torch.Tensor, total_squares: torch.Tensor):
    """The mean of ``count`` samples from their sum and sum of squares (any shape, float64),
    and the half-width of its 95% confidence interval, ``Z95 * std / sqrt(count)`` with the
    samples' unbiased standard deviation (``inf`` from a single sample).
    """
    mean = total / count
    if count < 2:  # noqa: PLR2004 (a spread needs two samples)
        return mean, torch.full_like(mean, math.inf)
    variance = (total_squares - count * mean**2).clamp_min(0) / (count - 1)
    return mean, Z95 * variance.sqrt() / math.sqrt(count)
