"""The sketch math of ``skerch_ext`` on synthetic symmetric matrices with known spectra.

Matrices are ``V diag(lambda) V^T`` with ``V`` a random orthogonal basis: exactly low-rank,
low-rank plus a noisy bulk, and indefinite. Checks: seed ranges never overlap; test matrices
are bit-identical whatever the partition into workers and blocks, and merged measurements
agree within the rounding tolerances of ``hessov.skerch_ext.tolerances``;
single-pass, two-pass and plain two-pass recoveries reach dtype-level accuracy on exactly
low-rank matrices and the expected accuracy otherwise; the a-posteriori estimate obeys its
probability bounds; the in-core path composes all of it.
"""

from __future__ import annotations

import math

import pytest
import torch
from skerch.a_posteriori import apost_error_bounds

from hessov.errors import ConfigError
from hessov.skerch_ext.aposteriori import (
    apost_error,
    apost_failure_probabilities,
    gaussian_probes,
    low_rank_apply,
    scree_bounds,
)
from hessov.skerch_ext.incore import sketched_eigh
from hessov.skerch_ext.measure import (
    assemble_sketch,
    matmat_in_blocks,
    measure_block,
    measure_indices,
)
from hessov.skerch_ext.options import NOISE_TYPES
from hessov.skerch_ext.random_matrices import RandomMatrix, SketchMatrices
from hessov.skerch_ext.seeds import SeedRegistry, sketch_seed_ranges
from hessov.skerch_ext.solve import (
    orthonormal_basis,
    seigh_single_pass,
    seigh_two_pass,
    single_pass_core,
)
from hessov.skerch_ext.storage import SketchLayout
from hessov.skerch_ext.tolerances import product_tolerance
from hessov.sketchspec import SketchSpec

pytestmark = pytest.mark.kernel_path

DTYPES = (torch.float32, torch.float64)
#: Rounding-level tolerance per dtype.
TOL = {torch.float32: 1e-3, torch.float64: 1e-8}
DIM = 300


