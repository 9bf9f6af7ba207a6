"""Reference implementations that the tests (and the benchmarks) check hessov's against.

Not product code: nothing in ``pipeline`` or ``skerch_ext`` uses them.

- :func:`hessian_operator`: curvlinops' ``HessianLinearOperator`` (Dangel et al., curvlinops
  3.0.1): forward-over-reverse ``torch.func.jvp`` of the gradient, vmapped over the columns,
  redoing the forward and backward pass of every data batch for every block. The sketch
  stages' :class:`hessov.skerch_ext.operator.AutogradHessian` must agree with it to rounding
  (tests/test_operator.py), and bench/ times both (bench/RESULTS.md, questions 1 and 2).
- :func:`ggn_operator`: curvlinops' ``GGNLinearOperator``, likewise for
  :class:`hessov.skerch_ext.ggn.AutogradGGN`.
- :func:`as_matmat`: any ``H @ M`` operator as the ``MatMat`` function skerch_ext takes.
- :func:`dense_hessian`: a run's Hessian of one step and split as a dense float64 matrix,
  what the estimates (trace, diagonal, density) are checked against.
"""

from __future__ import annotations

import torch
from curvlinops import GGNLinearOperator, HessianLinearOperator
from torch import nn

from hessov.skerch_ext.operator import MatMat, data_batches


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


def ggn_operator(model: nn.Module, loss_fn: nn.Module, inputs, targets, *, batch_size: int = 0):
    """The GGN as curvlinops' ``GGNLinearOperator``, built as :func:`hessian_operator` builds
    the Hessian's: the reference of :class:`hessov.skerch_ext.ggn.AutogradGGN`.
    """
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    batches = data_batches(inputs, targets, batch_size)
    return GGNLinearOperator(model, loss_fn, params, batches, num_data=inputs.shape[0])


def as_matmat(operator: HessianLinearOperator) -> MatMat:
    """``M (D, b) -> H @ M (D, b)`` as a plain function on tensors."""

    def matmat(matrix: torch.Tensor) -> torch.Tensor:
        return operator @ matrix

    return matmat


def dense_hessian(run_dir, step: int, split: str) -> torch.Tensor:
    """``(D, D)`` float64: the Hessian the run's stages multiply with, ``H @ I`` by blocks."""
    from hessov.config import saved_run_config
    from hessov.hessian import hessian_at_step
    from hessov.rundir import RunDir
    from hessov.skerch_ext.operator import dense_matrix

    run = RunDir(run_dir)
    cfg = saved_run_config(run)
    cfg.dtype = "float64"
    threads = torch.get_num_threads()  # the run's config may set 1 for this process
    try:
        hessian = hessian_at_step(run, cfg, step, split, check_deterministic=False)
        return dense_matrix(
            hessian.matmat, hessian.dim, block_size=256, dtype=torch.float64, device="cpu"
        )
    finally:
        torch.set_num_threads(threads)  # for the rest of the caller (a fixture's eigh)
