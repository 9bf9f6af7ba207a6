"""The estimators of ``skerch_ext.hutchinson`` and ``skerch_ext.slq`` on synthetic symmetric
matrices with known spectra, ``V diag(lambda) V^T`` with ``V`` random orthogonal.

Tolerances: an identity that holds exactly in exact arithmetic (the sketched trace and
diagonal of a matrix its basis spans, Lanczos run to exhaustion) is compared at
``hessov.skerch_ext.tolerances.rounding_level`` of the dtype and length times the matrix's
norm; a random estimate is compared with its own spread: within 4 standard errors of the
mean for a scalar (a normal variable leaves that band with probability 6e-5), and for a
vector of entries ``||error|| <= 2 ||ci95||``, i.e. the squared error within
``4 x 1.96^2 = 15.4`` times its expectation (a chi-square tail below 1e-4 even for one
entry). The probes are drawn from fixed seeds, so a test sees the same draw on every machine.
"""

from __future__ import annotations

import math

import pytest
import torch

from hessov.skerch_ext.hutchinson import (
    Z95,
    deflated_diagonal_samples,
    deflated_trace_samples,
    mean_and_ci95,
    rademacher,
    sketched_diagonal,
)
from hessov.skerch_ext.slq import broadened, deflated_measure, lanczos_quadrature, wasserstein1
from hessov.skerch_ext.tolerances import rounding_level

DIM = 200
TOP = 20


def known_matrix(dtype: torch.dtype, seed: int = 0):
    """``H`` ``(D, D)`` with 20 outliers (5 negative) over a bulk spread evenly over
    [-0.1, 0.3] (no near-multiple eigenvalue to slow Lanczos down), its eigenvalues ``(D,)``
    (by |lambda| descending) and eigenvectors ``(D, D)``, in float64.
    """
    generator = torch.Generator().manual_seed(seed)
    bulk = torch.linspace(-0.1, 0.3, DIM - TOP, dtype=torch.float64)
    outliers = torch.cat([torch.linspace(10, 1, TOP - 5), -torch.linspace(3, 1, 5)])
    values = torch.cat([outliers.double(), bulk])
    values = values[values.abs().argsort(descending=True)]
    gaussian = torch.randn(DIM, DIM, generator=generator, dtype=torch.float64)
    vectors = torch.linalg.qr(gaussian).Q
    return (vectors * values) @ vectors.T, values, vectors


def projection(basis: torch.Tensor):
    return lambda columns: columns - basis @ (basis.T @ columns)


def matmat(matrix: torch.Tensor, dtype: torch.dtype):
    return lambda columns: matrix.to(dtype) @ columns


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sketched_trace_and_diagonal_are_exact_on_a_spanned_matrix(dtype):
    """A matrix of rank 20 with V its eigenvectors: tr(V^T H V) is its trace, the sketched
    diagonal its diagonal, and the probes of the remainder see nothing.
    """
    dense, values, vectors = known_matrix(torch.float64)
    basis = vectors[:, :TOP]
    low_rank = (basis * values[:TOP]) @ basis.T
    products = (low_rank @ basis).to(dtype)
    core = basis.T @ products.double()
    core = (core + core.T) / 2
    scale = float(values[:TOP].abs().sum())
    tolerance = 4 * rounding_level(dtype, DIM) * scale
    assert abs(float(core.trace()) - float(values[:TOP].sum())) <= tolerance
    diagonal = sketched_diagonal(basis.to(dtype), products, core)
    assert (diagonal - low_rank.diagonal()).abs().max() <= tolerance
    probes = rademacher(DIM, [1, 2, 3], dtype)
    samples = deflated_trace_samples(matmat(low_rank, dtype), projection(basis.to(dtype)), probes)
    assert samples.abs().max() <= DIM * tolerance


def test_deflated_hutchinson_is_unbiased_within_its_interval():
    """The trace and diagonal of a full-rank matrix from its top-20 eigenvectors and 400
    probes on the remainder: within the probes' own intervals of the exact values.
    """
    dense, values, vectors = known_matrix(torch.float64, seed=1)
    basis = vectors[:, :TOP]
    core = basis.T @ dense @ basis
    probes = rademacher(DIM, range(400), torch.float64)
    samples = deflated_trace_samples(matmat(dense, torch.float64), projection(basis), probes)
    mean, ci95 = mean_and_ci95(400, samples.sum(), (samples**2).sum())
    error = float(core.trace() + mean - values.sum())
    assert abs(error) <= 4 * float(ci95) / Z95
    entries = deflated_diagonal_samples(matmat(dense, torch.float64), projection(basis), probes)
    mean, ci95 = mean_and_ci95(400, entries.sum(dim=1), (entries**2).sum(dim=1))
    estimate = sketched_diagonal(basis, dense @ basis, core) + mean
    assert (estimate - dense.diagonal()).norm() <= 2 * ci95.norm()
    # Deflation is the point: the remainder's spread is far below plain Hutchinson's.
    plain = (probes * (dense @ probes)).sum(dim=0)
    assert samples.std() < plain.std() / 5


