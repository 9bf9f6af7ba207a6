"""The phases of the out-of-core basis and solve: TSQR, Rayleigh-Ritz and the a-posteriori
check, each a function of one row block or of every block's small results.

:mod:`hessov.rowpass` runs them (as job arrays on Slurm, as a loop locally); this module
says what each computes, the same arithmetic in the same order as the in-memory solve
(:mod:`hessov.skerch_ext.solve`), so the two agree within the hardware's rounding.

* TSQR of a tall ``A`` (``(D, c)``; Demmel, Grigori, Hoemmen and Langou 2012): ``local``
  takes ``A_i = Q_i R_i`` per block, ``tree`` turns the ``R_i`` into each block's ``F_i``
  (:func:`hessov.skerch_ext.rowblocks.tree_factors`, a group of ``R_i`` at a time), ``apply``
  writes ``Q_i F_i``.
* Two-pass Rayleigh-Ritz on the block Krylov space ``span(V, P)``
  (:mod:`hessov.skerch_ext.krylov`; ``V = Q`` after two rounds,
  :func:`hessov.skerch_ext.solve.block_krylov_extension`): ``C0 = V^T (H V)`` summed over
  the blocks; ``P`` by TSQR of ``H Q_last - V C0[:, -k:]``, then again of ``P - V (V^T P)``;
  ``E = P^T (H V)``; the Ritz problem on ``[[C0, E^T], [E, 0]]``; ``W = V U_v + P U_p``.
  The basis of a later round is the same ``P`` (:func:`extension_phases`).
* Single pass: ``Q`` by TSQR of the first round, the core from ``Psi Q`` and ``Omega^T Q``
  (whole columns: the random matrices act on them), ``W = Q U``.
* The a-posteriori check (:func:`hessov.skerch_ext.aposteriori.apost_error_rows`):
  ``M = diag(L) W^T G`` summed over the blocks, then each block's squared residuals
  ``||H G - W M||^2`` and ``||H G||^2``.

The phases that read a round's measurements also return each column's CRC-32 over their
rows (:func:`hessov.skerch_ext.checksums.segment_checksums`); the combined phase after them
checks the chained CRCs against the parts' checksums before anything is built on them.

Shapes: ``rows`` rows in a block, ``k`` columns of ``Q``, ``n`` a-posteriori probes.
"""

from __future__ import annotations

from collections.abc import Callable

import h5py
import numpy as np
import torch

from hessov.rowpass import PhaseFunction, RowWork
from hessov.skerch_ext.aposteriori import ApostEstimate
from hessov.skerch_ext.checksums import segment_checksums
from hessov.skerch_ext.krylov import core_bounds
from hessov.skerch_ext.rowblocks import tree_factors
from hessov.skerch_ext.solve import (
    core_from_projections,
    coupled_core,
    ritz_coefficients,
)

#: ``rows -> block``: rows of a tall matrix, ``(rows, c)``.
Rows = Callable[[range], torch.Tensor]
#: ``rows -> block`` of a round's measurements as stored, ``(rows, c)`` (checksummed bytes).
StoredRows = Callable[[range], np.ndarray]
#: ``crcs -> None``: check a round's per-block column CRCs ``(num_blocks, c)``; raises.
Verify = Callable[[torch.Tensor], None]


def _crc(stored: np.ndarray) -> np.ndarray:
    """The block's column CRC-32s, widened to int64 (torch has no uint32 stacking)."""
    return segment_checksums(stored).astype(np.int64)


def block_sum(work: RowWork, phase: str, name: str) -> torch.Tensor:
    """The small result ``name`` of per-block ``phase`` summed over the blocks in row order."""
    total = None
    for number in work.numbers:  # one block's at a time: O(k^2) however many blocks
        part = work.read(phase, number, [name])[name]
        if total is None:
            total = part
        else:
            total += part
    return total


def verified(work: RowWork, phase: str, verify: Verify) -> None:
    """Check the round ``phase`` read through its blocks' CRCs; on failure remove the
    phase's results (built on bad measurements) before the error propagates.
    """
    try:
        verify(work.stacked(phase, "crc"))
    except Exception:
        work.discard(phase)
        raise


