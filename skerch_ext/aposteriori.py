"""A-posteriori error of a low-rank eigendecomposition, its reliability, and scree bounds.

After the solve, ``H ~= W diag(L) W^T`` is checked with fresh Gaussian probes ``g_i``
(Tropp et al. 2019, "Streaming low-rank matrix approximation with an application to
scientific simulation", section 6; used by SEIGH, Fernandez et al., "Connecting Parameter
Magnitudes and Hessian Eigenspaces at Scale using Sketched Methods"):

* ``err^2 ~= mean_i ||(H - W diag(L) W^T) g_i||^2`` and ``||H||_F^2 ~= mean_i ||H g_i||^2``
  (both unbiased, since ``E ||A g||^2 = ||A||_F^2`` for standard Gaussian ``g``); the
  relative error is ``err / ||H||_F``. Each probe costs one HVP.
* The estimate of a squared norm ``x`` from ``n`` probes misses by a factor ``1 -+ eps`` with
  probability at most ``(e^eps (1 - eps))^(n/2)`` (low side) and ``((1 + eps) e^-eps)^(n/2)``
  (high side); with ``n = 30``, ``eps = 0.5``: 0.055 and 0.242.
* Scree bounds on the fraction of ``||H||_F^2`` that a rank-``r`` truncation leaves out:
  with ``res_r = sqrt(sum_{j >= r} L_j^2)``, ``lo_r = (res_r / ||H||_F)^2`` and
  ``hi_r = ((res_r + err) / ||H||_F)^2``.

The probes need their own seed range (``"apost"`` of
:func:`hessov.skerch_ext.seeds.sketch_seed_ranges`): probes correlated with Omega or Psi would make
the estimate optimistic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from hessov.skerch_ext.measure import matmat_in_blocks
from hessov.skerch_ext.operator import MatMat
from hessov.skerch_ext.rowblocks import RowReader, gram
from hessov.skerch_ext.seeds import SeedRange

DEFAULT_NUM_PROBES = 30


@dataclass(frozen=True)
class ApostEstimate:
    """A-posteriori estimates from ``num_probes`` Gaussian probes.

    Attributes:
        error_sq: Estimated ``||H - W diag(L) W^T||_F^2``.
        frobenius_sq: Estimated ``||H||_F^2``.
        num_probes: ``n``.
    """

    error_sq: float
    frobenius_sq: float
    num_probes: int

    @property
    def error(self) -> float:
        """Estimated Frobenius error ``err``."""
        return math.sqrt(self.error_sq)

    @property
    def frobenius(self) -> float:
        """Estimated ``||H||_F``."""
        return math.sqrt(self.frobenius_sq)

    @property
    def relative_error(self) -> float:
        """``err / ||H||_F``."""
        return self.error / self.frobenius


#: Rows per independently seeded piece of a probe: any row block of the probes can be drawn
#: alone, so the solve reads a-posteriori products and probes in the same row blocks.
PROBE_CHUNK_ROWS = 1 << 16


def gaussian_probe_rows(
    seed_range: SeedRange, rows: range, probes: range | None = None
) -> torch.Tensor:
    """Rows ``rows`` of standard Gaussian probes ``probes`` (all of the range by default):
    shape ``(len(rows), len(probes))``, float64 on the CPU.

    Probe ``i`` is drawn in pieces of :data:`PROBE_CHUNK_ROWS` rows, piece ``c`` from numpy's
    PCG64 seeded with ``(seed_range.seed(i), c)``: the same numbers whatever the row blocks,
    the number of probes or the device.
    """
    probes = range(seed_range.size) if probes is None else probes
    first, last = rows.start // PROBE_CHUNK_ROWS, -(-rows.stop // PROBE_CHUNK_ROWS)
    offset = rows.start - first * PROBE_CHUNK_ROWS
    columns = []
    for i in probes:
        pieces = [
            np.random.default_rng([seed_range.seed(i), c]).standard_normal(PROBE_CHUNK_ROWS)
            for c in range(first, last)
        ]
        columns.append(np.concatenate(pieces)[offset : offset + len(rows)])
    return torch.from_numpy(np.stack(columns, axis=1))


def gaussian_probes(
    dim: int, seed_range: SeedRange, *, dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """Every probe of ``seed_range`` in full: shape ``(D, n)``, ``n = size``, cast to ``dtype``
    on ``device`` (see :func:`gaussian_probe_rows`).
    """
    return gaussian_probe_rows(seed_range, range(dim)).to(device=device, dtype=dtype)


def low_rank_apply(
    eigenvalues: torch.Tensor, eigenvectors: torch.Tensor, x: torch.Tensor
) -> torch.Tensor:
    """``W diag(L) W^T x``: ``(r,), (D, r), (D, b) -> (D, b)``, never forming a D x D matrix."""
    return eigenvectors @ (eigenvalues[:, None] * (eigenvectors.T @ x))


def apost_error(
    matmat: MatMat,
    eigenvalues: torch.Tensor,
    eigenvectors: torch.Tensor,
    probes: torch.Tensor,
    block_size: int,
) -> ApostEstimate:
    """Estimate ``||H - W diag(L) W^T||_F^2`` and ``||H||_F^2`` with the given probes.

    Args:
        matmat: The operator ``H``.
        eigenvalues: ``L``, ``(r,)``.
        eigenvectors: ``W``, ``(D, r)``.
        probes: Standard Gaussian ``(D, n)``, independent of the sketch (see
            :func:`gaussian_probes`); costs ``n`` HVPs in blocks of ``block_size``.
        block_size: Columns per batched HVP (bounds the operator's memory).
    """
    h_probes = matmat_in_blocks(matmat, probes, block_size)
    whole = [range(probes.shape[0])]
    return apost_error_rows(
        eigenvalues,
        lambda rows: eigenvectors[rows.start : rows.stop],
        lambda rows: probes[rows.start : rows.stop],
        lambda rows: h_probes[rows.start : rows.stop],
        whole,
    )


def apost_error_rows(
    eigenvalues: torch.Tensor,
    eigenvectors: RowReader,
    probes: RowReader,
    h_probes: RowReader,
    ranges: list[range],
) -> ApostEstimate:
    """:func:`apost_error` from row blocks of ``W`` ``(D, r)``, the probes ``G`` ``(D, n)`` and
    their products ``H G`` ``(D, n)``, measured beforehand: two passes over the rows, one for
    ``M = diag(L) W^T G`` ``(r, n)`` and one for the residuals ``H G - W M``.
    """
    dtype = eigenvalues.dtype
    coefficients = eigenvalues[:, None] * gram(
        lambda rows: eigenvectors(rows).to(dtype), lambda rows: probes(rows).to(dtype), ranges
    )
    error_sq = frobenius_sq = 0.0
    for rows in ranges:
        products = h_probes(rows).to(dtype)
        residuals = products - eigenvectors(rows).to(dtype) @ coefficients
        error_sq += residuals.pow(2).sum().item()
        frobenius_sq += products.pow(2).sum().item()
    num_probes = coefficients.shape[1]
    return ApostEstimate(error_sq / num_probes, frobenius_sq / num_probes, num_probes)


def apost_failure_probabilities(num_probes: int, rel_deviation: float) -> tuple[float, float]:
    """Bounds on the probability that an ``n``-probe estimate of a squared norm ``x`` misses.

    Args:
        num_probes: ``n``.
        rel_deviation: ``eps`` in ``(0, 1)``.

    Returns:
        ``(P(est <= (1 - eps) x), P(est >= (1 + eps) x))`` bounded by ``(e^eps (1 - eps))^(n/2)``
        and ``((1 + eps) e^-eps)^(n/2)``.
    """
    if num_probes < 1 or not 0 < rel_deviation < 1:
        raise ValueError("need num_probes >= 1 and 0 < rel_deviation < 1")
    eps = rel_deviation
    low = (math.exp(eps) * (1 - eps)) ** (num_probes / 2)
    high = ((1 + eps) * math.exp(-eps)) ** (num_probes / 2)
    return low, high


def scree_bounds(
    eigenvalues: torch.Tensor, error: float, frobenius: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower and upper scree bounds, both of shape ``(r,)``.

    Entry ``j`` bounds the fraction of ``||H||_F^2`` outside the top-``j`` eigenpairs:
    ``lo_j = (res_j / ||H||_F)^2`` and ``hi_j = ((res_j + err) / ||H||_F)^2`` with
    ``res_j = sqrt(sum_{i >= j} L_i^2)``.

    Args:
        eigenvalues: ``L`` sorted by ``|lambda|`` descending, ``(r,)``.
        error: A-posteriori ``err`` (not squared).
        frobenius: Estimated ``||H||_F`` (not squared).
    """
    squares = eigenvalues.pow(2)
    residuals = squares.flip(0).cumsum(0).flip(0).sqrt()
    return (residuals / frobenius) ** 2, ((residuals + error) / frobenius) ** 2
