"""Reductions over the rows of a tall ``D x K`` frame, read in blocks of rows.

Why: the analysis stage measures parameter masks against the Hessian eigenvectors ``W``
(``D x K``), and at ``D = 10^7``, ``K = 1,000`` one ``W`` is 80 GB in float64, more than a
node should hold. Every metric of :mod:`hessov.analysis.subspaces` on ``W`` is a sum or a
selection over its rows, so each function here reads ``rows[a:b]`` for consecutive blocks
of at most ``row_block`` rows (of an HDF5 dataset, an array or a tensor: any
:class:`RowSource`), turns the block into float64 and folds it into an accumulator of ``K``
or ``K x K`` entries. :func:`fold` feeds each block to several :class:`Reduction` at once, so
one pass over ``W`` serves them all. With the row energies ``e_r(k) = sum_(j<k) W[r, j]^2``:

- :class:`GatherRows`: given rows of ``W``, e.g. the ``<= K`` rows of a magnitude mask;
- :class:`TopPrefixEnergies`: the largest ``e_r(k)`` over all rows, merged from each
  block's largest (a row in the global top ``n`` is in its own block's top ``n``);
- :class:`PrefixEnergyMoments`: mean and centred sum of squares of ``e_r(k)``, blocks merged
  with the pairwise update of Chan, Golub and LeVeque (as accurate as two passes);
- :class:`PrefixEnergySums`: sums of ``e_r(k)`` over given sets of rows (random masks);
- :func:`cross_product`: ``A^T B`` summed over the blocks of two frames;
- :func:`residual_factors`: the triangular factor ``R`` of ``B - A C`` by TSQR (a QR of the
  running ``R`` stacked on each block's residual), whose singular values are the residual's.

Each merge is exact in exact arithmetic, so results agree across ``row_block`` to float64
rounding, and memory is ``O(row_block K + K^2)`` whatever ``D`` is
(:func:`default_row_block` sizes the block for a memory budget).

References:
    - T. F. Chan, G. H. Golub and R. J. LeVeque, "Algorithms for computing the sample
      variance: analysis and recommendations", The American Statistician 37(3), 1983.
    - J. Demmel, L. Grigori, M. Hoemmen and J. Langou, "Communication-optimal parallel and
      sequential QR and LU factorizations", SIAM J. Sci. Comput. 34(1), 2012 (TSQR).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import torch

from hessov.skerch_ext.rowblocks import gram, row_ranges

#: Float64 copies of a ``row_block x K`` block alive at once, at most, counted generously:
#: in :func:`fold`, the block as read and in float64, then in one reduction at a time its
#: squares, their cumulative sums, the energies picked from them and the merged candidates
#: (6); in :func:`residual_factors`, both frames' blocks as read and in float64, ``A C``, the
#: residual, the stacked ``[R; E]`` and the QR's work copy (8).
BLOCK_COPIES = 8
#: Memory budget of :func:`default_row_block`: the blocks' float64 copies stay below it.
DEFAULT_BUDGET_BYTES = 256 * 2**20


class RowSource(Protocol):
    """A tall ``(D, K)`` matrix read by row slices: an ``h5py.Dataset``, array or tensor.

    ``source[a:b]`` gives rows ``a..b-1`` as a ``(b - a, K)`` array or tensor.
    """

    @property
    def shape(self) -> tuple[int, ...]:
        """``(D, K)``."""
        ...

    def __getitem__(self, key: slice) -> Any:
        """Rows ``key.start .. key.stop - 1``, ``(b - a, K)``."""
        ...


def default_row_block(num_columns: int, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> int:
    """Rows per block so that ``BLOCK_COPIES`` float64 blocks of ``num_columns`` (``K``)
    columns fit in ``budget_bytes``, and never fewer than ``K`` (the ``K x K`` accumulators
    are as large anyway).
    """
    if num_columns < 1:
        raise ValueError(f"num_columns must be >= 1, got {num_columns}")
    return max(num_columns, budget_bytes // (BLOCK_COPIES * 8 * num_columns))


def device_of(rows: RowSource) -> torch.device:
    """Where blocks of ``rows`` land: a tensor's device, else the CPU."""
    return rows.device if isinstance(rows, torch.Tensor) else torch.device("cpu")


