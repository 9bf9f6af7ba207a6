"""Overlap and subspace metrics between parameter-magnitude masks and Hessian eigenspaces.

Why: the analysis stage asks whether the largest-magnitude parameters of a network point into
its top Hessian eigenspace (the "overlap" of Fernandez et al.), how that compares with chance
and with the best any sparse mask could do, and how the eigenspace moves during training
("crystallization", tracked with Grassmannian similarities). ``D`` is the number of parameters
(up to ``10^7``) and ``k`` the number of eigenvectors (up to thousands), so nothing here forms
a ``D x D`` matrix: every metric works on ``D x k`` frames, ``k x k`` cross products, or per-row
energies, with ``k x k`` decompositions only.

A ``D x K`` eigenvector frame ``W`` is 80 GB in float64 at ``D = 10^7``, ``K = 1,000``, so the
mask metrics and :func:`leading_grassmannian_similarities` take ``W`` as a tensor or as any
:class:`~hessov.analysis.rowblocks.RowSource` (an ``h5py`` dataset, say) and read it
``row_block`` rows at a time through :mod:`hessov.analysis.rowblocks`: memory
``O(row_block K + K^2)`` plus ``D``-vectors (parameters, masks). A tensor in memory goes
through the same code, so each formula lives in one function.

References:
    - A. Fernandez et al., "Connecting Parameter Magnitudes and Hessian Eigenspaces at Scale using
      Sketched Methods" (the overlap, its baselines and the Grassmannian similarities).
    - A. Edelman, T. A. Arias and S. T. Smith, "The geometry of algorithms with orthogonality
      constraints", SIAM J. Matrix Anal. Appl. 20(2), 1998 (section 4.3: distances on the
      Grassmannian in terms of principal angles).
    - K. Ye and L.-H. Lim, "Schubert varieties and distances between subspaces of different
      dimensions", SIAM J. Matrix Anal. Appl. 37(3), 2016 (the same distances for subspaces of
      different dimensions use the ``min(k1, k2)`` principal angles).
    - A. Bjorck and G. H. Golub, "Numerical methods for computing angles between linear
      subspaces", Math. Comp. 27, 1973, and A. V. Knyazev and M. E. Argentati, SIAM J. Sci.
      Comput. 23(6), 2002 (small angles from sines, large ones from cosines).

Overlap with a magnitude mask (Fernandez et al. 2025): ``W`` (``D x K``) holds eigenvectors sorted
by ``|lambda|`` descending. The magnitude mask of size ``k`` is the set ``M_k`` of the ``k`` largest
``|theta_i|``; its overlap with the top-``k`` eigenspace is::

    overlap(k) = ||W[M_k, :k]||_F^2 / k = sum_(i in M_k) e_i(k) / k,   e_i(k) = sum_(j<k) W_ij^2.

Chance level: a uniformly random mask has ``E[overlap(k)] = sum_i e_i(k) / D = k / D`` for
orthonormal ``W``. The best ``k``-sparse mask takes the ``k`` largest row energies ``e_i(k)``,
an upper bound for any mask of ``k`` coordinates, the magnitude mask included. A mask of ``k``
coordinates spans a coordinate subspace, and the overlap is then ``subspace_overlap`` of that
subspace and ``span W[:, :k]``; between two masks it reduces to ``|A & B| / k``.

Principal angles and the Grassmannian: for orthonormal frames ``O1`` (``D x k1``) and ``O2``
(``D x k2``) with ``m = min(k1, k2)``, the principal angles
``0 <= theta_1 <= ... <= theta_m <= pi/2`` have ``cos theta`` = singular values of ``O1^T O2`` and
``sin theta`` = singular values of ``(I - O1 O1^T) O2`` (for ``k2 <= k1``). Then, with their maxima
(used to turn each distance ``d`` into a similarity ``1 - d / max``)::

    overlap        ||O1^T O2||_F^2 / m = mean cos^2 theta    (a similarity in [0, 1])
    geodesic       ||theta||_2                                max pi/2 sqrt(m)
    chordal_2      max 2 sin(theta/2)                         max sqrt(2)
    chordal_f      ||2 sin(theta/2)||_2                       max sqrt(2 m)
    projection_2   max sin theta                              max 1
    projection_f   ||sin theta||_2                            max sqrt(m)
    fubini_study   arccos(prod cos theta)                     max pi/2

Numerics: ``arccos`` of a singular value near 1 loses half the digits (``theta ~ sqrt(eps)``
for identical subspaces), so angles below ``pi/4`` come from their sines and the others from
their cosines; ``fubini_study`` is evaluated as ``atan2(sqrt(1 - P^2), P)`` with ``log P`` summed
from ``log1p(-2 sin^2(theta/2))``, accurate at both ends.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from hessov.analysis.rowblocks import (
    GatherRows,
    PrefixEnergyMoments,
    PrefixEnergySums,
    Reduction,
    RowSource,
    TopPrefixEnergies,
    cross_product,
    device_of,
    fold,
    gather_rows,
    residual_factors,
)

DISTANCE_NAMES = (
    "geodesic",
    "chordal_2",
    "chordal_f",
    "projection_2",
    "projection_f",
    "fubini_study",
)


# --------------------------------------------------------------------------- input checks


def _check_vector(params: torch.Tensor) -> None:
    if params.ndim != 1:
        raise ValueError(f"expected a flat parameter vector (D,), got shape {tuple(params.shape)}")


def _check_frame(frame: torch.Tensor | RowSource, name: str) -> None:
    if len(frame.shape) != 2 or frame.shape[1] < 1:  # noqa: PLR2004 (a matrix)
        raise ValueError(f"{name} must be a (D, k) matrix with k >= 1, got {tuple(frame.shape)}")


def _check_mask(mask_indices: torch.Tensor, name: str = "mask") -> None:
    if mask_indices.ndim != 1 or mask_indices.numel() < 1:
        raise ValueError(f"{name} must be a non-empty index vector (k,)")
    if torch.unique(mask_indices).numel() != mask_indices.numel():
        raise ValueError(f"{name} has repeated indices")


def _checked_sizes(ks: Sequence[int] | torch.Tensor, num_eigenvectors: int, dimension: int):
    sizes = [int(k) for k in ks]
    if not sizes:
        raise ValueError("ks is empty")
    limit = min(num_eigenvectors, dimension)
    bad = [k for k in sizes if not 1 <= k <= limit]
    if bad:
        raise ValueError(f"every k must lie in [1, {limit}] (min of K and D), got {bad}")
    return sizes


# --------------------------------------------------------------------------- masks


def magnitude_mask(params: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest ``|theta_i|``, shape ``(k,)`` int64, on ``params.device``.

    ``params``: ``(D,)``. Returned by decreasing magnitude; equal magnitudes are ranked by
    increasing index, so the mask is deterministic (``torch.topk`` breaks ties arbitrarily).
    The cost is ``O(D)`` plus a sort of the candidates: the ``k`` largest and any entries tied
    with the ``k``-th.
    """
    _check_vector(params)
    if not 1 <= k <= params.numel():
        raise ValueError(f"k must lie in [1, D={params.numel()}], got {k}")
    magnitudes = params.detach().abs()
    if torch.isnan(magnitudes).any():
        raise ValueError("params contain NaN: the magnitude ranking is undefined")
    threshold = torch.topk(magnitudes, k, sorted=False).values.min()
    # nonzero lists candidates by increasing index; the stable sort keeps that order for ties.
    candidates = torch.nonzero(magnitudes >= threshold).squeeze(1)
    ranking = torch.sort(magnitudes[candidates], descending=True, stable=True).indices
    return candidates[ranking[:k]]


