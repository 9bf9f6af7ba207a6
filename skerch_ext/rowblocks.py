"""Out-of-core linear algebra on tall ``(D, k)`` matrices held in row blocks.

At the paper's ImageNet scale one ``D x k`` float32 matrix is 70 GB (D = 11,689,512,
k = 1,500): the outer sketch, its basis ``Q``, ``H Q`` and the eigenvectors do not fit in
one node's memory, and the paper's solve ran on 400 GB nodes. Every operation of the solve
on such a matrix is either a product whose ``k x k`` result is a sum over row blocks
(``Q^T (H Q)``, ``P^T Q``) or a map applied to each row block on its own (``W_i = Q_i U``),
except the QR factorisation, which TSQR splits the same way (Demmel, Grigori, Hoemmen and
Langou 2012, "Communication-optimal parallel and sequential QR and LU factorizations",
SIAM J. Sci. Comput. 34(1)): a thin QR of each row block ``A_i = Q_i R_i``, then a QR of
the stacked ``R_i`` combined in a tree of fan-in ``fan_in``, whose orthogonal factor gives
each block a ``(k, k)`` matrix ``F_i`` with ``Q = [Q_1 F_1; Q_2 F_2; ...]``. Householder QR
of every piece keeps TSQR as backward stable as a QR of the whole.

This module holds the pieces: the row ranges, sums over row blocks (:func:`gram`) and the
TSQR tree (:func:`tree_factors`); :mod:`hessov.rowsolve` builds the solve's phases from
them, which :mod:`hessov.rowpass` runs a row block per task. Memory is
``O(row_block x k + num_blocks x k^2)``, independent of ``D`` for a given number of blocks.
Every block has at least ``k`` rows (:func:`row_ranges` folds a short remainder into the
block before it), so every local ``R_i`` is ``(k, k)``.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping, Sequence

import numpy as np
import torch
from tqdm import tqdm

#: ``rows -> A[rows]``: a ``(len(rows), c)`` block of a tall matrix.
RowReader = Callable[[range], torch.Tensor]

#: R factors stacked per node of the TSQR tree: 8 keeps each node's QR at ``8k x k``.
DEFAULT_FAN_IN = 8


def row_ranges(num_rows: int, row_block: int, min_rows: int = 1) -> list[range]:
    """Consecutive row ranges of at most ``row_block`` rows (at least ``min_rows``, the
    remainder folded into the last full block so every range has ``min_rows`` or more).
    """
    if row_block < min_rows:
        raise ValueError(f"row_block={row_block} must be at least {min_rows}")
    starts = list(range(0, num_rows, row_block))
    if len(starts) > 1 and num_rows - starts[-1] < min_rows:
        starts.pop()
    stops = [*starts[1:], num_rows]
    return [range(a, b) for a, b in zip(starts, stops, strict=True)]


def row_pass(ranges: Sequence[range], label: str):
    """Iterate ``ranges`` with a progress bar when the pass has more than one block."""
    return tqdm(ranges, desc=label, unit="block", disable=len(ranges) <= 1, leave=False)


def gram(left: RowReader, right: RowReader, ranges: Sequence[range]) -> torch.Tensor:
    """``A^T B`` summed over row blocks: ``(D, a), (D, b) -> (a, b)``."""
    total = None
    for rows in row_pass(ranges, "row blocks: A^T B"):
        part = left(rows).T @ right(rows)
        if total is None:
            total = part
        else:
            total += part  # in place: no small allocation left between the blocks' large ones
    return total


def tree_factors(
    r_factor: Callable[[int], torch.Tensor],
    count: int,
    scratch: MutableMapping,
    write_factor: Callable[[int, torch.Tensor], None],
    fan_in: int = DEFAULT_FAN_IN,
) -> torch.Tensor:
    """The TSQR tree over ``count`` row blocks' local ``R_i`` ``(k, k)``, read one group at a
    time through ``r_factor(i)``: writes each block's factor ``F_i`` ``(k, k)`` through
    ``write_factor(i, F_i)`` and returns the final ``R`` ``(k, k)``, so that
    ``A = [Q_1 F_1; Q_2 F_2; ...] R`` when ``A_i = Q_i R_i``.

    Level by level, each group of ``fan_in`` factors is stacked and factored,
    ``[R_a; ...; R_b] = [P_a; ...; P_b] R_g``, the pieces ``P_i`` and the ``R_g`` kept in
    ``scratch`` (a mapping of arrays: an HDF5 group, or a dict); then, from the root down,
    each node's factor is its piece times its parent's (kept in ``scratch`` too). Memory is
    ``O(fan_in k^2)`` whatever the number of blocks.
    """
    read = r_factor
    counts = [count]
    while counts[-1] > 1:  # up: the pieces of level ``level`` and the R of level + 1
        level = len(counts) - 1
        groups = range(0, counts[-1], fan_in)
        for group, start in enumerate(groups):
            stacked = [read(i) for i in range(start, min(start + fan_in, counts[-1]))]
            q, r = torch.linalg.qr(torch.cat(stacked), mode="reduced")
            for offset, piece in enumerate(q.split(r.shape[1])):
                scratch[f"piece_{level}_{start + offset}"] = piece.numpy()
            scratch[f"r_{level + 1}_{group}"] = r.numpy()
        counts.append(len(groups))
        read = _scratch_reader(scratch, f"r_{level + 1}_")
    top = read(0)
    root = len(counts) - 1
    scratch[f"factor_{root}_0"] = torch.eye(top.shape[1], dtype=top.dtype).numpy()
    for level in range(root - 1, -1, -1):  # down: each node's piece times its parent's
        parent = _scratch_reader(scratch, f"factor_{level + 1}_")
        for i in range(counts[level]):
            factor = _scratch_reader(scratch, f"piece_{level}_")(i) @ parent(i // fan_in)
            if level:
                scratch[f"factor_{level}_{i}"] = factor.numpy()
            else:
                write_factor(i, factor)
    if not root:
        write_factor(0, _scratch_reader(scratch, "factor_0_")(0))
    return top


def _scratch_reader(scratch: MutableMapping, prefix: str) -> Callable[[int], torch.Tensor]:
    return lambda i: torch.from_numpy(np.asarray(scratch[f"{prefix}{i}"][()]))