def tsqr_phases(
    work: RowWork,
    prefix: str,
    source: Callable[[int, range], tuple[torch.Tensor, dict]],
    verify: Callable[[], None] | None = None,
    after: Callable[[int, range, torch.Tensor], dict] | None = None,
) -> dict[str, PhaseFunction]:
    """The three phases of TSQR of ``A``, named ``{prefix}local``, ``{prefix}tree`` and
    ``{prefix}apply``; ``apply`` results ``block``, the rows of ``Q`` ``(rows, c)``.

    Args:
        work: the program's work directory.
        prefix: the phases' name prefix.
        source: ``(number, rows) -> (A_i, extra results)``.
        verify: run before the tree (the checksums of what ``source`` read).
        after: ``(number, rows, Q_i) -> extra results`` of ``apply``.
    """
    local_name, tree_name = f"{prefix}local", f"{prefix}tree"

    def local(number: int, rows: range) -> dict:
        block, extra = source(number, rows)
        q, r = torch.linalg.qr(block, mode="reduced")
        return {"block": q, "r": r, **extra}

    def tree() -> dict:
        if verify is not None:
            verify()
        scratch_path = work.path(f"{tree_name}_scratch")  # the tree's levels, O(D / row_block)
        with h5py.File(scratch_path, "w") as scratch:
            r = tree_factors(
                lambda number: work.read(local_name, number, ["r"])["r"],
                len(work.ranges),
                scratch,
                lambda number, factor: work.write(
                    work.path(f"{tree_name}_factor", number), {"factor": factor}
                ),
            )
        scratch_path.unlink()
        return {"r": r}

    def apply(number: int, rows: range) -> dict:
        local_q = work.read(local_name, number, ["block"])["block"]
        factor = work.read(f"{tree_name}_factor", number)["factor"]
        q = local_q @ factor.to(local_q.dtype)
        return {"block": q, **(after(number, rows, q) if after else {})}

    return {local_name: local, tree_name: tree, f"{prefix}apply": apply}


def extension_phases(
    work: RowWork, basis: Rows, products: StoredRows, verify: Verify, block: int
) -> dict[str, PhaseFunction]:
    """The next Krylov block ``P`` ``(D, block)`` from ``V`` (``basis``'s rows ``(rows, n)``)
    and ``H V`` (``products``' rows ``(rows, n)``, as stored): ``project_sum``'s ``c0 =
    V^T H V`` ``(n, n)``, TSQR of ``H Q_last - V c0[:, -block:]`` (``extend_``), then of its
    reorthogonalisation against ``V`` (``reorth_``), whose ``apply`` results are ``P``'s rows
    (``block``) and the coupling's partial sums ``gram = P_i^T (H V)_i`` ``(block, n)``.
    """

    def project(number: int, rows: range) -> dict:
        stored = products(rows)
        return {"gram": basis(rows).T @ torch.from_numpy(stored), "crc": _crc(stored)}

    def project_sum() -> dict:
        verified(work, "project", verify)
        return {"c0": block_sum(work, "project", "gram")}

    def residual(number: int, rows: range):
        c0 = work.read("project_sum")["c0"]
        last = torch.from_numpy(products(rows)[:, -block:])
        return last - basis(rows) @ c0[:, -block:], {}

    def reorthogonalised(number: int, rows: range):
        overlap = work.read("overlap_sum")["overlap"]
        return work.read("extend_apply", number, ["block"])["block"] - basis(rows) @ overlap, {}

    return {
        "project": project,
        "project_sum": project_sum,
        **tsqr_phases(
            work, "extend_", residual, after=lambda n, rows, p: {"gram": basis(rows).T @ p}
        ),
        "overlap_sum": lambda: {"overlap": block_sum(work, "extend_apply", "gram")},
        **tsqr_phases(
            work,
            "reorth_",
            reorthogonalised,
            after=lambda n, rows, p: {"gram": p.T @ torch.from_numpy(products(rows))},
        ),
    }


def extended_core_of(work: RowWork) -> tuple[torch.Tensor, int]:
    """The extended core ``[[c0, E^T], [E, 0]]`` from the :func:`extension_phases`' sums, and
    ``n``, its exactly projected rows.
    """
    c0 = work.read("project_sum")["c0"]
    return coupled_core(c0, block_sum(work, "reorth_apply", "gram")), c0.shape[0]


def two_pass_phases(
    work: RowWork, basis: Rows, products: StoredRows, verify: Verify, num_eigenpairs: int
) -> tuple[dict[str, PhaseFunction], Callable[[int, range], torch.Tensor]]:
    """Rayleigh-Ritz on the block Krylov space ``span(V, P)`` from ``V`` and ``H V``
    (:func:`extension_phases`; ``span(Q, H Q)`` after two rounds) up to ``ritz`` (results
    ``eigenvalues`` ``(r,)``, ``coefficients`` ``(n + k, r)``, their ``error_bounds`` and
    ``residual_norms``), and the eigenvectors' row blocks ``(number, rows) -> W_i`` for
    :func:`apost_phases`.
    """
    block = num_eigenpairs

    def ritz() -> dict:
        core, num = extended_core_of(work)
        eigenvalues, coefficients = ritz_coefficients(core, num_eigenpairs)
        dim = work.ranges[-1].stop
        bounds, residuals = core_bounds(core, num, eigenvalues, (core.dtype, dim), block)
        return {
            "eigenvalues": eigenvalues,
            "coefficients": coefficients,
            "error_bounds": bounds,
            "residual_norms": residuals,
        }

    def eigenvector_rows(number: int, rows: range) -> torch.Tensor:
        coefficients = work.read("ritz", names=["coefficients"])["coefficients"]
        num = coefficients.shape[0] - block  # V's columns, then P's
        top, bottom = coefficients[:num], coefficients[num:]
        return basis(rows) @ top + work.read("reorth_apply", number, ["block"])["block"] @ bottom

    phases = {**extension_phases(work, basis, products, verify, block), "ritz": ritz}
    return phases, eigenvector_rows


