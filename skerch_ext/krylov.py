"""Block Krylov Rayleigh-Ritz over ``q`` rounds of products, with an error bound on every
eigenvalue it reports.

Round 1 measures ``Y = H Omega`` (``k`` columns); its orthonormal basis is the first block
``Q_0``. Round ``j + 1`` measures ``H Q_j``, and the next block ``Q_{j+1}`` is an orthonormal
basis of ``(I - V V^T) H Q_j``, ``V = [Q_0, ..., Q_j]``
(:func:`~hessov.skerch_ext.solve.next_block`; block Lanczos, Golub and Underwood
1977; randomized block Krylov, Musco and Musco 2015, "Randomized block Krylov methods for
stronger and faster approximate singular value decomposition"). After ``q`` rounds:

* ``V = [Q_0, ..., Q_{q-2}]`` spans ``span(H Omega, ..., H^{q-1} Omega)`` and its projected
  operator ``V^T H V`` is known exactly, since every ``H Q_j`` was measured;
* the last block ``Q_{q-1}``, from ``H Q_{q-2}``, extends the space to ``H^q Omega``. Its
  coupling ``Q_{q-1}^T H V`` is known; its own block ``Q_{q-1}^T H Q_{q-1}`` would take ``k``
  more products and is set to zero, as in
  :func:`hessov.skerch_ext.solve.block_krylov_extension` (which is this module at ``q = 2``).

The reported eigenpairs are the Rayleigh-Ritz pairs of the extended space. Their bounds come
from the exactly projected space ``V``, whose Ritz pairs ``(theta_i, v_i)`` have residuals
``r_i = ||H v_i - theta_i v_i||`` computable from the measured products alone, with no
further HVP: they are the coupling block of the extended core times the Ritz coefficients
(:func:`core_bounds`). For symmetric ``H``:

* some eigenvalue of ``H`` lies within ``r_i`` of ``theta_i`` (the residual bound, e.g.
  Parlett, *The Symmetric Eigenvalue Problem*, theorem 4.5.1);
* if no other eigenvalue lies within ``delta_i`` of ``theta_i``, that eigenvalue is within
  ``r_i^2 / delta_i`` (Kato 1949, Temple 1928; Parlett theorem 11.7.1).

The gap ``delta_i`` is estimated from the other Ritz values of ``V``, each moved towards
``theta_i`` by its own residual: ``delta_i = min_j (|theta_j - theta_i| - r_j)``. That
holds when every eigenvalue of ``H`` near ``theta_i`` has been found by some Ritz value,
which a random start block makes the rule for all but the last few pairs of the space. A
pair whose residual reaches its gap is not resolved yet: the eigenvalue of its rank may lie
anywhere (an unfound cluster above it, a bulk eigenvalue within its residual), and its
bound is ``inf``, which says "another round"; so are the last :data:`OVERSAMPLING` pairs of
the space, where an eigenvalue can go unseen. A resolved pair's reported eigenvalue
``mu_i`` of the extended space is within ``b_i = |mu_i - theta_i| + r_i^2 / delta_i`` of the
eigenvalue of its rank in ``|lambda|``
(:func:`error_bounds`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from hessov.skerch_ext.solve import (
    extended_core,
    next_block,
    orthonormal_basis,
    ritz_coefficients,
)
from hessov.skerch_ext.tolerances import rounding_level

#: ``X -> H X`` on a ``(D, b)`` block: one round's products.
MatMat = Callable[[torch.Tensor], torch.Tensor]
#: Ritz pairs at the end of the exactly projected space that are never resolved. An
#: eigenvalue there can be missed altogether, its Ritz value then approximating the next one
#: down with a small residual (seen: the 18th of 20 on a spectrum decaying as 0.64^i). A
#: random start block of ``r + p`` columns captures the top ``r`` with failure probability
#: about ``6 p^-p`` (Halko, Martinsson and Tropp 2011, section 10), 2e-3 for ``p = 5``.
OVERSAMPLING = 5
#: The name of the bound, in summaries.
BOUND_THEOREM = (
    "Kato-Temple (Mathias' form for clusters) on the Ritz pairs of the exactly projected "
    "Krylov space, gaps from its Ritz values less their residuals, plus the distance to the "
    "reported Ritz value and a rounding term"
)


def core_bounds(
    core: torch.Tensor,
    num: int,
    reported: torch.Tensor,
    precision: tuple[torch.dtype, int],
    block: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds and residual norms ``(r,)`` (float64, on the CPU) for the ``r`` reported
    eigenvalues of an extended core ``(n + m, n + m)`` whose first ``num = n`` rows and
    columns are the exactly projected space's ``V^T H V``, from the core alone.

    The Ritz pairs ``(theta_i, V u_i)`` of ``V^T H V`` have the residual ``(I - V V^T) H V
    u_i``, which the extension ``E`` spans, so its norm is ``||E^T H V u_i||``: the coupling
    block times ``u_i``. ``precision = (dtype, D)`` (the products' precision and length)
    sizes the rounding term, ``g(D) |theta|_max``
    (:func:`hessov.skerch_ext.tolerances.rounding_level`): the products are those of an
    operator within ``g(D) ||H||`` of ``H``. ``block`` is ``k``, the columns of a round: a
    Krylov space sees at most ``k`` copies of a repeated eigenvalue, so ranks from ``k`` on
    are never resolved.
    """
    core, reported = core.detach().cpu().double(), reported.detach().cpu()
    ritz, coefficients = ritz_coefficients(core[:num, :num], None)
    residuals = torch.linalg.vector_norm(core[num:, :num] @ coefficients, dim=0)
    rounding = rounding_level(*precision) * float(ritz.abs().max())
    count = reported.numel()
    bounds = error_bounds(reported, ritz, residuals, count, rounding)
    bounds[block:] = torch.inf
    return bounds, residuals[:count]