def _ranges(rows: RowSource, row_block: int | None) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of consecutive blocks of at most ``row_block`` rows (default
    :func:`default_row_block` of ``rows``'s columns).
    """
    num_rows, num_columns = rows.shape
    row_block = default_row_block(num_columns) if row_block is None else row_block
    for block in row_ranges(num_rows, row_block):
        yield block.start, block.stop


def read_block(rows: RowSource, start: int, stop: int, columns: int | None = None):
    """Rows ``start..stop-1`` and their first ``columns`` columns (default all) as a float64
    tensor ``(stop - start, columns)``, on ``rows``'s device for a tensor, else the CPU.

    May share memory with a float64 tensor ``rows``: never modify it in place.
    """
    block = torch.as_tensor(rows[start:stop])
    if columns is not None:
        block = block[:, :columns]
    return block.to(torch.float64)


class Reduction(Protocol):
    """A fold over row blocks, for :func:`fold`: ``add`` is given, in order, each float64 block
    the reduction ``wants`` (its first ``columns`` columns at least), then ``result`` is read.
    """

    columns: int

    def wants(self, start: int, stop: int) -> bool:
        """Whether rows ``start..stop-1`` matter (others need not be read)."""
        ...

    def add(self, start: int, block: torch.Tensor) -> None:
        """Fold in rows ``start..start+b-1``, ``block`` ``(b, >= columns)`` float64."""
        ...

    def result(self) -> Any:
        """The reduction of every block added."""
        ...


def fold(
    rows: RowSource, reductions: Sequence[Reduction], row_block: int | None = None
) -> list[Any]:
    """The ``result()`` of each reduction after one pass over ``rows`` ``(D, K)``: each block
    of at most ``row_block`` rows (default :func:`default_row_block`) that some reduction wants
    is read once, as float64 with the most ``columns`` any reduction asks for.
    """
    columns = max(reduction.columns for reduction in reductions)
    for start, stop in _ranges(rows, row_block):
        takers = [reduction for reduction in reductions if reduction.wants(start, stop)]
        if takers:
            block = read_block(rows, start, stop, columns)
            for reduction in takers:
                reduction.add(start, block)
    return [reduction.result() for reduction in reductions]


class GatherRows:
    """``rows[indices, :columns]`` as float64 ``(m, columns)``, in the order of ``indices``
    ``(m,)`` int64 (repeats allowed); wants only the blocks holding one of them.
    """

    def __init__(self, indices: torch.Tensor, columns: int, device: torch.device):
        self.columns = columns
        wanted = indices.to(device)
        self.order = torch.argsort(wanted)
        self.ordered = wanted[self.order]
        self.gathered = torch.empty(wanted.numel(), columns, dtype=torch.float64, device=device)

    def _bounds(self, start: int, stop: int) -> torch.Tensor:
        bounds = torch.tensor([start, stop], device=self.ordered.device)
        return torch.searchsorted(self.ordered, bounds)

    def wants(self, start: int, stop: int) -> bool:
        """Whether a wanted row lies in ``start..stop-1``."""
        low, high = self._bounds(start, stop)
        return bool(high > low)

    def add(self, start: int, block: torch.Tensor) -> None:
        """Copy the wanted rows of ``block`` into place."""
        low, high = self._bounds(start, start + block.shape[0])
        rows = self.ordered[low:high] - start
        self.gathered[self.order[low:high]] = block[rows, : self.columns]

    def result(self) -> torch.Tensor:
        """The gathered rows, ``(m, columns)``."""
        return self.gathered


class _PrefixEnergies:
    """Base of the reductions of the row energies ``e_r(k)`` at the ``n`` sizes ``sizes``."""

    def __init__(self, sizes: Sequence[int], device: torch.device):
        self.index = torch.tensor(list(sizes), dtype=torch.int64, device=device)
        self.columns = int(self.index.max())

    def wants(self, start: int, stop: int) -> bool:
        """Every block: all rows count."""
        return True

    def energies(self, block: torch.Tensor) -> torch.Tensor:
        """``e_r(k)`` of each row of ``block`` ``(b, >= columns)`` at each size: ``(b, n)``."""
        return block[:, : self.columns].square().cumsum(dim=1)[:, self.index - 1]


class TopPrefixEnergies(_PrefixEnergies):
    """The ``count`` largest ``e_r(k)`` over all rows for each ``k`` of ``sizes``:
    ``(min(count, D), n)`` float64, each column descending.

    Each block's candidates are merged with those kept so far, keeping ``count`` per column
    (a row in the global top ``count`` is in its own block's): ``O(count n)`` between blocks.
    """

    def __init__(self, sizes: Sequence[int], count: int, device: torch.device):
        super().__init__(sizes, device)
        self.count = count
        self.kept = torch.empty(0, self.index.numel(), dtype=torch.float64, device=device)

    def add(self, start: int, block: torch.Tensor) -> None:
        """Merge the block's energies with those kept."""
        candidates = torch.cat([self.kept, self.energies(block)])
        self.kept = torch.topk(candidates, min(self.count, candidates.shape[0]), dim=0).values

    def result(self) -> torch.Tensor:
        """``(min(count, D), n)``, each column descending."""
        return self.kept


class PrefixEnergyMoments(_PrefixEnergies):
    """Mean ``(n,)`` and centred sum of squares ``sum_r (e_r(k) - mean)^2`` ``(n,)`` of the
    ``D`` row energies at each ``k`` of ``sizes``, float64.

    Blocks merge by Chan et al.'s update: for counts ``n_a``, ``n_b`` and means differing by
    ``delta``, ``M = M_a + M_b + delta^2 n_a n_b / (n_a + n_b)``.
    """

    def __init__(self, sizes: Sequence[int], device: torch.device):
        super().__init__(sizes, device)
        self.count = 0
        self.mean = torch.zeros(self.index.numel(), dtype=torch.float64, device=device)
        self.squares = torch.zeros_like(self.mean)

    def add(self, start: int, block: torch.Tensor) -> None:
        """Merge the block's mean and centred squares (Chan et al.)."""
        energies = self.energies(block)
        block_count = energies.shape[0]
        block_mean = energies.mean(dim=0)
        delta = block_mean - self.mean
        total = self.count + block_count
        self.squares += (energies - block_mean).square().sum(dim=0)
        self.squares += delta.square() * (self.count * block_count / total)
        self.mean += delta * (block_count / total)
        self.count = total

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, squares)``, each ``(n,)``."""
        return self.mean, self.squares


class PrefixEnergySums(_PrefixEnergies):
    """``sum_(r in row_sets[i][j]) e_r(sizes[i])`` for each set ``j`` of each ``i``: a list of
    ``(s_i,)`` float64, for ``row_sets[i]`` ``(s_i, m_i)`` int64 (``s_i`` sets of ``m_i``
    rows). Memory ``O(sum s_i m_i)`` between blocks.
    """

    def __init__(
        self, sizes: Sequence[int], row_sets: Sequence[torch.Tensor], device: torch.device
    ):
        super().__init__(sizes, device)
        self.members = []
        for sets in row_sets:
            flat = sets.reshape(-1).to(device)
            owners = torch.arange(sets.shape[0], device=device).repeat_interleave(sets.shape[1])
            order = torch.argsort(flat)
            self.members.append((flat[order], owners[order]))
        self.sums = [
            torch.zeros(len(sets), dtype=torch.float64, device=device) for sets in row_sets
        ]

    def add(self, start: int, block: torch.Tensor) -> None:
        """Add the energies of the block's rows to the sums of their sets."""
        energies = self.energies(block)
        bounds = torch.tensor([start, start + block.shape[0]], device=energies.device)
        for column, (rows, owners) in enumerate(self.members):
            low, high = torch.searchsorted(rows, bounds)
            picked = energies[rows[low:high] - start, column]
            self.sums[column].index_add_(0, owners[low:high], picked)

    def result(self) -> list[torch.Tensor]:
        """The sums, ``(s_i,)`` for each ``i``."""
        return self.sums


def gather_rows(
    rows: RowSource,
    indices: torch.Tensor,
    columns: int | None = None,
    row_block: int | None = None,
) -> torch.Tensor:
    """:class:`GatherRows` of ``rows`` ``(D, K)``, ``columns`` (default ``K``) wide."""
    columns = rows.shape[1] if columns is None else columns
    return fold(rows, [GatherRows(indices, columns, device_of(rows))], row_block)[0]


def cross_product(
    rows_a: RowSource, rows_b: RowSource, columns: int | None = None, row_block: int | None = None
) -> torch.Tensor:
    """``A[:, :c]^T B[:, :c]`` float64 for ``A`` ``(D, Ka)``, ``B`` ``(D, Kb)`` and ``c`` =
    ``columns`` (default all of each), summed over row blocks of both: ``(c, c)``.
    """
    if rows_a.shape[0] != rows_b.shape[0]:
        raise ValueError(f"A has {rows_a.shape[0]} rows, B has {rows_b.shape[0]}")
    device = device_of(rows_a)
    return gram(
        lambda block: read_block(rows_a, block.start, block.stop, columns),
        lambda block: read_block(rows_b, block.start, block.stop, columns).to(device),
        [range(start, stop) for start, stop in _ranges(rows_a, row_block)],
    )


def residual_factors(
    rows_a: RowSource,
    rows_b: RowSource,
    cross: torch.Tensor,
    sizes: Sequence[int],
    row_block: int | None = None,
) -> list[torch.Tensor]:
    """For each ``m`` of ``sizes``, an upper triangular ``R_m`` ``(min(D, m), m)`` with
    ``R_m^T R_m = E_m^T E_m`` for the residual ``E_m = B[:, :m] - A[:, :m] C[:m, :m]``
    ``(D, m)``, by TSQR over row blocks: one pass for every size.

    ``cross`` ``C``: ``(Ka, Kb)`` float64, :func:`cross_product` of ``A`` ``(D, Ka)`` and ``B``
    ``(D, Kb)``; every ``m <= min(Ka, Kb)``. ``R_m`` and ``E_m`` have the same singular
    values, and Householder QR of each stacked ``[R_m; E_m block]`` keeps them as accurate as
    an SVD of ``E_m`` itself. Returns ``[]`` without reading anything for no sizes.
    """
    device = cross.device
    factors = [torch.empty(0, m, dtype=torch.float64, device=device) for m in sizes]
    if not factors:
        return factors
    largest = max(sizes)
    for start, stop in _ranges(rows_a, row_block):
        block_a = read_block(rows_a, start, stop, largest).to(device)
        block_b = read_block(rows_b, start, stop, largest).to(device)
        for position, m in enumerate(sizes):
            residual = block_b[:, :m] - block_a[:, :m] @ cross[:m, :m]
            stacked = torch.cat([factors[position], residual])
            factors[position] = torch.linalg.qr(stacked, mode="r").R
    return factors