def test_the_diagonal_is_unbiased_for_a_basis_that_is_not_invariant():
    """A sketch's basis is never an invariant subspace: with ``V`` the top eigenvectors
    rotated a little out of their span, the exact part plus the probes' expectation must
    still give ``diag(H)``, and so must the mean of the probes within its interval. A sample
    is bilinear in its probe and ``E[g g^T] = I``, so the expectation is exactly the sum of
    the samples of the ``D`` unit vectors.
    """
    dense, values, vectors = known_matrix(torch.float64, seed=4)
    tilted = vectors[:, :TOP] + 0.1 * vectors[:, TOP : 2 * TOP]
    basis = torch.linalg.qr(tilted).Q
    core = basis.T @ dense @ basis
    deflate = projection(basis)
    identity = torch.eye(DIM, dtype=torch.float64)
    remainder = deflated_diagonal_samples(matmat(dense, torch.float64), deflate, identity).sum(1)
    exact_part = sketched_diagonal(basis, dense @ basis, core)
    tolerance = 10 * rounding_level(torch.float64, DIM) * float(values.abs().max())
    assert (exact_part + remainder - dense.diagonal()).abs().max() <= tolerance
    probes = rademacher(DIM, range(400), torch.float64)
    entries = deflated_diagonal_samples(matmat(dense, torch.float64), deflate, probes)
    mean, ci95 = mean_and_ci95(400, entries.sum(dim=1), (entries**2).sum(dim=1))
    assert (exact_part + mean - dense.diagonal()).norm() <= 2 * ci95.norm()


def test_probe_columns_do_not_depend_on_how_they_are_grouped():
    together = rademacher(1000, [7, 8, 9], torch.float32)
    apart = torch.cat([rademacher(1000, [seed], torch.float32) for seed in (7, 8, 9)], dim=1)
    assert torch.equal(together, apart) and set(together.unique().tolist()) == {-1.0, 1.0}


def test_mean_and_ci95_of_one_sample_has_no_interval():
    mean, ci95 = mean_and_ci95(1, torch.tensor(2.0), torch.tensor(4.0))
    assert mean == 2.0 and math.isinf(ci95)


def test_lanczos_run_to_exhaustion_is_the_exact_quadrature():
    """With as many steps as the complement's dimension, the nodes are the eigenvalues of
    P H P on it and the weights the squared components of the start vector.
    """
    dense, values, vectors = known_matrix(torch.float64, seed=2)
    basis = vectors[:, :TOP]
    start = rademacher(DIM, [5], torch.float64)[:, 0]
    nodes, weights = lanczos_quadrature(matmat(dense, torch.float64), projection(basis), start, DIM)
    assert len(nodes) == DIM - TOP  # the Krylov space ends with the complement
    rest, rest_vectors = values[TOP:], vectors[:, TOP:]
    order = rest.argsort()
    tolerance = 10 * rounding_level(torch.float64, DIM) * float(values.abs().max())
    assert (nodes - rest[order]).abs().max() <= tolerance
    projected = projection(basis)(start[:, None])[:, 0]
    expected = (rest_vectors.T @ projected) ** 2 / projected.norm() ** 2
    assert (weights - expected[order]).abs().max() <= 1e-10
    assert abs(float(weights.sum()) - 1) <= 1e-12


def test_deflated_density_resolves_the_bulk_better_than_plain_slq():
    """Four runs of 30 steps on a 200 x 200 matrix with 20 outliers: with the outliers
    deflated and put back exactly, the Wasserstein-1 distance to the exact eigenvalues is
    several times smaller than plain SLQ's at the same products.
    """
    dense, values, vectors = known_matrix(torch.float64, seed=3)
    uniform = torch.full((DIM,), 1 / DIM, dtype=torch.float64)
    starts = rademacher(DIM, range(4), torch.float64)
    deflate = projection(vectors[:, :TOP])
    runs = [lanczos_quadrature(matmat(dense, torch.float64), deflate, s, 30) for s in starts.T]
    nodes, weights = deflated_measure(values[:TOP], runs, DIM)
    deflated = wasserstein1(nodes, weights, values, uniform)
    plain_runs = [
        lanczos_quadrature(matmat(dense, torch.float64), lambda m: m, s, 30) for s in starts.T
    ]
    plain = wasserstein1(*deflated_measure(torch.zeros(0), plain_runs, DIM), values, uniform)
    assert abs(float(weights.sum()) - 1) <= 1e-12
    assert deflated < plain / 3, (deflated, plain)
    grid = torch.linspace(-4, 11, 3001, dtype=torch.float64)
    density = broadened(nodes, weights, grid, 0.05)
    integral = float(density.sum() * (grid[1] - grid[0]))
    assert abs(integral - 1) <= 1e-3  # the Gaussians' mass inside the grid


def test_wasserstein1_of_point_masses():
    one = torch.ones(1, dtype=torch.float64)
    assert wasserstein1(torch.zeros(1), one, torch.ones(1), one) == pytest.approx(1.0)
    halves = torch.full((2,), 0.5, dtype=torch.float64)
    nodes = torch.tensor([0.0, 1.0], dtype=torch.float64)
    assert wasserstein1(nodes, halves, torch.tensor([0.5]), one) == pytest.approx(0.5)
    assert wasserstein1(nodes, halves, nodes.flip(0), halves) == pytest.approx(0.0)