def error_bounds(
    reported: torch.Tensor,
    ritz: torch.Tensor,
    residuals: torch.Tensor,
    count: int,
    rounding: float = 0.0,
) -> torch.Tensor:
    """Absolute bounds ``(count,)`` on the reported eigenvalues (see the module doc); ``inf``
    where a pair is not resolved.

    Every residual interval is ``theta_j +- (r_j + 2 rounding)``, so that values apart by
    less than the rounding are never told apart. Ritz values whose intervals overlap form a
    cluster, bounded as one (Mathias 1998, "Quadratic residual bounds for the Hermitian
    eigenvalue problem"): with ``rho^2`` the sum of its squared residuals and ``delta`` the
    gap from its values to the other intervals, each member is within ``rho^2 / delta`` of
    an eigenvalue of its rank. A cluster is resolved when ``delta > rho``, its members'
    magnitudes stay clear of the other intervals (so that ranks in ``|lambda|`` match), it
    is not the innermost cluster of either sign (those border the spectrum the space has
    not explored, with more eigenvalues than Ritz values), its pairs are not among the last
    :data:`OVERSAMPLING` of the space, and every pair of larger magnitude is resolved too.

    Args:
        reported: ``mu``, the reported eigenvalues, by ``|lambda|`` descending, ``(>= count,)``.
        ritz: ``theta``, every Ritz value of the exactly projected space, by ``|lambda|``
            descending, ``(n,)`` with ``n >= count``.
        residuals: their residual norms, ``(n,)``.
        count: how many reported eigenvalues to bound.
        rounding: the rounding error of the computed values, added to every bound.
    """
    ritz, widths = ritz.double(), residuals.double() + 2 * rounding
    cluster = _clusters(ritz, widths)
    same = cluster[:count, None] == cluster[None, :]
    squared = torch.zeros(int(cluster.max()) + 1, dtype=torch.float64)
    rho2 = squared.index_add_(0, cluster, residuals.double() ** 2)[cluster[:count]]
    gaps = _gaps(ritz, widths, same, magnitude=False)
    clear = _gaps(ritz, widths, same, magnitude=True) > widths[:count]
    resolved = (gaps > rho2.sqrt()) & clear & ~torch.isin(cluster[:count], _frontier(ritz, cluster))
    resolved[max(0, ritz.numel() - OVERSAMPLING) :] = False
    resolved = torch.cummin(resolved.int(), dim=0).values.bool()
    quadratic = rho2 / gaps.clamp(min=torch.finfo(torch.float64).tiny)
    distance = (reported[:count].double() - ritz[:count]).abs()
    return torch.where(resolved, distance + quadratic + rounding, torch.inf)


def _frontier(ritz: torch.Tensor, cluster: torch.Tensor) -> torch.Tensor:
    """The clusters of the smallest positive and the smallest negative ``|theta|``: where the
    explored spectrum meets the unexplored one, on each side of zero (a spectrum may have no
    eigenvalue near zero, e.g. a positive bulk and a few negative outliers).
    """
    innermost = []
    for side in (ritz > 0, ritz <= 0):
        if side.any():
            magnitudes = ritz.abs().masked_fill(~side, torch.inf)
            innermost.append(cluster[magnitudes.argmin()])
    return torch.stack(innermost)


