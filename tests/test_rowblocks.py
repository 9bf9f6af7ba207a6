"""The out-of-core linear algebra (hessov.skerch_ext.rowblocks) and the row-block pieces of the
solve against their in-memory counterparts, on synthetic matrices with known spectra.

Tolerances: TSQR and block sums are backward stable like a QR and a product of the whole, so
both results are exact for inputs within ``g(n) = rounding_level(dtype, n)`` relative of the
true ones (skerch_ext/tolerances.py). For an orthonormal ``Q`` of a well-conditioned ``A``
(condition number below 10 here) ``||Q^T Q - I||`` and ``||Q R - A|| / ||A||`` are a small
multiple of ``g(D)``; the tests allow 10 ``g(D)``.
"""

import numpy as np
import pytest
import torch
from test_sketch_math import low_rank_spectrum, symmetric_with_spectrum

from hessov.skerch_ext.aposteriori import (
    apost_error,
    apost_error_rows,
    gaussian_probe_rows,
    gaussian_probes,
)
from hessov.skerch_ext.rowblocks import row_ranges, tsqr
from hessov.skerch_ext.seeds import SeedRange
from hessov.skerch_ext.solve import (
    block_krylov_core_rows,
    block_krylov_extension,
    ritz_coefficients,
)
from hessov.skerch_ext.tolerances import compare_eigenpairs, rounding_level

DTYPES = (torch.float32, torch.float64)


def in_memory_rows(matrix: torch.Tensor):
    """A reader and a writer of row blocks of ``matrix``, as the HDF5 ones of hessov.merge."""

    def write(rows: range, block: torch.Tensor) -> None:
        matrix[rows.start : rows.stop] = block

    return (lambda rows: matrix[rows.start : rows.stop].clone()), write


def test_row_ranges_cover_every_row_with_at_least_min_rows():
    assert row_ranges(10, 4, 3) == [range(0, 4), range(4, 10)]  # 2 left over: folded
    assert row_ranges(12, 4, 3) == [range(0, 4), range(4, 8), range(8, 12)]
    assert row_ranges(5, 100, 3) == [range(0, 5)]
    with pytest.raises(ValueError, match="row_block"):
        row_ranges(10, 2, 3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("row_block", "fan_in"), [(30, 2), (64, 8), (500, 8), (1000, 3)])
def test_tsqr_is_a_qr_of_the_whole(dtype, row_block, fan_in):
    dim, width = 1000, 30
    generator = torch.Generator().manual_seed(row_block)
    matrix = torch.randn(dim, width, generator=generator, dtype=torch.float64).to(dtype)
    target = torch.full_like(matrix, float("nan"))
    read, write = in_memory_rows(target)
    ranges = row_ranges(dim, row_block, width)
    r = tsqr(lambda rows: matrix[rows.start : rows.stop], write, read, ranges, fan_in)
    level = 10 * rounding_level(dtype, dim)
    eye = torch.eye(width, dtype=dtype)
    assert torch.linalg.matrix_norm(target.T @ target - eye, 2) <= level
    assert torch.linalg.matrix_norm(target @ r - matrix, 2) <= level * torch.linalg.matrix_norm(
        matrix, 2
    )
    assert torch.equal(r, r.triu())
    # The same span as the in-memory QR: Q_rows^T Q_whole is orthogonal up to column signs.
    whole = torch.linalg.qr(matrix, mode="reduced").Q
    assert torch.allclose((whole.T @ target).abs(), eye, atol=level * width)


