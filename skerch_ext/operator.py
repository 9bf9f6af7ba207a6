"""The loss Hessian as a matrix-free operator, and checks that it is safe to sketch.

The Hessian of the mean loss over a fixed data subset is exposed through curvlinops'
``HessianLinearOperator`` (Dangel et al., "Convolutions and More as Einsum" /
curvlinops 3.0.1): ``H @ M`` for an ``(D, b)`` matrix ``M`` runs one forward-over-reverse
pass per data batch, vmapped over the ``b`` columns, so the cost of a block of columns
is shared and its memory grows with ``b``.

Sketching assumes ``H`` is a fixed symmetric matrix: the same product every time it is
applied (a random augmentation or dropout in train mode would break that, and with it
every a-posteriori bound) and finite. :func:`operator_checks` measures exactly that:
curvlinops' determinism probe, a symmetry probe ``v^T H w`` vs ``w^T H v``, a NaN/inf
probe, and the time of one Hessian-vector product.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from curvlinops import HessianLinearOperator
from torch import nn
from tqdm import tqdm

MatMat = Callable[[torch.Tensor], torch.Tensor]


def data_batches(
    inputs: torch.Tensor, targets: torch.Tensor, batch_size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Split ``inputs`` ``(N, ...)`` and ``targets`` ``(N, ...)`` into physical batches of at
    most ``batch_size`` examples (0 = one batch), in order."""
    size = batch_size if 0 < batch_size < inputs.shape[0] else inputs.shape[0]
    return list(zip(inputs.split(size), targets.split(size), strict=True))


def hessian_operator(
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    batch_size: int = 0,
    check_deterministic: bool = True,
) -> HessianLinearOperator:
    """The Hessian ``(D, D)`` of the mean of ``loss_fn`` over ``inputs`` w.r.t. all of
    ``model``'s parameters, in ``model.parameters()`` order.

    The model is put in eval mode (dropout off, batch-norm statistics frozen): the
    Hessian of a fixed function. ``batch_size`` bounds the examples per forward pass
    (memory); the result does not depend on it beyond rounding.

    Raises:
        RuntimeError: from curvlinops when ``check_deterministic`` finds two passes over
            the data that differ.
    """
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    return HessianLinearOperator(
        model,
        loss_fn,
        params,
        data_batches(inputs, targets, batch_size),
        check_deterministic=check_deterministic,
        num_data=inputs.shape[0],
    )


def as_matmat(operator: HessianLinearOperator) -> MatMat:
    """``M (D, b) -> H @ M (D, b)`` as a plain function on tensors."""

    def matmat(matrix: torch.Tensor) -> torch.Tensor:
        return operator @ matrix

    return matmat


@dataclass
class OperatorReport:
    """Result of :func:`operator_checks`.

    Attributes:
        dim: D.
        symmetry_rel_diff: ``|v^T H w - w^T H v| / max(|v^T H w|, tiny)``.
        finite: whether ``H @ [v, w]`` held no NaN/inf.
        seconds_per_hvp: wall time of one Hessian-vector product.
        deterministic: curvlinops' probe passed (the operator was built with it).
    """

    dim: int
    symmetry_rel_diff: float
    finite: bool
    seconds_per_hvp: float
    deterministic: bool = True

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def operator_checks(
    matmat: MatMat, dim: int, *, dtype: torch.dtype, device, seed: int = 0
) -> OperatorReport:
    """Probe symmetry and finiteness with two Gaussian vectors, and time one HVP."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    probes = torch.randn(dim, 2, generator=generator, dtype=torch.float64).to(device, dtype)
    products = matmat(probes)
    finite = bool(torch.isfinite(products).all())
    v, w = probes[:, 0], probes[:, 1]
    vhw, whv = float(v @ products[:, 1]), float(w @ products[:, 0])
    rel_diff = abs(vhw - whv) / max(abs(vhw), torch.finfo(dtype).tiny)
    start = time.perf_counter()
    matmat(probes[:, :1])
    if probes.is_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return OperatorReport(dim, rel_diff, finite, seconds)


def dense_matrix(
    matmat: MatMat, dim: int, *, block_size: int, dtype: torch.dtype, device, progress: bool = True
) -> torch.Tensor:
    """The operator as a dense ``(D, D)`` matrix, ``H @ I`` a block of columns at a time
    (identity blocks are made on the fly; only the result is ever D x D), symmetrised."""
    result = torch.empty(dim, dim, dtype=dtype, device=device)
    starts = range(0, dim, block_size)
    for start in tqdm(starts, desc="H @ I", unit="block", disable=not progress, mininterval=1.0):
        stop = min(dim, start + block_size)
        identity = torch.zeros(dim, stop - start, dtype=dtype, device=device)
        identity[torch.arange(start, stop), torch.arange(stop - start)] = 1
        result[:, start:stop] = matmat(identity)
    return (result + result.T) / 2