def _clusters(ritz: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """Each Ritz value's cluster id ``(n,)``: runs of values, in increasing order, whose
    intervals ``theta +- width`` overlap.
    """
    order = ritz.argsort()
    low, high = ritz[order] - widths[order], ritz[order] + widths[order]
    reach = torch.cummax(high, dim=0).values
    starts = torch.cat([torch.ones(1, dtype=torch.bool), low[1:] > reach[:-1]])
    ids = torch.empty_like(order)
    ids[order] = torch.cumsum(starts.long(), dim=0) - 1
    return ids


def _gaps(ritz, widths, same: torch.Tensor, magnitude: bool) -> torch.Tensor:
    """``min_j (|t_j - t_i| - w_j)`` over the values ``t = theta`` (or ``|theta|``) outside
    the cluster of each of the first ``count = same.shape[0]`` values, clamped at 0, and 0
    where no value is outside: ``(count,)``.
    """
    values = ritz.abs() if magnitude else ritz
    count = same.shape[0]
    distances = (values[:count, None] - values[None, :]).abs() - widths[None, :]
    gaps = distances.masked_fill(same, torch.inf).min(dim=1).values
    # A cluster holding every Ritz value is clear of nothing known: unresolved.
    return gaps.nan_to_num(posinf=0.0).clamp(min=0.0)


@dataclass
class EigenvalueBounds:
    """Error bounds on reported eigenvalues, with where they come from.

    Attributes:
        error_bounds: ``(r,)``, absolute, float64, ``inf`` where a pair is not resolved
            (:func:`error_bounds`).
        residual_norms: ``(r,)``, float64: the residuals the bounds use.
        source: which products gave the residuals, in words.
        theorem: the bound, in words.
    """

    error_bounds: torch.Tensor
    residual_norms: torch.Tensor
    source: str
    theorem: str = BOUND_THEOREM

    def summary(self) -> dict:
        """The summary's fields: ``eigenvalue_error_bounds`` (``None`` where unresolved),
        ``residual_norms``, ``error_bounds_resolved``, ``error_bound_theorem`` and
        ``error_bounds_from``.
        """
        finite = self.error_bounds.isfinite()
        return {
            "eigenvalue_error_bounds": [
                float(b) if ok else None for b, ok in zip(self.error_bounds, finite, strict=True)
            ],
            "residual_norms": self.residual_norms.tolist(),
            "error_bounds_resolved": int(finite.sum()),
            "error_bound_theorem": self.theorem,
            "error_bounds_from": self.source,
        }


@dataclass
class KrylovResult:
    """What :func:`block_krylov` returns.

    Attributes:
        eigenvalues: ``(r,)``, by ``|lambda|`` descending.
        eigenvectors: ``(D, r)``, orthonormal.
        error_bounds: ``(r,)``, absolute, float64 (:func:`error_bounds`).
        residual_norms: ``(r,)``, float64: those of the exactly projected space's Ritz pairs
            of the same rank, which the bounds use.
        hvps: products taken: ``q k``, fewer once the space is all of ``R^D``.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    error_bounds: torch.Tensor
    residual_norms: torch.Tensor
    hvps: int


def krylov_blocks(apply_h: MatMat, start: torch.Tensor, rounds: int) -> tuple:
    """``q = rounds`` rounds of products from the start block ``Omega`` ``(D, k)``: the
    exactly projected basis ``V`` ``(D, n)``, its products ``H V`` ``(D, n)`` and the last
    block ``(D, r)``. ``rounds >= 2``.
    """
    if rounds < 2:  # noqa: PLR2004 (round 1 only builds Q_0)
        raise ValueError(f"rounds: block Krylov needs at least 2, got {rounds}")
    blocks = [orthonormal_basis(apply_h(start))]
    products = []
    for _ in range(rounds - 1):
        if blocks[-1].shape[1] == 0:  # the space is all of R^D: nothing left to multiply
            break
        products.append(apply_h(blocks[-1]))
        blocks.append(next_block(_joined(blocks), products[-1]))
    return _joined(blocks[:-1]), _joined(products), blocks[-1]


def _joined(blocks: list[torch.Tensor]) -> torch.Tensor:
    """The blocks side by side; one block as it is, since a copy can change the last bits
    of the products taken with it (BLAS kernels depend on alignment), and two rounds must
    give :func:`~hessov.skerch_ext.solve.block_krylov_extension`'s bits.
    """
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)


def block_krylov(
    apply_h: MatMat, start: torch.Tensor, rounds: int, num_eigenpairs: int | None = None
) -> KrylovResult:
    """Top-``|lambda|`` eigenpairs of a symmetric ``H`` by ``q = rounds`` rounds of ``k``
    products each, from the start block ``start`` ``(D, k)``, with an error bound on each.

    Returns:
        :class:`KrylovResult` with ``r = num_eigenpairs or k`` pairs.
    """
    basis, products, extension = krylov_blocks(apply_h, start, rounds)
    count = min(num_eigenpairs or start.shape[1], basis.shape[1])
    full_basis, core = extended_core(basis, products, extension)
    values, coefficients = ritz_coefficients(core, count)
    precision = (products.dtype, basis.shape[0])
    bounds, residuals = core_bounds(core, basis.shape[1], values, precision, start.shape[1])
    hvps = start.shape[1] + products.shape[1]
    return KrylovResult(values, full_basis @ coefficients, bounds, residuals, hvps)
