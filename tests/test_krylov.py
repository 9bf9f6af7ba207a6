"""Block Krylov over q rounds (hessov.skerch_ext.krylov) on synthetic symmetric matrices with
known spectra: q = 2 is today's two-pass recovery bit for bit; every finite error bound holds
on every reported pair (flat, power-law, indefinite and clustered spectra, several seeds and
round counts, float64 and float32); pairs not yet resolved get an infinite bound; more rounds
are more accurate. The pipeline's bounds against the dense mnist_mini Hessian, at two steps,
are checked by the exhaustive stage in tests/test_rounds.py.
"""

import pytest
import torch

from hessov.skerch_ext.krylov import block_krylov, krylov_blocks
from hessov.skerch_ext.solve import (
    orthonormal_basis,
    ritz_coefficients,
    seigh_two_pass,
    symmetrized,
)

DIM, BLOCK, REPORTED = 300, 20, 10


def spectrum(name: str, generator: torch.Generator) -> torch.Tensor:
    """Eigenvalues ``(DIM,)``: ten equal ones over a flat bulk, ``1/i``, ``+-1/i^0.8`` with
    random signs, or two clusters of five (spacing 1e-6) over a uniform bulk in (0, 1).
    """
    index = torch.arange(1, DIM + 1, dtype=torch.float64)
    if name == "flat":
        return torch.cat([torch.full((10,), 5.0), torch.ones(DIM - 10)]).double()
    if name == "power":
        return 1.0 / index
    if name == "indefinite":
        signs = torch.randint(0, 2, (DIM,), generator=generator) * 2 - 1
        return signs / index**0.8
    clusters = [base + 1e-6 * torch.arange(5) for base in (10.0, 5.0)]
    return torch.cat([*clusters, torch.rand(DIM - 10, generator=generator)]).double()


def operator(values: torch.Tensor, generator: torch.Generator, dtype: torch.dtype):
    """``V diag(values) V^T`` for a random orthogonal ``V``, and the true eigenvalues by
    ``|lambda|`` descending.
    """
    rotation = torch.linalg.qr(torch.randn(DIM, DIM, dtype=torch.float64, generator=generator))
    matrix = (rotation.Q * values) @ rotation.Q.T
    return matrix.to(dtype), values[values.abs().argsort(descending=True)]


def test_two_rounds_are_todays_two_pass_recovery_bit_for_bit():
    generator = torch.Generator().manual_seed(0)
    matrix, _ = operator(spectrum("power", generator), generator, torch.float64)
    start = torch.randn(DIM, BLOCK, dtype=torch.float64, generator=generator)
    result = block_krylov(lambda x: matrix @ x, start, rounds=2, num_eigenpairs=REPORTED)
    basis = orthonormal_basis(matrix @ start)
    values, vectors = seigh_two_pass(basis, matrix @ basis, REPORTED)
    assert torch.equal(result.eigenvalues, values) and torch.equal(result.eigenvectors, vectors)
    assert result.hvps == 2 * BLOCK


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", ["flat", "power", "indefinite", "clustered"])
def test_every_finite_bound_holds_on_every_pair(name, dtype):
    checked = 0
    for seed in range(3):
        generator = torch.Generator().manual_seed(seed)
        matrix, true = operator(spectrum(name, generator), generator, dtype)
        for rounds in (2, 3, 4, 6):
            start = torch.randn(DIM, BLOCK, dtype=torch.float64, generator=generator).to(dtype)
            result = block_krylov(matrix.__matmul__, start, rounds, REPORTED)
            errors = (result.eigenvalues.double() - true[:REPORTED]).abs()
            assert (errors <= result.error_bounds).all(), (seed, rounds, errors, result)
            checked += int(result.error_bounds.isfinite().sum())
    assert checked >= 3 * 2 * REPORTED  # at least the rounds 4 and 6 resolve every pair


def test_residuals_from_the_core_are_the_explicit_ones():
    generator = torch.Generator().manual_seed(3)
    matrix, _ = operator(spectrum("indefinite", generator), generator, torch.float64)
    start = torch.randn(DIM, BLOCK, dtype=torch.float64, generator=generator)
    basis, products, _ = krylov_blocks(matrix.__matmul__, start, 3)
    values, coefficients = ritz_coefficients(symmetrized(basis.T @ products), REPORTED)
    explicit = products @ coefficients - (basis @ coefficients) * values
    result = block_krylov(matrix.__matmul__, start, 3, REPORTED)
    # Both are differences of products of norm <= |H| = 1: a few roundings of 1 apart.
    torch.testing.assert_close(
        result.residual_norms, torch.linalg.vector_norm(explicit, dim=0), atol=1e-13, rtol=0
    )