def boolean_mask(mask_indices: torch.Tensor, dimension: int) -> torch.Tensor:
    """The mask as a ``(D,)`` boolean vector (``True`` at ``mask_indices``, shape ``(k,)``)."""
    mask = torch.zeros(dimension, dtype=torch.bool, device=mask_indices.device)
    mask[mask_indices] = True
    return mask


def mask_similarity(mask_a: torch.Tensor, mask_b: torch.Tensor) -> float:
    """Overlap of two coordinate masks, ``|A & B| / min(|A|, |B|)``.

    ``mask_a`` ``(ka,)``, ``mask_b`` ``(kb,)``: distinct indices. This is ``subspace_overlap`` of
    the two coordinate subspaces (one-hot ``D x ka`` and ``D x kb`` frames) without forming
    them: ``O_A^T O_B`` is the 0/1 matrix of shared indices. For ``|A| = |B|`` it is
    ``|A & B| / k``, and the IoU is ``o / (2 - o)`` (see ``mask_iou``).
    """
    _check_mask(mask_a, "mask_a")
    _check_mask(mask_b, "mask_b")
    shared = torch.isin(mask_a, mask_b.to(mask_a.device)).sum().item()
    return shared / min(mask_a.numel(), mask_b.numel())


def mask_iou(mask_a: torch.Tensor, mask_b: torch.Tensor) -> float:
    """Intersection over union ``|A & B| / |A | B|`` of two index masks ``(ka,)``, ``(kb,)``."""
    _check_mask(mask_a, "mask_a")
    _check_mask(mask_b, "mask_b")
    shared = torch.isin(mask_a, mask_b.to(mask_a.device)).sum().item()
    return shared / (mask_a.numel() + mask_b.numel() - shared)


def mask_grassmannian_similarities(mask_a: torch.Tensor, mask_b: torch.Tensor) -> dict[str, float]:
    """``grassmannian_similarities`` of the coordinate subspaces of two masks, without forming
    their one-hot ``D x m`` frames.

    ``mask_a`` ``(ma,)``, ``mask_b`` ``(mb,)``: distinct indices. ``O_A^T O_B`` is the 0/1 matrix
    of shared indices, so of the ``m = min(ma, mb)`` principal angles ``c = |A & B|`` are 0 and
    the other ``m - c`` are ``pi/2``; ``"overlap"`` equals ``mask_similarity``.
    """
    _check_mask(mask_a, "mask_a")
    _check_mask(mask_b, "mask_b")
    shared = torch.isin(mask_a, mask_b.to(mask_a.device)).sum().item()
    return _coordinate_similarities(shared, min(mask_a.numel(), mask_b.numel()))