def round_tsqr_phases(work: RowWork, outer: StoredRows, verify: Verify) -> dict[str, PhaseFunction]:
    """TSQR (``local``, ``tree``, ``apply``) of a round's outer sketch ``(D, k)``, its
    checksums verified before the tree.
    """

    def source(number: int, rows: range):
        stored = outer(rows)
        return torch.from_numpy(stored), {"crc": _crc(stored)}

    return tsqr_phases(work, "", source, verify=lambda: verified(work, "local", verify))


def single_pass_phases(
    work: RowWork,
    outer: StoredRows,
    verify: Verify,
    projections: Callable[[Callable[[int, int], torch.Tensor]], tuple[torch.Tensor, torch.Tensor]],
    inner: Callable[[], torch.Tensor],
    num_eigenpairs: int,
) -> tuple[dict[str, PhaseFunction], Callable[[int, range], torch.Tensor]]:
    """Single-pass SEIGH from the first round: ``Q`` by TSQR, then ``ritz`` on the core
    from ``projections(columns) = (Psi Q, Omega^T Q)`` ``(s, k)`` (``columns(a, b)`` reads
    ``Q[:, a:b]``) and the inner sketch ``(s, s)``; and the eigenvectors' row blocks.
    """

    def ritz() -> dict:
        psi_basis, omega_t_basis = projections(lambda a, b: work.columns("apply", a, b))
        core = core_from_projections(psi_basis, omega_t_basis, inner())
        eigenvalues, coefficients = ritz_coefficients(core, num_eigenpairs)
        return {"eigenvalues": eigenvalues, "coefficients": coefficients}

    def eigenvector_rows(number: int, rows: range) -> torch.Tensor:
        coefficients = work.read("ritz")["coefficients"]
        return work.read("apply", number, ["block"])["block"] @ coefficients

    phases = {
        **round_tsqr_phases(work, outer, verify),
        "ritz": ritz,
    }
    return phases, eigenvector_rows


def apost_phases(
    work: RowWork,
    eigenvector_rows: Callable[[int, range], torch.Tensor],
    probes: Rows,
    h_probes: StoredRows,
    verify: Verify,
    finish: Callable[[ApostEstimate], None],
) -> dict[str, PhaseFunction]:
    """The eigenvectors (results ``block``) and the a-posteriori check on them, from the
    Gaussian probes ``G`` ``(rows, n)`` and the ``apost`` round's ``H G``; ``finish``
    receives the estimate (the eigenvalues are ``ritz``'s).
    """

    def dtype() -> torch.dtype:
        return work.read("ritz", names=["eigenvalues"])["eigenvalues"].dtype

    def eigenvectors(number: int, rows: range) -> dict:
        block = eigenvector_rows(number, rows)
        return {"block": block, "gram": block.to(dtype()).T @ probes(rows).to(dtype())}

    def apost_sum() -> dict:
        eigenvalues = work.read("ritz", names=["eigenvalues"])["eigenvalues"]
        return {"coefficients": eigenvalues[:, None] * block_sum(work, "eigenvectors", "gram")}

    def apost_residuals(number: int, rows: range) -> dict:
        stored = h_probes(rows)
        products = torch.from_numpy(stored).to(dtype())
        block = work.read("eigenvectors", number, ["block"])["block"].to(dtype())
        residuals = products - block @ work.read("apost_sum")["coefficients"]
        sums = [residuals.pow(2).sum().item(), products.pow(2).sum().item()]
        return {"sums": torch.tensor(sums, dtype=torch.float64), "crc": _crc(stored)}

    def finish_check() -> None:
        verified(work, "apost_residuals", verify)
        error_sq = frobenius_sq = 0.0
        for sums in work.stacked("apost_residuals", "sums"):
            error_sq += sums[0].item()
            frobenius_sq += sums[1].item()
        num_probes = work.read("apost_sum")["coefficients"].shape[1]
        finish(ApostEstimate(error_sq / num_probes, frobenius_sq / num_probes, num_probes))

    return {
        "eigenvectors": eigenvectors,
        "apost_sum": apost_sum,
        "apost_residuals": apost_residuals,
        "finish": finish_check,
    }