def test_unresolved_pairs_are_unbounded_and_more_rounds_resolve_them():
    generator = torch.Generator().manual_seed(1)
    matrix, true = operator(spectrum("flat", generator), generator, torch.float64)
    start = torch.randn(DIM, BLOCK, dtype=torch.float64, generator=generator)
    two = block_krylov(lambda x: matrix @ x, start, 2, REPORTED)
    four = block_krylov(lambda x: matrix @ x, start, 4, REPORTED)
    # Two rounds leave the ten 5s unseparated from the bulk of 1s (errors of 50%).
    assert two.error_bounds.isinf().all() and (two.eigenvalues - true[:REPORTED]).abs().max() > 1
    assert four.error_bounds.max() < 1e-12 and four.residual_norms.max() < 1e-6


def test_more_rounds_are_more_accurate_on_a_slowly_decaying_spectrum():
    generator = torch.Generator().manual_seed(2)
    matrix, true = operator(spectrum("power", generator), generator, torch.float64)
    start = torch.randn(DIM, BLOCK, dtype=torch.float64, generator=generator)
    errors = []
    for rounds in (2, 3, 4, 5):
        result = block_krylov(lambda x: matrix @ x, start, rounds, REPORTED)
        errors.append(float(((result.eigenvalues - true[:REPORTED]) / true[:REPORTED]).abs().max()))
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-3 < errors[0]


def adversarial(values: torch.Tensor, seed: int, dtype=torch.float64) -> tuple:
    """``V diag(values) V^T`` for a random rotation, its eigenvalues by ``|lambda|``."""
    generator = torch.Generator().manual_seed(seed)
    rotation = torch.linalg.qr(
        torch.randn(len(values), len(values), dtype=torch.float64, generator=generator)
    ).Q
    matrix = ((rotation * values) @ rotation.T).to(dtype)
    return matrix, values[values.abs().argsort(descending=True)], generator


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_bounds_hold_where_no_eigenvalue_is_near_zero(sign):
    """A dense bulk in [0.5, 0.6] and converged outliers near -0.3 (and the mirror image): the
    unexplored spectrum borders the bulk's innermost Ritz values, not the smallest |theta|.
    """
    bulk = 0.5 + 0.1 * torch.rand(189, generator=torch.Generator().manual_seed(0))
    values = sign * torch.cat([torch.tensor([2.0, 1.8, 1.5]), bulk, -0.3 - 0.01 * torch.arange(8)])
    for seed in range(3):
        matrix, true, generator = adversarial(values.double(), seed)
        for rounds in (3, 4, 6):
            start = torch.randn(200, 10, dtype=torch.float64, generator=generator)
            result = block_krylov(matrix.__matmul__, start, rounds)
            errors = (result.eigenvalues - true[:10]).abs()
            assert (errors <= result.error_bounds).all(), (seed, rounds, errors, result)


def test_a_multiplicity_above_the_block_is_never_bounded_past_the_block():
    """Ten 1s and k = 6: a Krylov space sees 6 of them, so ranks 6 on are unresolved."""
    values = torch.cat([torch.ones(10), 0.5 * 0.9 ** torch.arange(190)]).double()
    matrix, true, generator = adversarial(values, 0)
    start = torch.randn(200, 6, dtype=torch.float64, generator=generator)
    result = block_krylov(matrix.__matmul__, start, rounds=8, num_eigenpairs=12)
    assert result.error_bounds[6:].isinf().all() and result.error_bounds[:6].isfinite().all()
    errors = (result.eigenvalues - true[:12]).abs()
    assert (errors <= result.error_bounds).all()


def test_opposite_signs_closer_than_the_rounding_are_not_ranked():
    """float32, an exhausted space (residuals 0): +1 and -1 - 2e-7 cannot be told apart in
    magnitude, so neither is bounded; and no round multiplies an empty block.
    """
    values = torch.cat(
        [
            torch.tensor([2.0, 1.0, -1.0 - 2e-7]),
            0.5 * torch.rand(61, generator=torch.Generator().manual_seed(0)),
        ]
    ).double()
    matrix, true, generator = adversarial(values, 0, torch.float32)
    start = torch.randn(64, 63, generator=generator)
    result = block_krylov(matrix.__matmul__, start, rounds=4)
    assert result.hvps < 4 * 63  # the space was all of R^64 after two rounds
    assert result.error_bounds[1:3].isinf().all()
    errors = (result.eigenvalues.double() - true[:63]).abs()
    assert (errors <= result.error_bounds).all()