def test_tsqr_of_a_rank_deficient_matrix_is_still_orthonormal():
    generator = torch.Generator().manual_seed(3)
    low = torch.randn(600, 5, generator=generator, dtype=torch.float64)
    matrix = low @ torch.randn(5, 20, generator=generator, dtype=torch.float64)  # rank 5
    target = torch.empty_like(matrix)
    read, write = in_memory_rows(target)
    tsqr(lambda rows: matrix[rows.start : rows.stop], write, read, row_ranges(600, 100, 20), 2)
    eye = torch.eye(20, dtype=torch.float64)
    assert torch.linalg.matrix_norm(target.T @ target - eye, 2) <= 10 * rounding_level(
        torch.float64, 600
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("row_block", [40, 128, 1000])
def test_block_krylov_in_row_blocks_equals_the_in_memory_one(dtype, row_block):
    dim, k = 300, 40
    hessian, exact, _ = symmetric_with_spectrum(low_rank_spectrum(12, dim), seed=4, dtype=dtype)
    generator = torch.Generator().manual_seed(5)
    omega = torch.randn(dim, k, generator=generator, dtype=torch.float64).to(dtype)
    basis = torch.linalg.qr(hessian @ omega, mode="reduced").Q
    h_basis = hessian @ basis
    values, vectors = _in_memory_pairs(basis, h_basis, k)

    extension = torch.full((dim, k), float("nan"), dtype=dtype)
    ranges = row_ranges(dim, row_block, k)
    core = block_krylov_core_rows(
        in_memory_rows(basis)[0], in_memory_rows(h_basis)[0], in_memory_rows(extension), ranges
    )
    values_rows, coefficients = ritz_coefficients(core, k)
    vectors_rows = basis @ coefficients[:k] + extension @ coefficients[k:]
    agreement = compare_eigenpairs((values, vectors), (values_rows, vectors_rows), dtype)
    assert agreement.holds, agreement
    # Both recover the 12 nonzero eigenvalues: the same problem, solved as well.
    scale = exact.abs().max().item()
    assert (values_rows[:12].double() - exact[:12]).abs().max() <= 100 * rounding_level(
        dtype, dim
    ) * scale


def _in_memory_pairs(basis, h_basis, k):
    extended, core = block_krylov_extension(basis, h_basis)
    values, coefficients = ritz_coefficients(core, k)
    return values, extended @ coefficients


def test_probe_rows_are_the_same_numbers_whatever_the_row_blocks():
    seeds = SeedRange("apost", 1000, 4)
    whole = gaussian_probe_rows(seeds, range(150_000))
    assert whole.shape == (150_000, 4) and whole.dtype == torch.float64
    for rows in (range(0, 10), range(65_530, 65_540), range(100_000, 150_000)):
        assert torch.equal(gaussian_probe_rows(seeds, rows), whole[rows.start : rows.stop])
    assert torch.equal(gaussian_probe_rows(seeds, range(5, 9), range(2, 3)), whole[5:9, 2:3])
    assert abs(whole.mean().item()) < 0.01 and abs(whole.std().item() - 1) < 0.01


@pytest.mark.parametrize("row_block", [64, 250, 1000])
def test_a_posteriori_error_in_row_blocks_equals_the_whole(row_block):
    dim, k = 1000, 20
    hessian, _, eigenvectors = symmetric_with_spectrum(
        low_rank_spectrum(30, dim), seed=8, dtype=torch.float64
    )
    values = torch.linalg.eigvalsh(hessian).flip(0)[:k]
    vectors = eigenvectors[:, :k]
    seeds = SeedRange("apost", 77, 12)
    probes = gaussian_probes(dim, seeds, dtype=torch.float64, device="cpu")
    whole = apost_error(lambda x: hessian @ x, values, vectors, probes, block_size=5)
    products = hessian @ probes
    rows = apost_error_rows(
        values,
        lambda r: vectors[r.start : r.stop],
        lambda r: gaussian_probe_rows(seeds, r),
        lambda r: products[r.start : r.stop],
        row_ranges(dim, row_block, k),
    )
    # Sums of the same squares in another order: within g(D) of each other, relatively.
    level = rounding_level(torch.float64, dim)
    assert rows.error_sq == pytest.approx(whole.error_sq, rel=10 * level)
    assert rows.frobenius_sq == pytest.approx(whole.frobenius_sq, rel=10 * level)
    # The truncated spectrum leaves 10 eigenvalues out: the estimate sees them.
    truth = np.sqrt((low_rank_spectrum(30, dim)[k:] ** 2).sum().item())
    assert 0.5 * truth < rows.error < 1.5 * truth
