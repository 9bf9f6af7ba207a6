"""The out-of-core linear algebra (hessov.skerch_ext.rowblocks) and the row-block phases of the
solve (hessov.rowsolve, run by hessov.rowpass with every result in a file) against their
in-memory counterparts, on synthetic matrices with known spectra.

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

from hessov.errors import MissingInputError
from hessov.rowpass import RowWork, program_phases, run_phases
from hessov.rowsolve import tsqr_phases, two_pass_phases
from hessov.skerch_ext.aposteriori import (
    apost_error,
    apost_error_rows,
    gaussian_probe_rows,
    gaussian_probes,
)
from hessov.skerch_ext.rowblocks import row_ranges, tree_factors
from hessov.skerch_ext.seeds import SeedRange
from hessov.skerch_ext.solve import block_krylov_extension, ritz_coefficients
from hessov.skerch_ext.tolerances import compare_eigenpairs, rounding_level

DTYPES = (torch.float32, torch.float64)


def tsqr_by_phases(directory, matrix: torch.Tensor, ranges: list[range]):
    """TSQR of ``matrix`` as the basis stage runs it, a phase at a time over row blocks with
    every result in a file: ``Q`` ``(D, c)`` and ``R`` ``(c, c)``.
    """
    work = RowWork(directory, program_phases("basis", "two_pass"), ranges)
    functions = tsqr_phases(work, "", lambda number, rows: (matrix[rows.start : rows.stop], {}))
    result = {}

    def finish():
        result["q"] = work.columns("apply", 0, matrix.shape[1])
        result["r"] = work.read("tree")["r"]

    run_phases(work, {**functions, "finish": finish})
    return result["q"], result["r"]


def assert_qr_of(matrix: torch.Tensor, q: torch.Tensor, r: torch.Tensor) -> None:
    """``q`` orthonormal and ``q r = matrix`` within ten ``g(D)``, ``r`` upper triangular, and
    ``q`` spanning what the in-memory QR spans (up to column signs).
    """
    dtype, (dim, width) = matrix.dtype, matrix.shape
    level = 10 * rounding_level(dtype, dim)
    eye = torch.eye(width, dtype=dtype)
    assert torch.linalg.matrix_norm(q.T @ q - eye, 2) <= level
    norm = torch.linalg.matrix_norm(matrix, 2)
    assert torch.linalg.matrix_norm(q @ r - matrix, 2) <= level * norm
    assert torch.equal(r, r.triu())
    whole = torch.linalg.qr(matrix, mode="reduced").Q
    assert torch.allclose((whole.T @ q).abs(), eye, atol=level * width)


def random_matrix(dim: int, width: int, seed: int, dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(dim, width, generator=generator, dtype=torch.float64).to(dtype)


def test_row_ranges_cover_every_row_with_at_least_min_rows():
    assert row_ranges(10, 4, 3) == [range(0, 4), range(4, 10)]  # 2 left over: folded
    assert row_ranges(12, 4, 3) == [range(0, 4), range(4, 8), range(8, 12)]
    assert row_ranges(5, 100, 3) == [range(0, 5)]
    with pytest.raises(ValueError, match="row_block"):
        row_ranges(10, 2, 3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("row_block", "fan_in"), [(30, 2), (64, 8), (500, 8), (1000, 3)])
def test_the_tsqr_tree_gives_a_qr_of_the_whole(dtype, row_block, fan_in):
    matrix = random_matrix(1000, 30, row_block, dtype)
    ranges = row_ranges(1000, row_block, 30)
    local = [torch.linalg.qr(matrix[rows.start : rows.stop], mode="reduced") for rows in ranges]
    factors, scratch = {}, {}
    r = tree_factors(lambda i: local[i].R, len(local), scratch, factors.__setitem__, fan_in)
    q = torch.cat([piece.Q @ factors[i] for i, piece in enumerate(local)])
    assert_qr_of(matrix, q, r)
    # Every level's pieces and factors went to the scratch mapping, not to memory.
    assert sum(name.startswith("piece_0_") for name in scratch) == (len(local) > 1) * len(local)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("row_block", [30, 128, 1000])
def test_tsqr_by_phases_is_a_qr_of_the_whole(tmp_path, dtype, row_block):
    matrix = random_matrix(1000, 30, row_block, dtype)
    q, r = tsqr_by_phases(tmp_path / "work", matrix, row_ranges(1000, row_block, 30))
    assert_qr_of(matrix, q, r)
    assert not (tmp_path / "work").exists()  # the last phase removes the work directory


def test_a_phase_is_refused_before_the_phase_it_reads(tmp_path):
    matrix = random_matrix(100, 5, 0, torch.float64)
    work = RowWork(tmp_path / "work", program_phases("basis", "two_pass"), row_ranges(100, 50, 5))
    source = tsqr_phases(work, "", lambda number, rows: (matrix[rows.start : rows.stop], {}))
    functions = {**source, "finish": lambda: None}
    run_phases(work, functions, only="local", numbers=[0])  # block 1 not yet
    with pytest.raises(MissingInputError, match=r"phase tree needs phase local first.*\[1\]"):
        run_phases(work, functions, only="tree")
    run_phases(work, functions, only="local")  # only block 1 is left to do
    run_phases(work, functions, only="tree")
    assert work.done(work.phases[1]) and not work.done(work.phases[2], 0)


def test_tsqr_of_a_rank_deficient_matrix_is_still_orthonormal(tmp_path):
    generator = torch.Generator().manual_seed(3)
    low = torch.randn(600, 5, generator=generator, dtype=torch.float64)
    matrix = low @ torch.randn(5, 20, generator=generator, dtype=torch.float64)  # rank 5
    q, _ = tsqr_by_phases(tmp_path / "work", matrix, row_ranges(600, 100, 20))
    eye = torch.eye(20, dtype=torch.float64)
    assert torch.linalg.matrix_norm(q.T @ q - eye, 2) <= 10 * rounding_level(torch.float64, 600)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("row_block", [40, 128, 1000])
def test_block_krylov_by_phases_equals_the_in_memory_one(tmp_path, dtype, row_block):
    dim, k = 300, 40
    hessian, exact, _ = symmetric_with_spectrum(low_rank_spectrum(12, dim), seed=4, dtype=dtype)
    omega = random_matrix(dim, k, 5, dtype)
    basis = torch.linalg.qr(hessian @ omega, mode="reduced").Q
    h_basis = hessian @ basis
    values, vectors = _in_memory_pairs(basis, h_basis, k)

    ranges = row_ranges(dim, row_block, k)
    phases = program_phases("solve", "two_pass")
    ritz = [phase.name for phase in phases].index("ritz")
    work = RowWork(tmp_path / "work", (*phases[: ritz + 1], phases[-1]), ranges)
    functions, eigenvector_rows = two_pass_phases(
        work,
        lambda rows: basis[rows.start : rows.stop],
        lambda rows: h_basis[rows.start : rows.stop].numpy(),
        lambda crcs: None,
        k,
    )
    result = {}

    def finish():
        result["values"] = work.read("ritz")["eigenvalues"]
        result["vectors"] = torch.cat([eigenvector_rows(n, rows) for n, rows in enumerate(ranges)])

    run_phases(work, {**functions, "finish": finish})
    values_rows, vectors_rows = result["values"], result["vectors"]
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
