"""Sketch measurements of a Hessian-like operator, one block of inner indices at a time.

Single-pass SEIGH (Fernandez et al., "Connecting Parameter Magnitudes and Hessian
Eigenspaces at Scale using Sketched Methods"; Tropp et al. 2017, "Practical sketching
algorithms for low-rank matrix approximation", section 4) needs the outer sketch
``Y = H Omega[:, :k]`` (D x k) and the inner sketch ``Z = Psi H Omega`` (s x s). Both come
from the same ``s`` Hessian-vector products (HVPs): for inner index ``m``,
``b_m = H Omega[:, m]`` gives inner column ``Z[:, m] = Psi b_m`` and, for ``m < k``, outer
column ``Y[:, m] = b_m`` ("recycled outer"), so the sketch costs exactly ``s`` HVPs.

The operator is any callable ``matmat(M) -> H M`` taking and returning ``(D, b)`` tensors
(:data:`hessov.skerch_ext.operator.MatMat`): a dense symmetric matrix's ``__matmul__``, or
:meth:`hessov.skerch_ext.operator.AutogradHessian.matmat` (batched over the columns, so memory grows
with ``b``: ``block_size`` bounds it). A block's
results are returned, not stored, so a caller can write them wherever it likes (RAM, one
HDF5 file per index, ...) and merge them with :func:`assemble_sketch`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from hessov.skerch_ext.operator import MatMat
from hessov.skerch_ext.random_matrices import SketchMatrices


@dataclass(frozen=True)
class MeasurementBlock:
    """The measurements of one block of inner indices.

    Attributes:
        indices: The inner indices ``m`` of this block, shape ``(n,)``, int64.
        inner: ``Psi H Omega[:, indices]``, shape ``(s, n)``; None without inner measurements.
        outer_indices: The indices of this block that are below ``k``, shape ``(n_o,)``.
        outer: ``H Omega[:, outer_indices]``, shape ``(D, n_o)``.
        seconds: Wall seconds of the block's ``"hvps"`` (the batched product alone) and
            ``"test_matrices"`` (drawing Omega's columns and applying Psi).
    """

    indices: torch.Tensor
    inner: torch.Tensor | None
    outer_indices: torch.Tensor
    outer: torch.Tensor
    seconds: dict[str, float] = field(default_factory=dict, compare=False)


def checked_matmat(matmat: MatMat, x: torch.Tensor) -> torch.Tensor:
    """``matmat(x)`` for ``x`` of shape ``(D, b)``, checked to return shape ``(D, b)``."""
    result = matmat(x)
    if result.shape != x.shape:
        raise ValueError(f"matmat mapped shape {tuple(x.shape)} to {tuple(result.shape)}")
    return result


def measure_block(
    matmat: MatMat,
    sketch: SketchMatrices,
    indices: Sequence[int],
    num_outer: int,
    with_inner: bool = True,
) -> MeasurementBlock:
    """One batched HVP ``H Omega[:, indices]`` and the inner and outer columns it yields.

    Args:
        matmat: The operator ``H`` (D x D).
        sketch: Omega and Psi, in the dtype and on the device of the operator.
        indices: Inner indices in ``[0, s)``; the block costs ``len(indices)`` HVPs.
        num_outer: ``k``; indices below it also give outer columns.
        with_inner: Whether to apply Psi (a sketch without inner measurements, the first
            round of two-pass recovery, skips it: with i.i.d. test matrices Psi costs
            ``s x D`` random numbers per block, far more than the HVPs at large D).
    """
    index_tensor = torch.as_tensor(list(indices), dtype=torch.int64)
    start = time.perf_counter()
    omega = synchronized(sketch.omega_columns(index_tensor))
    drawn = time.perf_counter()
    hvps = synchronized(checked_matmat(matmat, omega))
    multiplied = time.perf_counter()
    inner = synchronized(sketch.psi_apply(hvps)) if with_inner else None
    is_outer = index_tensor < num_outer
    return MeasurementBlock(
        indices=index_tensor,
        inner=inner,
        outer_indices=index_tensor[is_outer],
        outer=hvps[:, is_outer.to(hvps.device)],
        seconds={
            "hvps": multiplied - drawn,
            "test_matrices": (drawn - start) + (time.perf_counter() - multiplied),
        },
    )


def synchronized(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` once the device has finished computing it (CUDA runs asynchronously), so
    that wall-clock timings around it are the computation's.
    """
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)
    return tensor


def measure_indices(
    matmat: MatMat, sketch: SketchMatrices, indices: Sequence[int], num_outer: int, block_size: int
) -> Iterator[MeasurementBlock]:
    """:func:`measure_block` over consecutive blocks of at most ``block_size`` indices.

    ``indices`` is typically one worker's share (in the pipeline, one array task's range,
    :meth:`hessov.sketchspec.SketchSpec.task_indices`).
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    index_list = list(indices)
    for start in range(0, len(index_list), block_size):
        yield measure_block(matmat, sketch, index_list[start : start + block_size], num_outer)


def assemble_sketch(
    blocks: Iterable[MeasurementBlock], dim: int, num_outer: int, num_inner: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge measurement blocks into the outer sketch ``Y`` (D, k) and inner sketch ``Z`` (s, s).

    Raises ``ValueError`` unless every inner index in ``[0, s)`` is measured exactly once,
    since a missing column would silently stay zero.
    """
    outer = inner = None
    measured = torch.zeros(num_inner, dtype=torch.int64)
    for block in blocks:
        if inner is None:
            inner = block.inner.new_empty(num_inner, num_inner)
            outer = block.inner.new_empty(dim, num_outer)
        inner[:, block.indices.to(inner.device)] = block.inner
        outer[:, block.outer_indices.to(outer.device)] = block.outer
        measured.index_add_(0, block.indices, torch.ones_like(block.indices))
    if inner is None or not bool((measured == 1).all()):
        missing = (measured == 0).nonzero().flatten().tolist()
        repeated = (measured > 1).nonzero().flatten().tolist()
        raise ValueError(f"inner indices missing: {missing[:10]}, repeated: {repeated[:10]}")
    return outer, inner


def matmat_in_blocks(matmat: MatMat, x: torch.Tensor, block_size: int) -> torch.Tensor:
    """``H x`` for ``x`` of shape ``(D, b)``, as batched HVPs of at most ``block_size`` columns.

    The second pass of two-pass recovery, ``H Q``, is one such call (``k`` HVPs).
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    return torch.cat(
        [
            checked_matmat(matmat, x[:, start : start + block_size])
            for start in range(0, x.shape[1], block_size)
        ],
        dim=1,
    )
