"""In-core sketched eigendecomposition of a small operator: measure, solve, check, in RAM.

For small ``D`` (e.g. the 7,030-parameter mnist_mini MLP) the whole SEIGH pipeline of
Fernandez et al. ("Connecting Parameter Magnitudes and Hessian Eigenspaces at Scale using Sketched
Methods") fits in memory. :func:`sketched_eigh` runs it with exactly the functions the distributed
pipeline uses (:mod:`hessov.skerch_ext.measure` blocks, :mod:`hessov.skerch_ext.solve`,
:mod:`hessov.skerch_ext.aposteriori`), so it computes what the pipeline computes and serves as its
reference. Recoveries (Tropp et al. 2017, "Practical sketching algorithms for low-rank matrix
approximation"; Halko, Martinsson and Tropp 2011, "Finding structure with randomness"):

* ``"single_pass"``: ``s`` HVPs (``k`` of them recycled as outer sketch), SEIGH core.
* ``"two_pass"``: ``k`` HVPs for ``Q``, ``k`` more for ``H Q``, Rayleigh-Ritz on the block
  Krylov space ``span(Q, H Q)`` (:func:`hessov.skerch_ext.solve.block_krylov_extension`);
  the most accurate per HVP, and with an error bound on every eigenvalue
  (:mod:`hessov.skerch_ext.krylov`).

Then ``num_apost`` Gaussian probes give the a-posteriori error and scree bounds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from hessov.skerch_ext.aposteriori import ApostEstimate, apost_error, gaussian_probes, scree_bounds
from hessov.skerch_ext.krylov import EigenvalueBounds, core_bounds, krylov_blocks
from hessov.skerch_ext.measure import assemble_sketch, matmat_in_blocks, measure_indices
from hessov.skerch_ext.operator import MatMat
from hessov.skerch_ext.options import RECOVERIES
from hessov.skerch_ext.random_matrices import SketchMatrices
from hessov.skerch_ext.seeds import sketch_seed_ranges
from hessov.skerch_ext.solve import (
    eigenpairs_from_core,
    extended_core,
    seigh_single_pass,
)

#: Where the in-core two-pass bounds come from.
IN_CORE_BOUNDS = (
    "the later rounds' products (the Ritz pairs of the exactly projected Krylov space), "
    "no extra HVP"
)


@dataclass(frozen=True)
class SketchedEighResult:
    """Eigenpairs of ``H`` with their a-posteriori check and bookkeeping.

    Attributes:
        eigenvalues: ``(r,)``, sorted by ``|lambda|`` descending.
        eigenvectors: ``(D, r)``, orthonormal columns.
        apost: Estimates of ``||H - W diag(L) W^T||_F^2`` and ``||H||_F^2``.
        scree_lower: ``(r,)``, see :func:`hessov.skerch_ext.aposteriori.scree_bounds`.
        scree_upper: ``(r,)``.
        hvps: HVPs per phase (``"sketch"``, ``"second_pass"``, ``"apost"``).
        seconds: Wall-clock seconds per phase (``"measure"``, ``"solve"``, ``"apost"``).
        bounds: Two-pass: an error bound on every eigenvalue
            (:class:`hessov.skerch_ext.krylov.EigenvalueBounds`); single pass: None.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    apost: ApostEstimate
    scree_lower: torch.Tensor
    scree_upper: torch.Tensor
    hvps: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    bounds: EigenvalueBounds | None = None

    @property
    def relative_error(self) -> float:
        """A-posteriori ``||H - W diag(L) W^T||_F / ||H||_F``."""
        return self.apost.relative_error

    @property
    def num_hvps(self) -> int:
        """All HVPs spent, a-posteriori probes included."""
        return sum(self.hvps.values())