def symmetric_with_spectrum(
    eigenvalues: torch.Tensor, seed: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``H = V diag(lambda) V^T`` (D, D) in ``dtype``, with the spectrum sorted by |lambda|.

    Built in float64 so that the float32 matrix is the rounding of an exactly known one.
    Returns ``H``, the sorted eigenvalues ``(D,)`` and eigenvectors ``(D, D)`` in float64.
    """
    generator = torch.Generator().manual_seed(seed)
    dim = eigenvalues.shape[0]
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    order = eigenvalues.abs().argsort(descending=True)
    eigenvalues, basis = eigenvalues[order], basis[:, order]
    matrix = (basis * eigenvalues) @ basis.T
    return ((matrix + matrix.T) / 2).to(dtype), eigenvalues, basis


def low_rank_spectrum(rank: int = 10, dim: int = DIM) -> torch.Tensor:
    """``rank`` well-separated positive eigenvalues from 10 down to 1, the rest zero."""
    spectrum = torch.zeros(dim, dtype=torch.float64)
    spectrum[:rank] = torch.logspace(1, 0, rank, dtype=torch.float64)
    return spectrum


def noisy_spectrum(noise: float, seed: int = 7, dim: int = DIM) -> torch.Tensor:
    """The low-rank spectrum plus a bulk of magnitude <= ``noise`` with random signs."""
    generator = torch.Generator().manual_seed(seed)
    bulk = noise * (2 * torch.rand(dim, generator=generator, dtype=torch.float64) - 1)
    spectrum = low_rank_spectrum(dim=dim)
    return torch.where(spectrum > 0, spectrum, bulk)


def indefinite_spectrum(dim: int = DIM) -> torch.Tensor:
    """Ten eigenvalues of mixed signs whose |lambda| order interleaves the signs."""
    spectrum = torch.zeros(dim, dtype=torch.float64)
    spectrum[:10] = torch.tensor([-9.0, 8.0, 6.5, -5.0, 4.0, -3.0, 2.5, 2.0, -1.5, 1.0])
    return spectrum


def column_by_column(matrix: torch.Tensor):
    """``M -> matrix @ M`` computed one column at a time on a contiguous copy, so that each
    output column is the same call whatever block it travels in (a dense matmul, or a
    strided column, takes other BLAS kernels: see random_matrices).
    """
    return lambda block: torch.stack([matrix @ column.contiguous() for column in block.T], dim=1)


def relative_errors(estimated: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    return (estimated.double() - exact).abs() / exact.abs()


def sign_invariant_misalignment(estimated: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """``1 - |<w_i, v_i>|`` per column: zero iff each column matches up to sign."""
    return 1 - (estimated.double() * exact).sum(dim=0).abs()


def sketch_for(
    dim: int, num_inner: int, seed: int, dtype: torch.dtype, noise: str = "ssrft"
) -> SketchMatrices:
    seeds = sketch_seed_ranges(seed, num_inner, 30)
    return SketchMatrices.from_seeds(dim, num_inner, seeds, noise=noise, dtype=dtype, device="cpu")


def array_tasks(num_inner: int, per_task: int) -> SketchSpec:
    """A layout of ``num_inner`` measurements split into array tasks of ``per_task``, as the
    pipeline splits them (:meth:`~hessov.sketchspec.SketchSpec.task_indices`).
    """
    layout = SketchLayout(num_inner + 1, 1, num_inner, 1, "float64", "ssrft", 0)
    return SketchSpec(layout, "single_pass", 1, [0], ["train"], per_task)


def single_pass(
    matrix: torch.Tensor,
    num_outer: int,
    num_inner: int,
    seed: int = 0,
    noise: str = "ssrft",
    block_size: int = 16,
):
    sketch = sketch_for(matrix.shape[0], num_inner, seed, matrix.dtype, noise)
    blocks = measure_indices(matrix.__matmul__, sketch, range(num_inner), num_outer, block_size)
    outer, inner = assemble_sketch(blocks, matrix.shape[0], num_outer, num_inner)
    return seigh_single_pass(outer, inner, sketch.omega_t_apply, sketch.psi_apply)


def two_pass_inputs(matrix: torch.Tensor, num_outer: int, seed: int = 0):
    sketch = sketch_for(matrix.shape[0], num_outer, seed, matrix.dtype)
    basis = orthonormal_basis(matrix @ sketch.omega_columns(range(num_outer)))
    return basis, matmat_in_blocks(matrix.__matmul__, basis, block_size=16)


# ---------------------------------------------------------------------------------------
# Seeds
# ---------------------------------------------------------------------------------------
def test_seed_registry_refuses_overlap_and_names_both_ranges():
    registry = SeedRegistry()
    registry.register("omega", 100, 10)
    registry.register("psi", 110, 10)  # adjacent: [100, 110) and [110, 120) are disjoint
    with pytest.raises(ValueError, match=r"'apost' \[105, 107\).*'omega' \[100, 110\)"):
        registry.register("apost", 105, 2)
    with pytest.raises(ValueError, match="already registered"):
        registry.register("omega", 1000, 1)
    assert "apost" not in registry


def test_paper_seed_layout_is_impossible():
    """The paper seeded Omega with seed + 1 and Psi with seed + 2: overlapping ranges."""
    seed, num_inner = 12345, 710
    registry = SeedRegistry()
    registry.register("omega", seed + 1, num_inner)
    with pytest.raises(ValueError, match="overlaps"):
        registry.register("psi", seed + 2, num_inner)


def test_sketch_seed_ranges_are_disjoint_and_large_enough():
    registry = sketch_seed_ranges(7, num_inner=3, num_apost=30)
    ranges = list(registry)
    assert [r.name for r in ranges] == ["omega", "psi", "apost"]
    assert [r.size for r in ranges] == [5, 5, 30]  # SSRFT needs 5 seeds even for 3 columns
    assert all(a.stop <= b.start for a, b in zip(ranges, ranges[1:], strict=False))
    assert ranges[0].start == 7
    with pytest.raises(IndexError):
        registry["apost"].seed(30)


def test_random_matrix_needs_one_seed_per_iid_column():
    registry = SeedRegistry()
    small = registry.register("omega", 0, 5)
    RandomMatrix(50, 20, small, "ssrft")  # five internal seeds suffice
    with pytest.raises(ValueError, match="needs 20 seeds"):
        RandomMatrix(50, 20, small, "gaussian")


# ---------------------------------------------------------------------------------------
# Test matrices
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("noise", NOISE_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_omega_columns_do_not_depend_on_partition(noise, dtype):
    sketch = sketch_for(DIM, 40, seed=3, dtype=dtype, noise=noise)
    whole = sketch.omega_columns(range(40))
    assert whole.shape == (DIM, 40) and whole.dtype == dtype
    # Bitwise by construction: an i.i.d. column is drawn alone from its own seed, an SSRFT
    # column is the transform of its own one-hot row, and no arithmetic mixes columns.
    for block_size in (1, 3, 7, 40):
        for start in range(0, 40, block_size):
            indices = list(range(start, min(start + block_size, 40)))
            assert torch.equal(sketch.omega_columns(indices), whole[:, indices])
    scattered = [31, 2, 17]
    assert torch.equal(sketch.omega_columns(scattered), whole[:, scattered])


@pytest.mark.parametrize("noise", NOISE_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_block_transforms_match_dense_and_do_not_depend_on_block(noise, dtype):
    sketch = sketch_for(DIM, 40, seed=3, dtype=dtype, noise=noise)
    omega = sketch.omega_columns(range(40)).double()
    psi = sketch.psi_apply(torch.eye(DIM, dtype=torch.float64))  # (s, D)
    x = torch.randn(DIM, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    scale = omega.abs().max().item() ** 2 * DIM
    omega_t_x, psi_x = sketch.omega_t_apply(x.to(dtype)), sketch.psi_apply(x.to(dtype))
    assert omega_t_x.shape == psi_x.shape == (40, 9)
    assert torch.allclose(omega_t_x.double(), omega.T @ x, atol=TOL[dtype] * scale)
    assert torch.allclose(psi_x.double(), psi @ x, atol=TOL[dtype] * scale)
    # The products of column subsets are not the same bits as the whole's on every kernel
    # path (BLAS rounds a column differently with other columns beside it); they agree
    # within the rounding of two evaluations of a length-D product (hessov.skerch_ext.tolerances).
    psi_abs = sketch.psi_transposed.columns(range(40), dtype=torch.float64, device="cpu").abs()
    bounds = {
        "omega": product_tolerance(omega.abs().T @ x.abs(), dtype, DIM),
        "psi": product_tolerance(psi_abs.T @ x.abs(), dtype, DIM),
    }
    for columns in ([0], [3, 4], [8, 1, 5]):
        subset = x[:, columns].to(dtype)
        for name, apply, whole in (
            ("omega", sketch.omega_t_apply, omega_t_x),
            ("psi", sketch.psi_apply, psi_x),
        ):
            difference = (apply(subset) - whole[:, columns]).double().abs()
            assert (difference <= bounds[name][:, columns]).all(), name
    # Omega and Psi come from disjoint seed ranges, so they differ.
    assert not torch.allclose(psi.T, omega, atol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ssrft_test_matrices_are_orthonormal(dtype):
    sketch = sketch_for(DIM, 40, seed=11, dtype=dtype)
    omega = sketch.omega_columns(range(40))
    psi = sketch.psi_apply(torch.eye(DIM, dtype=dtype))
    identity = torch.eye(40, dtype=dtype)
    assert torch.allclose(omega.T @ omega, identity, atol=TOL[dtype])
    assert torch.allclose(psi @ psi.T, identity, atol=TOL[dtype])


def test_iid_entries_have_their_distribution_and_dtype_is_a_cast():
    rademacher = sketch_for(DIM, 40, seed=0, dtype=torch.float64, noise="rademacher")
    signs = rademacher.omega_columns(range(40))
    assert set(signs.unique().tolist()) == {-1.0, 1.0}
    gaussian64 = sketch_for(DIM, 40, seed=0, dtype=torch.float64, noise="gaussian")
    normal = gaussian64.omega_columns(range(40))
    assert abs(normal.mean().item()) < 0.02 and abs(normal.std().item() - 1) < 0.02
    gaussian32 = sketch_for(DIM, 40, seed=0, dtype=torch.float32, noise="gaussian")
    assert torch.equal(gaussian32.omega_columns(range(40)), normal.float())


# ---------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("noise", ["ssrft", "gaussian"])
def test_measurements_merge_bit_identically_across_workers(noise):
    """1, 2 and 7 workers with different block sizes: identical sketches and solutions.

    Bitwise by construction on one kernel path: every product here is one matrix-vector
    product per contiguous column (``column_by_column`` and the test matrices'
    ``t_apply``), so a column's bits never depend on its block.
    """
    matrix, _, _ = symmetric_with_spectrum(noisy_spectrum(1e-3, dim=120), 1, torch.float64)
    num_outer, num_inner = 12, 35
    sketch = sketch_for(120, num_inner, seed=5, dtype=torch.float64, noise=noise)
    matmat = column_by_column(matrix)
    merged = []
    for num_workers, block_size in ((1, 35), (2, 4), (7, 1)):
        tasks = array_tasks(num_inner, math.ceil(num_inner / num_workers))
        assert tasks.num_tasks == num_workers
        blocks = [
            block
            for task in range(num_workers)
            for block in measure_indices(
                matmat, sketch, tasks.task_indices(task), num_outer, block_size
            )
        ]
        merged.append(assemble_sketch(reversed(blocks), 120, num_outer, num_inner))
    solutions = [
        seigh_single_pass(outer, inner, sketch.omega_t_apply, sketch.psi_apply)
        for outer, inner in merged
    ]
    for (outer, inner), (eigenvalues, eigenvectors) in zip(merged[1:], solutions[1:], strict=True):
        assert torch.equal(outer, merged[0][0]) and torch.equal(inner, merged[0][1])
        assert torch.equal(eigenvalues, solutions[0][0])
        assert torch.equal(eigenvectors, solutions[0][1])
    # And the merged sketch is what it should be: Y = H Omega[:, :k], Z = Psi H Omega.
    omega = sketch.omega_columns(range(num_inner))
    outer, inner = merged[0]
    assert torch.allclose(outer, matrix @ omega[:, :num_outer], atol=1e-12)
    assert torch.allclose(inner, sketch.psi_apply(matrix @ omega), atol=1e-12)


def test_measure_block_recycles_outer_columns():
    matrix, _, _ = symmetric_with_spectrum(low_rank_spectrum(dim=60), 2, torch.float64)
    sketch = sketch_for(60, 20, seed=0, dtype=torch.float64)
    block = measure_block(matrix.__matmul__, sketch, [3, 8, 9, 15], num_outer=9)
    assert block.indices.tolist() == [3, 8, 9, 15]
    assert block.outer_indices.tolist() == [3, 8]
    assert block.inner.shape == (20, 4) and block.outer.shape == (60, 2)
    expected = matrix @ sketch.omega_columns([3, 8])
    assert torch.allclose(block.outer, expected, atol=1e-12)
    assert torch.allclose(block.inner[:, :2], sketch.psi_apply(expected), atol=1e-12)


def test_assemble_sketch_refuses_missing_or_repeated_indices():
    matrix, _, _ = symmetric_with_spectrum(low_rank_spectrum(dim=60), 2, torch.float64)
    sketch = sketch_for(60, 10, seed=0, dtype=torch.float64)
    blocks = list(measure_indices(matrix.__matmul__, sketch, range(10), 4, block_size=3))
    with pytest.raises(ValueError, match=r"missing: \[9\]"):
        assemble_sketch(blocks[:-1], 60, 4, 10)
    with pytest.raises(ValueError, match=r"repeated: \[0, 1, 2\]"):
        assemble_sketch(blocks + blocks[:1], 60, 4, 10)


def test_array_tasks_cover_all_inner_indices_once():
    tasks = array_tasks(710, 200)
    covered = [i for task in range(tasks.num_tasks) for i in tasks.task_indices(task)]
    assert tasks.num_tasks == 4 and covered == list(range(710))
    with pytest.raises(ConfigError):
        tasks.task_indices(4)


def test_matmat_shape_is_checked():
    sketch = sketch_for(60, 10, seed=0, dtype=torch.float64)
    with pytest.raises(ValueError, match="mapped shape"):
        measure_block(lambda m: m[:-1], sketch, [0, 1], num_outer=1)


# ---------------------------------------------------------------------------------------
# Solve
# ---------------------------------------------------------------------------------------
def test_single_pass_recovers_exactly_low_rank_float64():
    matrix, eigenvalues, eigenvectors = symmetric_with_spectrum(
        low_rank_spectrum(), 0, torch.float64
    )
    recovered, vectors = single_pass(matrix, num_outer=20, num_inner=45)
    assert recovered.shape == (20,) and vectors.shape == (DIM, 20)
    assert relative_errors(recovered[:10], eigenvalues[:10]).max() < 1e-8
    assert sign_invariant_misalignment(vectors[:, :10], eigenvectors[:, :10]).max() < 1e-8
    assert recovered[10:].abs().max() < 1e-8  # the rest of the spectrum is zero


@pytest.mark.parametrize("noise", NOISE_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("recovery", ["single_pass", "two_pass", "two_pass_plain"])
def test_recoveries_on_low_rank_and_indefinite(noise, dtype, recovery):
    """Exactly low-rank indefinite matrices: every recovery is exact up to rounding, and the
    eigenpairs come sorted by |lambda| with their signs.
    """
    matrix, eigenvalues, eigenvectors = symmetric_with_spectrum(indefinite_spectrum(), 4, dtype)
    if recovery == "single_pass":
        recovered, vectors = single_pass(matrix, 20, 45, noise=noise)
    else:
        extended = recovery == "two_pass"
        recovered, vectors = seigh_two_pass(*two_pass_inputs(matrix, 20), krylov_extension=extended)
    assert (recovered[:-1].abs() >= recovered[1:].abs()).all()
    assert torch.equal(recovered[:10].sign().double(), eigenvalues[:10].sign())
    assert relative_errors(recovered[:10], eigenvalues[:10]).max() < TOL[dtype]
    assert sign_invariant_misalignment(vectors[:, :10], eigenvectors[:, :10]).max() < TOL[dtype]
    assert torch.allclose(
        vectors.T @ vectors, torch.eye(vectors.shape[1], dtype=dtype), atol=TOL[dtype]
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_accuracy_with_noisy_bulk_ranks_the_recoveries(dtype):
    """Low rank plus a bulk of level 1e-2: all recoveries get the top 10 right, and with the
    same 2k HVPs two-pass beats single pass and the block Krylov extension beats plain
    Rayleigh-Ritz by more than an order of magnitude.
    """
    matrix, eigenvalues, eigenvectors = symmetric_with_spectrum(noisy_spectrum(1e-2), 0, dtype)
    single = single_pass(matrix, 20, 40)
    two_pass_data = two_pass_inputs(matrix, 20)
    rayleigh_ritz = seigh_two_pass(*two_pass_data, krylov_extension=False)
    extended = seigh_two_pass(*two_pass_data)
    errors = [
        relative_errors(values[:10], eigenvalues[:10]).max().item()
        for values, _ in (single, rayleigh_ritz, extended)
    ]
    assert errors[0] < 3e-2
    assert errors[1] < errors[0] and errors[1] < 3e-3
    assert errors[2] < errors[1] / 10
    for (_, vectors), tolerance in zip(
        (single, rayleigh_ritz, extended), (5e-3, 1e-3, 1e-5), strict=True
    ):
        assert sign_invariant_misalignment(vectors[:, :10], eigenvectors[:, :10]).max() < tolerance


def test_oversampled_basis_improves_two_pass():
    """More basis columns than reported eigenpairs: the top 10 get more accurate."""
    matrix, eigenvalues, _ = symmetric_with_spectrum(noisy_spectrum(1e-2), 0, torch.float64)
    errors = []
    for num_outer in (12, 24, 48):
        recovered, vectors = seigh_two_pass(*two_pass_inputs(matrix, num_outer), num_eigenpairs=10)
        assert recovered.shape == (10,) and vectors.shape == (DIM, 10)
        errors.append(relative_errors(recovered, eigenvalues[:10]).max().item())
    assert errors[0] > errors[1] > errors[2]


def test_single_pass_core_is_symmetric():
    matrix, _, _ = symmetric_with_spectrum(noisy_spectrum(1e-2), 0, torch.float64)
    sketch = sketch_for(DIM, 40, seed=0, dtype=torch.float64)
    measured = matrix @ sketch.omega_columns(range(40))
    basis = orthonormal_basis(measured[:, :20])
    core = single_pass_core(
        basis, sketch.psi_apply(measured), sketch.omega_t_apply, sketch.psi_apply
    )
    assert core.shape == (20, 20) and torch.equal(core, core.T)


def test_block_krylov_extension_of_a_low_rank_matrix_adds_nothing_spurious():
    """On an exactly rank-10 matrix ``H Q`` lies in ``span(Q)``: the extension's directions
    carry no coupling, so the top 10 are exact and every other eigenvalue is zero.
    """
    matrix, eigenvalues, _ = symmetric_with_spectrum(low_rank_spectrum(), 0, torch.float64)
    recovered, vectors = seigh_two_pass(*two_pass_inputs(matrix, 20))
    assert recovered.shape == (20,) and vectors.shape == (DIM, 20)
    assert relative_errors(recovered[:10], eigenvalues[:10]).max() < 1e-8
    assert recovered[10:].abs().max() < 1e-8


@pytest.mark.parametrize("num_outer", [25, 33, 40])
def test_two_pass_with_more_than_half_of_d_columns_stays_orthonormal(num_outer):
    """``2k > D``: the complement of ``span(Q)`` has fewer than ``k`` dimensions. A thin QR
    would add columns not orthogonal to ``Q``: measured here, top-10 relative errors of 3 to
    4 and Gram matrices off the identity by 0.8. The extension keeps only the complement's
    directions: eigenvectors orthonormal to rounding (D = 40 roundings of ``||H|| = 10`` in
    float64, 40 * 10 * 2.2e-16 < 1e-13, with room for the SVD), and with ``k = D`` the exact
    spectrum. Below ``k = D`` the top 10 keep the extension's own approximation (the
    omitted block ``P^T H P`` of the 0.1 bulk): measured 3e-5 and 1e-5, bounded by 1e-4.
    """
    dim = 40
    matrix, eigenvalues, _ = symmetric_with_spectrum(
        noisy_spectrum(1e-1, dim=dim), 0, torch.float64
    )
    recovered, vectors = seigh_two_pass(*two_pass_inputs(matrix, num_outer))
    gram = vectors.T @ vectors
    assert (gram - torch.eye(num_outer, dtype=torch.float64)).abs().max() < 1e-12
    assert relative_errors(recovered[:10], eigenvalues[:10]).max() < 1e-4
    if num_outer == dim:
        assert (recovered - eigenvalues).abs().max() < 1e-12


# ---------------------------------------------------------------------------------------
# A-posteriori error
# ---------------------------------------------------------------------------------------
def test_apost_failure_probabilities_reproduce_reference_numbers():
    low, high = apost_failure_probabilities(30, 0.5)
    assert round(low, 3) == 0.055 and round(high, 3) == 0.242
    for num_probes, eps in ((30, 0.5), (10, 0.3), (100, 0.2)):
        skerch_bounds = list(apost_error_bounds(num_probes, eps).values())
        assert pytest.approx(skerch_bounds, rel=1e-12) == apost_failure_probabilities(
            num_probes, eps
        )
    assert apost_failure_probabilities(60, 0.5)[0] < low  # more probes, tighter
    with pytest.raises(ValueError):
        apost_failure_probabilities(30, 1.0)


def test_apost_estimate_obeys_its_probability_band():
    """200 independent 30-probe estimates of a known error: the fractions outside
    [0.5 x, 1.5 x] stay below the bounds 0.055 and 0.242, and the mean is unbiased.
    """
    matrix, eigenvalues, eigenvectors = symmetric_with_spectrum(
        noisy_spectrum(0.3, dim=100), 0, torch.float64
    )
    kept_values, kept_vectors = eigenvalues[:5], eigenvectors[:, :5]
    true_error_sq = eigenvalues[5:].pow(2).sum().item()
    true_frobenius_sq = eigenvalues.pow(2).sum().item()
    registry = SeedRegistry()
    estimates = []
    for trial in range(200):
        probes = gaussian_probes(
            100, registry.register_next(f"trial{trial}", 30), dtype=torch.float64, device="cpu"
        )
        estimates.append(
            apost_error(matrix.__matmul__, kept_values, kept_vectors, probes, block_size=30)
        )
    ratios = torch.tensor([e.error_sq for e in estimates]) / true_error_sq
    low_bound, high_bound = apost_failure_probabilities(30, 0.5)
    assert (ratios <= 0.5).double().mean() <= low_bound
    assert (ratios >= 1.5).double().mean() <= high_bound
    assert abs(ratios.mean().item() - 1) < 0.05
    frobenius_ratios = torch.tensor([e.frobenius_sq for e in estimates]) / true_frobenius_sq
    assert abs(frobenius_ratios.mean().item() - 1) < 0.05
    relative = estimates[0].relative_error
    assert relative == pytest.approx(math.sqrt(estimates[0].error_sq / estimates[0].frobenius_sq))


def test_gaussian_probes_are_seeded_per_probe():
    registry = sketch_seed_ranges(0, 10, 30)
    probes = gaussian_probes(50, registry["apost"], dtype=torch.float32, device="cpu")
    assert probes.shape == (50, 30) and probes.dtype == torch.float32
    fewer = SeedRegistry().register("apost", registry["apost"].start, 3)
    assert torch.equal(gaussian_probes(50, fewer, dtype=torch.float32, device="cpu"), probes[:, :3])


def test_low_rank_apply_matches_dense():
    generator = torch.Generator().manual_seed(0)
    vectors, _ = torch.linalg.qr(torch.randn(40, 5, generator=generator, dtype=torch.float64))
    values = torch.tensor([3.0, -2.0, 1.0, 0.5, -0.1], dtype=torch.float64)
    x = torch.randn(40, 4, generator=generator, dtype=torch.float64)
    dense = (vectors * values) @ vectors.T
    assert torch.allclose(low_rank_apply(values, vectors, x), dense @ x, atol=1e-13)


def test_scree_bounds_formula():
    lower, upper = scree_bounds(
        torch.tensor([3.0, -2.0, 1.0], dtype=torch.float64), error=0.5, frobenius=4.0
    )
    residuals = torch.tensor([14.0, 5.0, 1.0], dtype=torch.float64).sqrt()
    assert torch.allclose(lower, residuals.pow(2) / 16)
    assert torch.allclose(upper, (residuals + 0.5).pow(2) / 16)
    assert (lower[:-1] >= lower[1:]).all() and (upper > lower).all()


# ---------------------------------------------------------------------------------------
# In-core path
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("recovery", ["single_pass", "two_pass"])
def test_sketched_eigh_end_to_end(recovery, dtype):
    matrix, eigenvalues, eigenvectors = symmetric_with_spectrum(noisy_spectrum(1e-3), 3, dtype)
    num_inner = 45 if recovery == "single_pass" else None
    result = sketched_eigh(
        matrix.__matmul__,
        DIM,
        20,
        num_inner,
        seed=100,
        recovery=recovery,
        block_size=8,
        dtype=dtype,
        device="cpu",
        num_eigenpairs=15,
    )
    num_reported = result.eigenvalues.shape[0]
    assert num_reported == 15
    assert result.eigenvectors.shape == (DIM, num_reported)
    assert result.eigenvalues.dtype == result.eigenvectors.dtype == dtype
    assert relative_errors(result.eigenvalues[:10], eigenvalues[:10]).max() < 1e-2
    assert (
        sign_invariant_misalignment(result.eigenvectors[:, :10], eigenvectors[:, :10]).max() < 1e-3
    )
    expected_hvps = (
        {"sketch": 45, "apost": 30} if num_inner else {"sketch": 20, "second_pass": 20, "apost": 30}
    )
    assert result.hvps == expected_hvps
    assert result.num_hvps == sum(expected_hvps.values())
    timed_phases = set(result.seconds)
    assert timed_phases == {"measure", "solve", "apost"}
    true_error = torch.linalg.matrix_norm(
        matrix.double()
        - (result.eigenvectors.double() * result.eigenvalues.double())
        @ result.eigenvectors.double().T
    )
    true_relative = (true_error / torch.linalg.matrix_norm(matrix.double())).item()
    assert 0.5 < result.relative_error / true_relative < 1.5
    assert result.scree_lower.shape == result.scree_upper.shape == (num_reported,)
    assert (result.scree_upper >= result.scree_lower).all()


def test_sketched_eigh_rejects_inconsistent_budgets():
    matrix = torch.eye(50, dtype=torch.float64)
    with pytest.raises(ValueError, match="num_inner > num_outer"):
        sketched_eigh(matrix.__matmul__, 50, 10, 10, seed=0, dtype=torch.float64, device="cpu")
    with pytest.raises(ValueError, match="takes no num_inner"):
        sketched_eigh(
            matrix.__matmul__,
            50,
            10,
            20,
            seed=0,
            recovery="two_pass",
            dtype=torch.float64,
            device="cpu",
        )
    with pytest.raises(ValueError, match="unknown recovery"):
        sketched_eigh(
            matrix.__matmul__, 50, 10, 20, seed=0, recovery="hmt", dtype=torch.float64, device="cpu"
        )
