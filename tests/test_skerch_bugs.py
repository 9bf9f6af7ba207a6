"""Behaviours of skerch 1.2.0 that ``skerch_ext`` works around, each shown, then fixed.

Each test first asserts the skerch behaviour (so it fails, and tells us, if a later skerch
fixes it), then that our replacement does not have it. skerch's SSRFT itself is correct
and reused; the issues are around it:

* i.i.d. noise blocks are seeded with ``seed + block start`` (``measurements.py`` lines
  97-100 and 153-160), so Omega depends on the block size and overlapping seed ranges
  repeat columns;
* the seed register treats adjacent ranges as overlapping (``measurements.py`` line 55);
* ``recovery.oversampled_h`` (lines 317-321) returns an unsymmetrized core;
* ``a_posteriori.apost_error`` rescales its Gaussian probes (line 152), so they are no longer
  Gaussian, and ``scree_bounds`` (lines 207-219) normalises by the recovered spectrum rather
  than by ``||H||_F``;
* ``PhaseNoiseLinOp`` by row returns transposed blocks (``measurements.py`` line 212).
"""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
from skerch.a_posteriori import apost_error as skerch_apost_error
from skerch.a_posteriori import scree_bounds as skerch_scree_bounds
from skerch.measurements import (
    GaussianNoiseLinOp,
    PhaseNoiseLinOp,
    RademacherNoiseLinOp,
    SsrftNoiseLinOp,
)
from skerch.recovery import oversampled_h
from skerch.utils import BadSeedError

from hessov.skerch_ext.aposteriori import apost_error, gaussian_probes, scree_bounds
from hessov.skerch_ext.random_matrices import RandomMatrix, SketchMatrices
from hessov.skerch_ext.seeds import SeedRegistry, sketch_seed_ranges
from hessov.skerch_ext.solve import orthonormal_basis, single_pass_core

DIM, NUM_INNER, SEED = 200, 24, 1234


def skerch_matrix(linop_class, block_size: int, seed: int = SEED) -> torch.Tensor:
    linop = linop_class((DIM, NUM_INNER), seed, blocksize=block_size, register=False)
    return linop.to_matrix(torch.float64)


@pytest.mark.parametrize("linop_class", [GaussianNoiseLinOp, RademacherNoiseLinOp])
def test_skerch_iid_omega_depends_on_block_size(linop_class):
    """Bug: the same (seed, shape) gives a different Omega for a different block size, so
    workers with different block sizes measure with different test matrices.
    """
    one_by_one = skerch_matrix(linop_class, block_size=1)
    in_blocks_of_7 = skerch_matrix(linop_class, block_size=7)
    assert not torch.equal(one_by_one, in_blocks_of_7)
    assert not torch.equal(one_by_one[:, 0], in_blocks_of_7[:, 0])  # even the first column


def test_skerch_ssrft_is_partition_invariant_so_we_reuse_it():
    assert torch.equal(skerch_matrix(SsrftNoiseLinOp, 1), skerch_matrix(SsrftNoiseLinOp, 7))


@pytest.mark.parametrize("noise", ["gaussian", "rademacher", "ssrft"])
def test_our_omega_is_partition_invariant(noise):
    seeds = SeedRegistry()
    omega = RandomMatrix(DIM, NUM_INNER, seeds.register("omega", SEED, NUM_INNER), noise)
    whole = omega.columns(range(NUM_INNER), dtype=torch.float64, device="cpu")
    for block_size in (1, 7):
        blocks = [
            omega.columns(
                range(start, min(start + block_size, NUM_INNER)), dtype=torch.float64, device="cpu"
            )
            for start in range(0, NUM_INNER, block_size)
        ]
        assert torch.equal(torch.cat(blocks, dim=1), whole)


def test_skerch_overlapping_seeds_repeat_columns_and_we_refuse_them():
    """Bug: with the paper's layout (Omega at seed + 1, Psi at seed + 2) and one column per
    block, Omega's column m + 1 *is* Psi's row m: the two sketches are not independent.
    """
    omega = skerch_matrix(GaussianNoiseLinOp, block_size=1, seed=SEED + 1)
    psi_transposed = skerch_matrix(GaussianNoiseLinOp, block_size=1, seed=SEED + 2)
    assert torch.equal(omega[:, 1:], psi_transposed[:, :-1])
    registry = SeedRegistry()
    registry.register("omega", SEED + 1, NUM_INNER)
    with pytest.raises(ValueError, match="overlaps"):
        registry.register("psi", SEED + 2, NUM_INNER)
    sketch = SketchMatrices.from_seeds(
        DIM,
        NUM_INNER,
        sketch_seed_ranges(SEED, NUM_INNER, 30),
        noise="gaussian",
        dtype=torch.float64,
        device="cpu",
    )
    # Entry (m, j) is <Omega[:, m], Psi[j, :]>: about DIM for a repeated Gaussian vector,
    # about sqrt(DIM) for independent ones.
    cross = (
        sketch.omega_columns(range(NUM_INNER)).T
        @ sketch.psi_apply(torch.eye(DIM, dtype=torch.float64)).T
    )
    assert cross.abs().max() < DIM / 2


