"""Top Hessian eigenpairs on the live model, recomputed during a spectral-filter replay.

A replay (``hessov replay``, README.md "Spectral-filter replays") filters the gradient in
the Hessian's top eigenbasis, and the training moves that basis: every ``eig_freq`` steps
the top ``max(neigs, nfilter + 1)`` eigenpairs of the Hessian of the mean loss over the
run's train Hessian subset are computed again, at the current parameters. ``nfilter + 1``
makes ``lambda_{N+1}``, the largest unfiltered eigenvalue, visible: at the edge of
stability (Cohen et al. 2021, "Gradient Descent on Neural Networks Typically Occurs at the
Edge of Stability") it is the curvature that decides whether the accelerated directions
stay stable.

Two solvers, both on the Hessian-vector products of the sketch stages
(:class:`hessov.skerch_ext.operator.AutogradHessian`; with ``curvature=ggn`` the
generalised Gauss-Newton matrix's, :class:`hessov.skerch_ext.ggn.AutogradGGN`): Lanczos
(:mod:`hessov.skerch_ext.lanczos`), warm-started from the previous eigenvectors, or the
in-core two-pass sketch (:mod:`hessov.skerch_ext.incore`), which also estimates its
relative error a posteriori.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hessov import batching
from hessov.config import ReplayConfig, RunConfig
from hessov.hessian import curvature_operator
from hessov.skerch_ext.incore import sketched_eigh
from hessov.skerch_ext.lanczos import top_eigenpairs
from hessov.skerch_ext.operator import AutogradHessian

#: Columns per batched HVP of the in-core sketch when the run's ``block_size`` is automatic.
SKETCH_BLOCK_SIZE = 32


def num_eigenpairs(replay: ReplayConfig, dim: int) -> int:
    """Eigenpairs computed per recomputation.

    Args:
        replay: the replay's settings (``eig_freq``, ``neigs``, ``nfilter``).
        dim: the number of parameters ``D``.

    Returns:
        ``max(neigs, nfilter + 1)`` (0 if the eigenpairs are never recomputed), at most
        ``D - 1`` (Lanczos cannot return all ``D``).
    """
    if replay.eig_freq <= 0:
        return 0
    wanted = max(replay.neigs, replay.nfilter + 1 if replay.nfilter else 0)
    return min(wanted, dim - 1)


@dataclass
class Eigenpairs:
    """Top eigenpairs at one replay step.

    Attributes:
        values: ``(k,)`` float64 on the CPU, largest magnitude first.
        vectors: ``(D, k)`` orthonormal columns, in the model's dtype and on its device.
        hvps: Hessian-vector products the computation took.
        relative_error: the sketch's a-posteriori relative error estimate (None: Lanczos).
    """

    values: torch.Tensor
    vectors: torch.Tensor
    hvps: int
    relative_error: float | None


def hessian_eigenpairs(  # noqa: PLR0913 (the operator's four, then keyword-only settings)
    model: torch.nn.Module,
    loss_fn,
    inputs: batching.Inputs,
    targets: torch.Tensor,
    *,
    cfg: RunConfig,
    replay: ReplayConfig,
    k: int,
    step: int,
    previous: torch.Tensor | None,
) -> Eigenpairs:
    """Top-``k`` eigenpairs of the Hessian of the mean loss over ``inputs`` at the model's
    current parameters, in eval mode as the sketch stages (the model is put back in train
    mode).

    Args:
        model: the live model; its parameters define the Hessian's ``D`` dimensions.
        loss_fn: the problem's loss.
        inputs: the train Hessian subset, ``n`` examples (:mod:`hessov.batching`).
        targets: ``(n, ...)`` its targets.
        cfg: the run's settings (HVP batch size, seeds, sketch noise and block size).
        replay: the replay's settings (``eigensolver``, ``eig_tol``).
        k: eigenpairs wanted, ``< D``.
        step: the global step, added to the solver's seed.
        previous: ``(D, k)`` the last eigenvectors; Lanczos starts from their sum.

    Returns:
        The eigenpairs, largest magnitude first.
    """
    # Built anew at every recomputation: it keeps the gradient graph of the current
    # parameters, which the optimizer then changes in place.
    curvature = "ggn" if cfg.curvature == "ggn" else "hessian"  # both: the run's own, H
    operator = curvature_operator(
        curvature, model, loss_fn, (inputs, targets), cfg.HESSIAN_BATCH_SIZE
    )
    try:
        if replay.eigensolver == "lanczos":
            return _lanczos(operator, cfg, replay, k, step, previous)
        return _sketch(operator, cfg, k, step)
    finally:
        model.train()


def _lanczos(
    operator: AutogradHessian,
    cfg: RunConfig,
    replay: ReplayConfig,
    k: int,
    step: int,
    previous: torch.Tensor | None,
) -> Eigenpairs:
    """Lanczos to ``eig_tol``, from the sum of the ``previous`` eigenvectors ``(D, k)``."""
    start = None if previous is None else previous.sum(dim=1)
    result = top_eigenpairs(
        operator.matmat,
        operator.dim,
        k,
        dtype=operator.dtype,
        device=operator.device,
        tol=replay.eig_tol,
        start=start,
        seed=cfg.RANDOM_SEED + step,
    )
    return Eigenpairs(result.eigenvalues, result.eigenvectors, result.hvps, None)


def _sketch(operator: AutogradHessian, cfg: RunConfig, k: int, step: int) -> Eigenpairs:
    """The in-core two-pass sketch with the run's sketch settings."""
    dim = operator.dim
    # Oversampled basis (the top k of 2k + 10 are accurate), at most D/2 so that the
    # block Krylov space span(Q, HQ) of the two-pass recovery fits in D dimensions.
    outer = max(k, min(2 * k + 10, dim // 2))
    sketch = sketched_eigh(
        operator.matmat,
        dim,
        outer,
        seed=cfg.SKETCH_SEED + step,
        noise=cfg.noise,
        recovery="two_pass",
        block_size=cfg.block_size or SKETCH_BLOCK_SIZE,
        dtype=operator.dtype,
        device=operator.device,
        num_apost=cfg.NUM_A_POSTERIORI,
        num_eigenpairs=k,
    )
    values = sketch.eigenvalues.detach().to("cpu", torch.float64)
    return Eigenpairs(values, sketch.eigenvectors, sketch.num_hvps, sketch.relative_error)