def _coordinate_similarities(shared: int, m: int) -> dict[str, float]:
    """Similarities of two coordinate subspaces with ``m`` principal angles, ``shared`` of them 0
    and the rest ``pi/2``.
    """
    theta = torch.full((m,), math.pi / 2, dtype=torch.float64)
    theta[:shared] = 0.0
    return _similarities_from_angles(theta)


def random_mask_similarities(
    dimension: int, m: int, num_samples: int, seed: int
) -> dict[str, float]:
    """Mean of each similarity of ``mask_grassmannian_similarities`` between two independent,
    uniformly random ``m``-coordinate masks of ``D`` coordinates, over ``num_samples`` draws
    from ``numpy.random.default_rng(seed)``: the chance level of mask crystallization.

    The number of shared coordinates is hypergeometric (``m`` draws from ``D`` with ``m``
    marked), so each draw costs ``O(m)`` whatever ``D`` is; ``E[overlap] = m / D``.
    """
    if not 1 <= m <= dimension:
        raise ValueError(f"m must lie in [1, D={dimension}], got {m}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    shared_counts = np.random.default_rng(seed).hypergeometric(m, dimension - m, m, num_samples)
    totals = dict.fromkeys(("overlap", *DISTANCE_NAMES), 0.0)
    for shared in shared_counts:
        for name, value in _coordinate_similarities(int(shared), m).items():
            totals[name] += value
    return {name: total / num_samples for name, total in totals.items()}


# --------------------------------------------------------------------------- mask overlaps


def random_baseline(k, dimension: int):
    """Expected overlap of a uniformly random ``k``-mask with ``k`` orthonormal eigenvectors,
    ``k / D``; ``k`` an int (gives a float) or a tensor of sizes (gives a tensor of that shape).
    """
    return k / dimension


def mask_overlap(
    eigenvectors: torch.Tensor | RowSource,
    mask_indices: torch.Tensor,
    k: int | None = None,
    row_block: int | None = None,
) -> float:
    """``||W[mask, :k]||_F^2 / min(m, k)`` as a float.

    ``eigenvectors`` ``W``: ``(D, K)``, sorted by ``|lambda|`` descending, a tensor or any
    :class:`~hessov.analysis.rowblocks.RowSource` read ``row_block`` rows at a time;
    ``mask_indices``: ``(m,)`` distinct rows; ``k`` (default ``m``, as in the paper): how many
    leading eigenvectors span the eigenspace. Normalising by ``min(m, k)`` makes it
    ``subspace_overlap`` of the coordinate subspace of the mask and ``span W[:, :k]``: 1 iff
    one contains the other.
    """
    _check_frame(eigenvectors, "eigenvectors")
    _check_mask(mask_indices)
    k = mask_indices.numel() if k is None else k
    if not 1 <= k <= eigenvectors.shape[1]:
        raise ValueError(f"k must lie in [1, K={eigenvectors.shape[1]}], got {k}")
    rows = gather_rows(eigenvectors, mask_indices, k, row_block)
    return rows.square().sum().item() / min(mask_indices.numel(), k)


def random_masks(dimension: int, k: int, num_masks: int, seed: int) -> torch.Tensor:
    """``num_masks`` uniformly random ``k``-coordinate masks of ``D`` coordinates, ``(num_masks,
    k)`` int64: the first ``k`` entries of successive ``torch.randperm(D)`` of a CPU generator
    seeded with ``seed``, so they depend on nothing else. Costs ``O(num_masks D)`` time and
    one permutation ``(D,)`` of memory at a time.
    """
    generator = torch.Generator().manual_seed(seed)
    masks = torch.empty(num_masks, k, dtype=torch.int64)
    for mask in masks:
        # A slice would keep its whole (D,) permutation alive: copy the k entries out.
        mask.copy_(torch.randperm(dimension, generator=generator)[:k])
    return masks


#: A reduction over the rows of ``W`` and the function that turns its result into a metric.
_Plan = tuple[Reduction, Callable[[Any], Any]]


def _measured(eigenvectors: torch.Tensor | RowSource, plans: dict[str, _Plan], row_block):
    """``{name: metric}`` for the ``plans``, all from one pass over the rows of ``W``."""
    results = fold(eigenvectors, [reduction for reduction, _ in plans.values()], row_block)
    return {
        name: finish(result)
        for (name, (_, finish)), result in zip(plans.items(), results, strict=True)
    }


def _overlap_plan(eigenvectors, params: torch.Tensor, ks) -> _Plan:
    """Plan of :func:`overlap_curve`: gather the rows of the ``k_max`` largest parameters."""
    _check_frame(eigenvectors, "eigenvectors")
    _check_vector(params)
    if params.numel() != eigenvectors.shape[0]:
        raise ValueError(f"params has {params.numel()} entries, W has {eigenvectors.shape[0]} rows")
    sizes = _checked_sizes(ks, eigenvectors.shape[1], eigenvectors.shape[0])
    largest = max(sizes)
    ranked_rows = magnitude_mask(params, largest)

    def finish(rows: torch.Tensor) -> torch.Tensor:
        block_sums = rows.square().cumsum(dim=0).cumsum(dim=1).diagonal()
        index = torch.tensor(sizes, device=block_sums.device)
        return block_sums[index - 1] / index

    return GatherRows(ranked_rows, largest, device_of(eigenvectors)), finish


def _best_plan(eigenvectors, ks) -> _Plan:
    """Plan of :func:`best_mask_overlap_curve`: the ``k_max`` largest ``e_i(k)`` per ``k``."""
    _check_frame(eigenvectors, "eigenvectors")
    sizes = _checked_sizes(ks, eigenvectors.shape[1], eigenvectors.shape[0])
    distinct = sorted(set(sizes))

    def finish(top: torch.Tensor) -> torch.Tensor:
        best = {k: top[:k, column].sum() / k for column, k in enumerate(distinct)}
        return torch.stack([best[k] for k in sizes])

    return TopPrefixEnergies(distinct, max(distinct), device_of(eigenvectors)), finish


def _moments_plan(eigenvectors, ks) -> _Plan:
    """Plan of :func:`random_mask_overlap_curve`: the moments of ``e_i(k)`` per ``k``."""
    _check_frame(eigenvectors, "eigenvectors")
    dimension = eigenvectors.shape[0]
    sizes = _checked_sizes(ks, eigenvectors.shape[1], dimension)
    distinct = sorted(set(sizes))

    def finish(moments: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        by_size = {}
        for k, mean, centred in zip(distinct, *moments, strict=True):
            # D = 1 forces k = 1 = D: a single possible mask, no spread.
            correction = (dimension - k) / (dimension - 1) if dimension > 1 else 0.0
            by_size[k] = (mean, torch.sqrt(k * (centred / dimension) * correction) / k)
        means, stds = zip(*(by_size[k] for k in sizes), strict=True)
        return torch.stack(means), torch.stack(stds)

    return PrefixEnergyMoments(distinct, device_of(eigenvectors)), finish


def _empirical_plan(eigenvectors, ks, num_masks: int, seeds: Sequence[int]) -> _Plan:
    """Plan of :func:`random_mask_overlaps`: the sums of ``e_i(k)`` over each random mask."""
    _check_frame(eigenvectors, "eigenvectors")
    if num_masks < 2:  # noqa: PLR2004 (a standard deviation needs two)
        raise ValueError(f"num_masks must be >= 2 for a standard deviation, got {num_masks}")
    dimension = eigenvectors.shape[0]
    sizes = _checked_sizes(ks, eigenvectors.shape[1], dimension)
    if len(seeds) != len(sizes):
        raise ValueError(f"{len(sizes)} sizes but {len(seeds)} seeds")
    masks = [
        random_masks(dimension, k, num_masks, seed) for k, seed in zip(sizes, seeds, strict=True)
    ]

    def finish(sums: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        overlaps = [total / k for total, k in zip(sums, sizes, strict=True)]
        return torch.stack([o.mean() for o in overlaps]), torch.stack([o.std() for o in overlaps])

    return PrefixEnergySums(sizes, masks, device_of(eigenvectors)), finish


def overlap_curve(
    eigenvectors: torch.Tensor | RowSource,
    params: torch.Tensor,
    ks: Sequence[int] | torch.Tensor,
    row_block: int | None = None,
) -> torch.Tensor:
    """``overlap(k)`` of the magnitude mask for every ``k`` of ``ks``, shape ``(len(ks),)``
    float64 on ``W``'s device.

    ``eigenvectors`` ``W``: ``(D, K)`` sorted by ``|lambda|`` descending, a tensor or a row
    source; ``params``: ``(D,)``. Masks are nested (``M_k`` is the top ``k`` of the magnitude
    ranking), so only the rows of the top ``k_max`` parameters matter: with
    ``A = W[M_kmax, :kmax]^2`` (``kmax x kmax``, rows in ranking order),
    ``overlap(k) = sum_(i<k, j<k) A_ij / k`` is the leading ``k x k`` block sum, read off one
    2-d cumulative sum: ``O(D + kmax^2)`` for the whole curve, ``kmax`` rows gathered.
    """
    plan = _overlap_plan(eigenvectors, params, ks)
    return _measured(eigenvectors, {"overlap": plan}, row_block)["overlap"]


def best_mask_overlap_curve(
    eigenvectors: torch.Tensor | RowSource,
    ks: Sequence[int] | torch.Tensor,
    row_block: int | None = None,
) -> torch.Tensor:
    """``best_mask_overlap(W, k)`` for every ``k`` of ``ks``, shape ``(len(ks),)`` float64.

    ``eigenvectors`` ``W``: ``(D, K)``, a tensor or a row source. One pass over ``W`` keeps,
    for each ``k``, the ``k_max`` largest row energies ``e_i(k)`` (a row in the top ``k`` of all
    rows is in the top ``k`` of its own block): ``O(D K log k_max)``.
    """
    plan = _best_plan(eigenvectors, ks)
    return _measured(eigenvectors, {"best": plan}, row_block)["best"]


def best_mask_overlap(
    eigenvectors: torch.Tensor | RowSource, k: int, row_block: int | None = None
) -> float:
    """Largest overlap any ``k``-coordinate mask can reach with ``span W[:, :k]``, a float:
    the ``k`` largest row energies ``e_i(k) = sum_(j<k) W_ij^2`` summed, over ``k``.

    ``eigenvectors`` ``W``: ``(D, K)`` with ``K >= k``, a tensor or a row source.
    """
    return best_mask_overlap_curve(eigenvectors, [k], row_block)[0].item()


def random_mask_overlap_curve(
    eigenvectors: torch.Tensor | RowSource,
    ks: Sequence[int] | torch.Tensor,
    row_block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact mean and standard deviation of the overlap of a uniformly random ``k``-mask, for
    every ``k`` of ``ks``: two tensors of shape ``(len(ks),)`` float64.

    ``eigenvectors`` ``W``: ``(D, K)``, a tensor or a row source. A random mask samples ``k``
    of the ``D`` row energies ``e_i(k)`` without replacement, so with their population mean
    ``mu`` and variance ``sigma^2``::

        mean = k mu / k = sum_i e_i(k) / D           (= k / D for orthonormal W)
        std  = sqrt(k sigma^2 (D - k) / (D - 1)) / k  (finite-population correction)
    """
    plan = _moments_plan(eigenvectors, ks)
    return _measured(eigenvectors, {"random": plan}, row_block)["random"]


def random_mask_overlaps(
    eigenvectors: torch.Tensor | RowSource,
    ks: Sequence[int],
    num_masks: int,
    seeds: Sequence[int],
    row_block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and sample standard deviation, each ``(len(ks),)`` float64, of the overlap of
    ``num_masks`` :func:`random_masks` of each size ``ks[i]`` (drawn with ``seeds[i]``) with
    ``span W[:, :ks[i]]``.

    ``eigenvectors`` ``W``: ``(D, K)``, a tensor or a row source, read once for all sizes.
    ``random_mask_overlap_curve`` gives the exact moments instead.
    """
    plan = _empirical_plan(eigenvectors, ks, num_masks, seeds)
    return _measured(eigenvectors, {"empirical": plan}, row_block)["empirical"]


def random_mask_overlap(
    eigenvectors: torch.Tensor | RowSource,
    k: int,
    num_masks: int,
    seed: int,
    row_block: int | None = None,
) -> tuple[float, float]:
    """Mean and sample standard deviation of the overlap of ``num_masks`` uniformly random
    ``k``-coordinate masks with ``span W[:, :k]``: :func:`random_mask_overlaps` at one size.

    ``eigenvectors`` ``W``: ``(D, K)``, a tensor or a row source. The masks come from a CPU
    generator seeded with ``seed`` (:func:`random_masks`), so they do not depend on ``W``.
    """
    mean, std = random_mask_overlaps(eigenvectors, [k], num_masks, [seed], row_block)
    return mean.item(), std.item()


def mask_overlap_curves(
    eigenvectors: torch.Tensor | RowSource,
    params: torch.Tensor,
    ks: Sequence[int],
    empirical_ks: Sequence[int],
    num_masks: int,
    seeds: Sequence[int],
    row_block: int | None = None,
) -> dict[str, Any]:
    """Every mask curve of one ``W`` from a single pass over its rows:
    ``{"overlap": overlap_curve(W, params, ks), "best_mask_overlap":
    best_mask_overlap_curve(W, ks), "random_mask": random_mask_overlap_curve(W, ks),
    "empirical": random_mask_overlaps(W, empirical_ks, num_masks, seeds)}``.

    ``eigenvectors`` ``W``: ``(D, K)``, a tensor or a row source read ``row_block`` rows at a
    time; ``params``: ``(D,)``. The values are those of the four functions.
    """
    plans = {
        "overlap": _overlap_plan(eigenvectors, params, ks),
        "best_mask_overlap": _best_plan(eigenvectors, ks),
        "random_mask": _moments_plan(eigenvectors, ks),
        "empirical": _empirical_plan(eigenvectors, empirical_ks, num_masks, seeds),
    }
    return _measured(eigenvectors, plans, row_block)


# --------------------------------------------------------------------------- subspaces


def _common_frames(frame_a: torch.Tensor, frame_b: torch.Tensor, orthonormalize: bool):
    _check_frame(frame_a, "O1")
    _check_frame(frame_b, "O2")
    if frame_a.shape[0] != frame_b.shape[0]:
        raise ValueError(f"O1 has {frame_a.shape[0]} rows, O2 has {frame_b.shape[0]}")
    dtype = torch.promote_types(frame_a.dtype, frame_b.dtype)
    if not dtype.is_floating_point:
        dtype = torch.float64
    frame_a = frame_a.to(dtype)
    frame_b = frame_b.to(dtype=dtype, device=frame_a.device)
    if orthonormalize:
        frame_a = torch.linalg.qr(frame_a).Q
        frame_b = torch.linalg.qr(frame_b).Q
    return frame_a, frame_b


def principal_angles(
    O1: torch.Tensor, O2: torch.Tensor, orthonormalize: bool = False
) -> torch.Tensor:
    """Principal angles between ``span O1`` and ``span O2``, ascending, in ``[0, pi/2]``.

    ``O1``: ``(D, k1)``, ``O2``: ``(D, k2)``, orthonormal columns (else pass
    ``orthonormalize=True`` for a reduced QR of each). Returns ``(min(k1, k2),)`` in the
    promoted dtype on ``O1``'s device. ``cos theta = svd(O1^T O2)`` (clamped to ``[0, 1]``) gives
    the angles above ``pi/4``; ``sin theta = svd((I - O_big O_big^T) O_small)``, with
    ``O_small`` the frame of fewer columns, gives the ones below, to full relative accuracy.
    Cost ``O(D k1 k2)`` plus a ``D x min(k1, k2)`` SVD.
    """
    O1, O2 = _common_frames(O1, O2, orthonormalize)
    larger, smaller = (O1, O2) if O1.shape[1] >= O2.shape[1] else (O2, O1)
    cross = larger.T @ smaller
    return _angles(_cosines(cross), _sines(smaller - larger @ cross))


def _cosines(cross: torch.Tensor) -> torch.Tensor:
    """``cos theta``, descending ``(m,)``: the singular values of ``O_big^T O_small``."""
    return torch.linalg.svdvals(cross).clamp(0.0, 1.0)


def _sines(residual: torch.Tensor) -> torch.Tensor:
    """``sin theta`` paired with the descending cosines ``(m,)``: the singular values of the
    residual ``(I - O_big O_big^T) O_small`` ``(D, m)``, or of any ``R`` with the same
    ``R^T R``, ascending.
    """
    # svdvals sorts descending, so flipping the sines pairs them with the descending cosines.
    return torch.linalg.svdvals(residual).flip(0).clamp(0.0, 1.0)


def _angles(cosines: torch.Tensor, sines: torch.Tensor | None) -> torch.Tensor:
    """Principal angles ``(m,)`` ascending from ``_cosines`` and ``_sines``: ``arcsin`` below
    ``pi/4`` and ``arccos`` above. ``sines`` may be None when no cosine exceeds
    ``sqrt(1/2)``, as only the ``arccos`` branch is then taken.
    """
    small = cosines > math.sqrt(0.5)
    if sines is None:
        if small.any():
            raise ValueError("angles below pi/4 need their sines")
        return torch.arccos(cosines)
    return torch.where(small, torch.arcsin(sines), torch.arccos(cosines))


def leading_principal_angles(
    frame_a: torch.Tensor | RowSource,
    frame_b: torch.Tensor | RowSource,
    sizes: Sequence[int],
    row_block: int | None = None,
) -> dict[int, torch.Tensor]:
    """``principal_angles(A[:, :m], B[:, :m])`` ``(m,)`` float64 for each ``m`` of ``sizes``,
    from row blocks of ``A`` ``(D, Ka)`` and ``B`` ``(D, Kb)`` (tensors or row sources with
    orthonormal columns): ``{m: angles}``.

    One pass accumulates ``C = A^T B`` (every ``m`` reads its cosines off ``C[:m, :m]``); a
    second pass, only for the sizes with an angle below ``pi/4``, factors the residuals
    ``B[:, :m] - A[:, :m] C[:m, :m]`` by TSQR for their sines. Memory
    ``O(row_block max m + sum m^2)``.
    """
    _check_frame(frame_a, "A")
    _check_frame(frame_b, "B")
    if frame_a.shape[0] != frame_b.shape[0]:
        raise ValueError(f"A has {frame_a.shape[0]} rows, B has {frame_b.shape[0]}")
    sizes = _checked_sizes(sizes, min(frame_a.shape[1], frame_b.shape[1]), frame_a.shape[0])
    cross = cross_product(frame_a, frame_b, max(sizes), row_block)
    cosines = {m: _cosines(cross[:m, :m]) for m in sizes}
    close = [m for m in dict.fromkeys(sizes) if (cosines[m] > math.sqrt(0.5)).any()]
    factors = residual_factors(frame_a, frame_b, cross, close, row_block)
    sines = dict(zip(close, map(_sines, factors), strict=True))
    return {m: _angles(cosines[m], sines.get(m)) for m in sizes}


def subspace_overlap(O1: torch.Tensor, O2: torch.Tensor, orthonormalize: bool = False) -> float:
    """``||O1^T O2||_F^2 / min(k1, k2)`` (= mean ``cos^2`` of the principal angles), a float.

    ``O1``: ``(D, k1)``, ``O2``: ``(D, k2)``, orthonormal columns (or ``orthonormalize=True``).
    1 iff one subspace contains the other, 0 iff they are orthogonal.
    """
    O1, O2 = _common_frames(O1, O2, orthonormalize)
    return (O1.T @ O2).square().sum().item() / min(O1.shape[1], O2.shape[1])


def GRASSMANNIAN_MAXIMA(k: int) -> dict[str, float]:
    """Largest value of each distance of ``grassmannian_distances`` for ``k`` principal angles
    (all ``theta = pi/2``).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return {
        "geodesic": math.pi / 2 * math.sqrt(k),
        "chordal_2": math.sqrt(2.0),
        "chordal_f": math.sqrt(2.0 * k),
        "projection_2": 1.0,
        "projection_f": math.sqrt(k),
        "fubini_study": math.pi / 2,
    }


def _distances_from_angles(theta: torch.Tensor) -> dict[str, float]:
    """The Grassmannian distances of the module docstring from principal angles ``(m,)``."""
    # float32 rounds arccos(0) above pi/2; in float64 and clamped, orthogonal subspaces land
    # exactly on the maxima and no similarity turns negative.
    theta = theta.double().clamp(0.0, math.pi / 2)
    chords = 2.0 * torch.sin(theta / 2.0)
    sines = torch.sin(theta)
    # 1 - cos(theta) = 2 sin^2(theta/2) keeps log cos(theta) accurate for small angles; the clamp
    # absorbs rounding above 1 at theta = pi/2, where log cos = -inf is the right limit.
    log_product = torch.log1p(-(chords.square() / 2.0).clamp(max=1.0)).sum()
    fubini_study = torch.atan2(torch.sqrt(-torch.expm1(2.0 * log_product)), torch.exp(log_product))
    return {
        "geodesic": torch.linalg.vector_norm(theta).item(),
        "chordal_2": chords.max().item(),
        "chordal_f": torch.linalg.vector_norm(chords).item(),
        "projection_2": sines.max().item(),
        "projection_f": torch.linalg.vector_norm(sines).item(),
        "fubini_study": fubini_study.item(),
    }


def _similarities_from_angles(theta: torch.Tensor) -> dict[str, float]:
    maxima = GRASSMANNIAN_MAXIMA(theta.numel())
    similarities = {"overlap": torch.cos(theta.double()).square().mean().item()}
    for name, distance in _distances_from_angles(theta).items():
        similarities[name] = 1.0 - distance / maxima[name]
    return similarities


def grassmannian_distances(
    O1: torch.Tensor, O2: torch.Tensor, orthonormalize: bool = False
) -> dict[str, float]:
    """The six Grassmannian distances (names in ``DISTANCE_NAMES``) between ``span O1`` and
    ``span O2``, from their ``min(k1, k2)`` principal angles ``theta``.

    In terms of ``theta``::

        geodesic ||theta||, chordal_2 max 2 sin(theta/2), chordal_f ||2 sin(theta/2)||,
        projection_2 max sin(theta), projection_f ||sin(theta)||, fubini_study arccos prod cos

    ``O1``: ``(D, k1)``, ``O2``: ``(D, k2)``, orthonormal columns (or ``orthonormalize=True``).
    For ``k1 != k2`` these are Ye and Lim's distances from the smaller subspace to the nearest
    subspace of its dimension inside the larger one.
    """
    return _distances_from_angles(principal_angles(O1, O2, orthonormalize))


def grassmannian_similarities(
    O1: torch.Tensor, O2: torch.Tensor, orthonormalize: bool = False
) -> dict[str, float]:
    """``1 - d / max`` for each distance ``d`` of ``grassmannian_distances`` (maxima from
    ``GRASSMANNIAN_MAXIMA(min(k1, k2))``), plus ``"overlap"`` (mean ``cos^2 theta``, already a
    similarity). All lie in ``[0, 1]``: 1 for nested subspaces, 0 for orthogonal ones.

    ``O1``: ``(D, k1)``, ``O2``: ``(D, k2)``, orthonormal columns (or ``orthonormalize=True``).
    """
    return _similarities_from_angles(principal_angles(O1, O2, orthonormalize))


def leading_grassmannian_similarities(
    frame_a: torch.Tensor | RowSource,
    frame_b: torch.Tensor | RowSource,
    sizes: Sequence[int],
    row_block: int | None = None,
) -> dict[int, dict[str, float]]:
    """``grassmannian_similarities(A[:, :m], B[:, :m])`` for each ``m`` of ``sizes``, from row
    blocks (:func:`leading_principal_angles`): ``{m: {name: similarity}}``.

    ``frame_a`` ``A`` ``(D, Ka)``, ``frame_b`` ``B`` ``(D, Kb)``: tensors or row sources with
    orthonormal columns, e.g. the eigenvectors of two steps sorted by ``|lambda|``.
    """
    angles = leading_principal_angles(frame_a, frame_b, sizes, row_block)
    return {m: _similarities_from_angles(theta) for m, theta in angles.items()}


def _wishart_factor(dof: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """A matrix ``B``, ``(dim, dim)`` if ``dof >= dim`` else ``(dof, dim)``, with
    ``B^T B ~ Wishart(dof, I_dim)``.

    For ``dof >= dim``, Bartlett's decomposition: ``B`` upper triangular with
    ``B_ii = sqrt(chi^2(dof - i))`` (``i`` from 0) and standard normals above the diagonal, so
    sampling costs ``O(dim^2)`` however large ``dof`` is. Otherwise ``B`` is a ``dof x dim``
    Gaussian matrix, small in that case.
    """
    if dof < dim:
        return rng.standard_normal((dof, dim))
    factor = np.triu(rng.standard_normal((dim, dim)), k=1)
    factor[np.diag_indices(dim)] = np.sqrt(rng.chisquare(dof - np.arange(dim)))
    return factor


def random_subspace_similarities(
    dimension: int, k: int, num_samples: int, seed: int
) -> dict[str, float]:
    """Mean of each similarity of ``grassmannian_similarities`` between two independent,
    uniformly random ``k``-dimensional subspaces of ``R^D`` (Haar measure), over
    ``num_samples`` draws from ``numpy.random.default_rng(seed)``.

    Exact sampling in ``O(k^3)`` per draw, independent of ``D``: by rotation invariance the
    first subspace is ``span(e_1..e_k)``; the second is ``span G`` for a Gaussian ``D x k`` ``G``
    with top block ``T`` (``k x k``) and Gram matrix ``G^T G = T^T T + Y``,
    ``Y ~ Wishart(D - k, I_k)`` sampled directly. With ``G^T G = C C^T`` (Cholesky),
    ``T C^-T`` is ``O1^T O2`` in some orthonormal basis of ``span G``, so its singular values
    are the ``cos theta``. Angles use ``arccos`` in float64: the few exactly-zero angles that
    ``2k > D`` forces come out near ``1e-8``, negligible in a mean. For ``D >> k``,
    ``E[overlap] = k / D``.
    """
    if not 1 <= k <= dimension:
        raise ValueError(f"k must lie in [1, D={dimension}], got {k}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    rng = np.random.default_rng(seed)
    totals = dict.fromkeys(("overlap", *DISTANCE_NAMES), 0.0)
    for _ in range(num_samples):
        top = torch.from_numpy(rng.standard_normal((k, k)))
        rest = torch.from_numpy(_wishart_factor(dimension - k, k, rng))
        cholesky = torch.linalg.cholesky(top.T @ top + rest.T @ rest)
        cross = torch.linalg.solve_triangular(cholesky, top.T, upper=False).T
        cosines = torch.linalg.svdvals(cross).clamp(0.0, 1.0)
        for name, value in _similarities_from_angles(torch.arccos(cosines)).items():
            totals[name] += value
    return {name: total / num_samples for name, total in totals.items()}


# --------------------------------------------------------------------------- eigenvectors


def top_magnitude_eigenpairs(
    eigenvalues: torch.Tensor, eigenvectors: torch.Tensor, r: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``r`` eigenpairs of largest ``|lambda|``, by ``|lambda|`` descending (ties: lower
    index first): eigenvalues ``(r,)`` and eigenvectors ``(D, r)``.

    ``eigenvalues``: ``(n,)``, ``eigenvectors``: ``(D, n)``, e.g. ``torch.linalg.eigh``'s
    ascending output. A Hessian is indefinite, so the sketched top eigenvectors must be
    compared with these, not with the last columns of ``eigh``.
    """
    if not 1 <= r <= eigenvalues.numel():
        raise ValueError(f"r must lie in [1, {eigenvalues.numel()}], got {r}")
    order = torch.sort(eigenvalues.abs(), descending=True, stable=True).indices[:r]
    return eigenvalues[order], eigenvectors[:, order.to(eigenvectors.device)]


def sign_invariant_residuals(W_a: torch.Tensor, W_b: torch.Tensor) -> torch.Tensor:
    """``min(||a - b||, ||a + b||)`` for each pair of columns ``a``, ``b``: shape ``(r,)``.

    ``W_a``, ``W_b``: ``(D, r)``. An eigenvector is only defined up to sign; the smaller of the
    two residuals is the one with ``a . b >= 0``, so one ``D x r`` difference suffices.
    """
    if W_a.shape != W_b.shape or W_a.ndim != 2:  # noqa: PLR2004 (a matrix)
        raise ValueError(
            f"expected two (D, r) matrices, got {tuple(W_a.shape)}, {tuple(W_b.shape)}"
        )
    dtype = torch.promote_types(W_a.dtype, W_b.dtype)
    W_a, W_b = W_a.to(dtype), W_b.to(device=W_a.device, dtype=dtype)
    signs = torch.where(torch.linalg.vecdot(W_a, W_b, dim=0) >= 0, 1.0, -1.0).to(W_b.dtype)
    return torch.linalg.vector_norm(W_a - W_b * signs, dim=0)