def test_skerch_seed_register_rejects_adjacent_ranges(monkeypatch):
    """Bug (off by one): [0, 10) and [10, 20) are disjoint, but ``end1 >= beg2`` flags them."""
    monkeypatch.setattr(GaussianNoiseLinOp, "REGISTER", defaultdict(list))
    GaussianNoiseLinOp((DIM, 10), 0, register=True)
    with pytest.raises(BadSeedError):
        GaussianNoiseLinOp((DIM, 10), 10, register=True)
    registry = SeedRegistry()
    registry.register("omega", 0, 10)
    assert registry.register("psi", 10, 10).start == 10


def test_skerch_oversampled_core_is_not_symmetric_ours_is():
    """Bug: the oversampled core estimates the symmetric Q^T H Q but is returned (and handed
    to eigh, which reads one triangle) unsymmetrized.
    """
    generator = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=generator, dtype=torch.float64))
    spectrum = torch.cat(
        [
            torch.logspace(1, 0, 10, dtype=torch.float64),
            0.05 * torch.randn(DIM - 10, generator=generator, dtype=torch.float64),
        ]
    )
    matrix = (basis * spectrum) @ basis.T
    matrix = (matrix + matrix.T) / 2
    sketch = SketchMatrices.from_seeds(
        DIM, 40, sketch_seed_ranges(0, 40, 30), dtype=torch.float64, device="cpu"
    )
    omega = sketch.omega_columns(range(40))
    psi = sketch.psi_apply(torch.eye(DIM, dtype=torch.float64))
    measured = matrix @ omega
    inner = psi @ measured
    skerch_core, _ = oversampled_h(measured[:, :15], inner, psi, omega, as_eigh=False)
    asymmetry = (skerch_core - skerch_core.T).abs().max() / skerch_core.abs().max()
    assert asymmetry > 1e-3
    ours = single_pass_core(
        orthonormal_basis(measured[:, :15]), inner, sketch.omega_t_apply, sketch.psi_apply
    )
    assert torch.equal(ours, ours.T)


def test_skerch_apost_probes_are_not_gaussian():
    """Deviation: ``apost_error`` rescales each coordinate of its probes across the block,
    so they are not Gaussian and the Gaussian probability bounds do not cover them. On a
    diagonal operator, one-probe blocks are exactly +-1 vectors: all 30 estimates agree.
    """
    diagonal = torch.diag(torch.arange(1.0, DIM + 1, dtype=torch.float64))
    zero = torch.zeros(DIM, DIM, dtype=torch.float64)
    _, (per_probe, _, _) = skerch_apost_error(
        diagonal, zero, "cpu", torch.float64, num_meas=30, meas_blocksize=1, noise_type="gaussian"
    )
    assert per_probe.std() == 0
    probes = gaussian_probes(
        DIM, sketch_seed_ranges(0, 5, 30)["apost"], dtype=torch.float64, device="cpu"
    )
    assert probes.abs().unique().numel() == probes.numel()  # genuinely Gaussian
    ours = apost_error(
        diagonal.__matmul__,
        torch.zeros(1, dtype=torch.float64),
        torch.zeros(DIM, 1, dtype=torch.float64),
        probes,
        block_size=30,
    )
    true_frobenius_sq = diagonal.pow(2).sum().item()
    assert ours.frobenius_sq != pytest.approx(true_frobenius_sq, rel=1e-6)
    assert ours.frobenius_sq == pytest.approx(true_frobenius_sq, rel=0.5)


def test_skerch_scree_bounds_normalise_by_recovered_spectrum():
    """Deviation: skerch divides by ||L|| instead of ||H||_F, so its lower scree bound
    always starts at 1, even when the recovered eigenvalues carry a fraction of ||H||_F.
    """
    eigenvalues = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    frobenius = 2 * eigenvalues.norm().item()  # the eigenpairs hold a quarter of ||H||_F^2
    skerch_lower, _ = skerch_scree_bounds(eigenvalues, 0.5)
    assert skerch_lower[0] == pytest.approx(1.0)
    lower, _ = scree_bounds(eigenvalues, 0.5, frobenius)
    assert lower[0] == pytest.approx(0.25)


def test_skerch_phase_noise_by_row_blocks_are_transposed():
    """Bug: a by-row block of a (5, 3) operator must be (1, 3); skerch returns (3, 1)."""
    linop = PhaseNoiseLinOp((5, 3), 0, by_row=True, register=False)
    assert linop.get_block(0, torch.complex64, "cpu").shape == (3, 1)
