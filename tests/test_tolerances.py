"""The tolerances of ``hessov.skerch_ext.tolerances`` on synthetic matrices with known spectra: each
bound holds where its derivation says it must, and is tight enough to catch a real error.
"""

import math

import pytest
import torch

from hessov.skerch_ext.tolerances import (
    compare_eigenpairs,
    eigenvalue_tolerance,
    largest_angle_sine,
    product_tolerance,
    rounding_level,
    subspace_tolerance,
    unit_roundoff,
)

DTYPES = (torch.float32, torch.float64)
DIM = 200


def symmetric(eigenvalues: torch.Tensor, seed: int) -> torch.Tensor:
    """``V diag(lambda) V^T`` in float64 with a random orthogonal ``V``."""
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(
        torch.randn(len(eigenvalues), len(eigenvalues), generator=generator, dtype=torch.float64)
    )
    return basis @ torch.diag(eigenvalues.double()) @ basis.T


def top_by_magnitude(matrix: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    values, vectors = torch.linalg.eigh(matrix)
    order = values.abs().argsort(descending=True)[:k]
    return values[order], vectors[:, order]


def test_rounding_level_scales_with_unit_roundoff_and_sqrt_length():
    assert unit_roundoff(torch.float32) == 2.0**-24 and unit_roundoff(torch.float64) == 2.0**-53
    ratio = rounding_level(torch.float32, 1000) / rounding_level(torch.float64, 1000)
    assert ratio == pytest.approx(2.0**29)
    # sqrt(n) growth, up to the slowly growing lambda(n).
    growth = rounding_level(torch.float32, 10**6) / rounding_level(torch.float32, 10**4)
    assert 10 < growth < 12


@pytest.mark.parametrize("dtype", DTYPES)
def test_product_tolerance_covers_other_summation_orders_and_catches_a_real_error(dtype):
    generator = torch.Generator().manual_seed(0)
    matrix = torch.randn(50, DIM, generator=generator, dtype=torch.float64)
    x = torch.randn(DIM, 7, generator=generator, dtype=torch.float64)
    low_a, low_x = matrix.to(dtype), x.to(dtype)
    blocked = low_a @ low_x
    by_column = torch.stack([low_a @ low_x[:, j].contiguous() for j in range(7)], dim=1)
    reversed_order = low_a.flip(1) @ low_x.flip(0)
    bound = product_tolerance(matrix.abs() @ x.abs(), dtype, DIM)
    for other in (by_column, reversed_order):
        assert ((blocked - other).double().abs() <= bound).all()
        assert ((blocked.double() - matrix @ x).abs() <= bound / 2).all()  # each to the exact
    # One ulp-scale error per output is inside; an error of 1e-3 of the product is not.
    assert (bound < 1e-3 * (matrix.abs() @ x.abs())).all()


def test_subspace_tolerance_needs_a_gap_and_bounds_a_perturbation():
    values = torch.tensor([5.0, -4.0, 4.0, 1.0, 0.5])
    assert subspace_tolerance(values, 1, 0.1) == pytest.approx(0.1 / 0.9)
    assert subspace_tolerance(values, 2, 0.1) is None  # |-4| = |4|: no space of size 2
    assert subspace_tolerance(values, 3, 0.1) == pytest.approx(0.1 / 2.9)
    assert subspace_tolerance(values, 4, 0.6) is None  # gap 0.5 <= perturbation


@pytest.mark.parametrize("dtype", DTYPES)
def test_davis_kahan_bound_holds_for_a_known_perturbation(dtype):
    spectrum = torch.cat([torch.tensor([10.0, 8.0, -6.0, 3.0]), torch.linspace(1.0, 0.0, DIM - 4)])
    matrix = symmetric(spectrum, seed=1)
    generator = torch.Generator().manual_seed(2)
    noise = torch.randn(DIM, DIM, generator=generator, dtype=torch.float64)
    noise = (noise + noise.T) / 2
    perturbation = noise * (1e-3 / torch.linalg.matrix_norm(noise, 2))  # ||E|| = 1e-3
    first = top_by_magnitude(matrix.to(dtype), 6)
    second = top_by_magnitude((matrix + perturbation).to(dtype), 6)
    norm_e = 1e-3 + 2 * eigenvalue_tolerance(10.0, DIM, dtype)  # E plus both computations
    for size in (1, 2, 3, 4):
        bound = subspace_tolerance(first[0], size, norm_e)
        assert largest_angle_sine(first[1][:, :size], second[1][:, :size]) <= bound
        assert (first[0][:size] - second[0][:size]).abs().max() <= norm_e  # Weyl


def test_largest_angle_sine_of_a_known_rotation_ignores_the_basis():
    theta = 0.3
    basis = torch.eye(DIM, dtype=torch.float64)[:, :3]
    rotated = basis.clone()
    rotated[:, 2] = math.cos(theta) * basis[:, 2] + math.sin(theta) * torch.eye(DIM)[:, 5].double()
    mixing = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 3.0]], dtype=torch.float64)
    assert largest_angle_sine(basis, rotated @ mixing) == pytest.approx(math.sin(theta))
    assert largest_angle_sine(basis, basis @ mixing) == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("dtype", DTYPES)
def test_compare_eigenpairs_accepts_rounding_and_refuses_a_real_difference(dtype):
    spectrum = torch.cat([torch.tensor([10.0, 7.0, 7.0, 3.0]), torch.linspace(1.0, 0.0, DIM - 4)])
    matrix = symmetric(spectrum, seed=3)
    reference = top_by_magnitude(matrix.to(dtype), 8)
    # The same matrix through another summation order: only rounding differs.
    reordered = top_by_magnitude(matrix.flip(0).flip(1).to(dtype), 8)
    permutation = torch.arange(DIM - 1, -1, -1)
    reordered = (reordered[0], reordered[1][permutation])
    agreement = compare_eigenpairs(reference, reordered, dtype)
    assert agreement.holds
    assert 2 not in agreement.bounds  # 7 and 7: no space of size 2
    assert {1, 3} <= set(agreement.bounds)
    shifted = reference[0].clone()
    shifted[0] += 1e-3  # far above rounding, far below the sketch errors of real runs
    assert not compare_eigenpairs(reference, (shifted, reference[1]), dtype).holds