def sketched_eigh(  # noqa: PLR0913 (the sketch's settings, keyword-only and mostly defaulted)
    matmat: MatMat,
    dim: int,
    num_outer: int,
    num_inner: int | None = None,
    *,
    seed: int,
    noise: str = "ssrft",
    recovery: str = "single_pass",
    block_size: int = 32,
    dtype: torch.dtype,
    device: torch.device | str,
    num_apost: int = 30,
    num_eigenpairs: int | None = None,
    rounds: int = 2,
) -> SketchedEighResult:
    """Sketched eigendecomposition of the symmetric operator ``matmat`` (D x D).

    Args:
        matmat: ``M -> H M`` on ``(D, b)`` tensors of ``dtype`` on ``device``.
        dim: ``D``.
        num_outer: ``k``, the columns of the basis ``Q``.
        num_inner: ``s > k``, inner measurements (single pass only; must be None otherwise, the
            two-pass recoveries spend ``2k`` HVPs).
        seed: Base seed; Omega, Psi and the probes get disjoint ranges from it
            (:func:`hessov.skerch_ext.seeds.sketch_seed_ranges`).
        noise: Test-matrix type, see :data:`hessov.skerch_ext.options.NOISE_TYPES`.
        recovery: One of :data:`hessov.skerch_ext.options.RECOVERIES`.
        block_size: Columns per batched HVP (bounds the operator's memory).
        dtype: The dtype of the test matrices and the probes, that ``matmat`` takes.
        device: The device of the test matrices and the probes, that ``matmat`` takes.
        num_apost: Gaussian probes for the a-posteriori error (>= 1).
        num_eigenpairs: ``r``, eigenpairs to report (default ``k``); fewer than ``k`` makes the
            basis oversampled, which is what makes the top ``r`` accurate.
        rounds: two-pass only: ``q >= 2`` rounds of ``k`` HVPs, block Krylov on
            ``span(H Omega, ..., H^q Omega)`` (:mod:`hessov.skerch_ext.krylov`); 2 is the
            two-pass recovery, more rounds are more accurate and tighten the bounds.
    """
    if recovery not in RECOVERIES:
        raise ValueError(f"unknown recovery '{recovery}', expected one of {RECOVERIES}")
    single_pass = recovery == "single_pass"
    if single_pass and (num_inner is None or num_inner <= num_outer):
        raise ValueError(f"single pass needs num_inner > num_outer, got {num_inner}")
    if not single_pass and num_inner is not None:
        raise ValueError(f"{recovery} takes no num_inner (it spends 2 * num_outer HVPs)")
    if rounds < 2 or (single_pass and rounds != 2):  # noqa: PLR2004 (two-pass's two rounds)
        raise ValueError(f"rounds: two_pass takes 2 or more, single_pass none; got {rounds}")
    num_omega_columns = num_inner if single_pass else num_outer
    seeds = sketch_seed_ranges(seed, num_omega_columns, num_apost)
    sketch = SketchMatrices.from_seeds(
        dim, num_omega_columns, seeds, noise=noise, dtype=dtype, device=device
    )
    seconds, hvps, bounds = {}, {}, None
    if single_pass:
        eigenvalues, eigenvectors = _single_pass(
            matmat, sketch, num_outer, num_inner, block_size, num_eigenpairs, seconds, hvps
        )
    else:
        eigenvalues, eigenvectors, bounds = _two_pass(
            matmat, sketch, (num_outer, rounds), block_size, num_eigenpairs, seconds, hvps
        )

    start = time.perf_counter()
    probes = gaussian_probes(dim, seeds["apost"], dtype=dtype, device=device)
    apost = apost_error(matmat, eigenvalues, eigenvectors, probes, block_size)
    scree_lower, scree_upper = scree_bounds(eigenvalues, apost.error, apost.frobenius)
    hvps["apost"] = num_apost
    seconds["apost"] = time.perf_counter() - start

    return SketchedEighResult(
        eigenvalues, eigenvectors, apost, scree_lower, scree_upper, hvps, seconds, bounds
    )


def _single_pass(
    matmat: MatMat,
    sketch: SketchMatrices,
    num_outer: int,
    num_inner: int,
    block_size: int,
    num_eigenpairs: int | None,
    seconds: dict[str, float],
    hvps: dict[str, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """SEIGH's single pass: ``s`` HVPs (``k`` recycled as the outer sketch), then the core
    solve; records each phase's seconds and HVPs in ``seconds`` and ``hvps``.
    """
    start = time.perf_counter()
    blocks = measure_indices(matmat, sketch, range(num_inner), num_outer, block_size)
    outer, inner = assemble_sketch(blocks, sketch.dim, num_outer, num_inner)
    hvps["sketch"] = num_inner
    seconds["measure"] = time.perf_counter() - start
    start = time.perf_counter()
    result = seigh_single_pass(outer, inner, sketch.omega_t_apply, sketch.psi_apply, num_eigenpairs)
    seconds["solve"] = time.perf_counter() - start
    return result


def _two_pass(
    matmat: MatMat,
    sketch: SketchMatrices,
    shape: tuple[int, int],
    block_size: int,
    num_eigenpairs: int | None,
    seconds: dict[str, float],
    hvps: dict[str, int],
) -> tuple[torch.Tensor, torch.Tensor, EigenvalueBounds]:
    """``shape = (k, q)``: ``k`` HVPs for the basis ``Q``, ``k`` more in each of the ``q - 1``
    later rounds (``H Q``, then ``H`` on each new Krylov block), then Rayleigh-Ritz on the
    block Krylov space with a bound on every eigenvalue; records each phase's seconds and
    HVPs (``"second_pass"``: the later rounds') in ``seconds`` and ``hvps``.
    """
    num_outer, rounds = shape
    start = time.perf_counter()
    omega = sketch.omega_columns(range(num_outer))
    basis, products, extension = krylov_blocks(
        lambda block: matmat_in_blocks(matmat, block, block_size), omega, rounds
    )
    hvps["sketch"], hvps["second_pass"] = num_outer, products.shape[1]
    seconds["measure"] = time.perf_counter() - start
    start = time.perf_counter()
    full_basis, core = extended_core(basis, products, extension)
    num = basis.shape[1]
    count = min(num_eigenpairs or num_outer, num)
    eigenvalues, eigenvectors = eigenpairs_from_core(full_basis, core, count)
    bounds = core_bounds(core, num, eigenvalues, (basis.dtype, basis.shape[0]), num_outer)
    seconds["solve"] = time.perf_counter() - start
    return eigenvalues, eigenvectors, EigenvalueBounds(*bounds, IN_CORE_BOUNDS)
