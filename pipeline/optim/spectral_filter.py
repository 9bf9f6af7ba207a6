"""Spectral filters on the gradient: scale or freeze it in the Hessian's top eigenbasis.

The replay stage (README.md, "Spectral-filter replays") continues a training run from a snapshot
with the gradient ``g`` replaced by a filtered one. With ``U`` the ``D x N`` matrix of the top-``N``
Hessian eigenvectors (orthonormal columns), ``P = I - U U^T`` the projector onto their orthogonal
complement, ``eta`` the learning rate and ``alpha`` the scaling, one gradient-descent step is
``theta <- theta - eta * F(g)`` with

- ``none``:            ``F(g) = g``                          (the baseline, unchanged)
- ``global_scaling``:  ``F(g) = alpha g``                    (plain GD at ``alpha * eta``)
- ``flat_scaling_v1``: ``F(g) = alpha P g``                  (top-N directions frozen)
- ``flat_scaling_v2``: ``F(g) = U U^T g + alpha P g``        (top-N at 1x, the rest at alpha)
- ``dynamic``:         ``F(g) = alpha P_S g`` with ``S = {i : lambda_i > 2 / (alpha eta)}``:
  every direction whose eigenvalue exceeds the maximal stable sharpness (MSS) at the new
  rate is frozen and the rest is accelerated (the README's proposal). ``S`` is taken among
  the ``N`` computed eigenpairs, so ``N`` bounds how many directions can be frozen.

The why (the edge of stability of Cohen et al. 2021): to second order, GD changes the loss by
``sum_i c_i^2 (eta^2 lambda_i / 2 - eta)`` with ``g = sum_i c_i u_i``, so a direction with
``lambda_i > 2 / eta`` cannot lower the loss; it only bounces (catapults). On a quadratic
with exact ``U``, v1 is stable iff ``alpha * eta * lambda_{N+1} < 2``.

An optional warmup raises alpha linearly from 1 over ``W`` steps (:func:`warmup_scaling`);
for ``dynamic`` the frozen set then grows as ``2 / (alpha_t eta)`` falls past eigenvalues.

:class:`FilteredOptimizer` applies the filter to ``p.grad`` and then calls any torch
optimizer's ``step()``: momentum buffers and adaptive moments see the filtered gradient, and
the optimizer's state is never touched, so nothing is scaled twice (the fork scaled the
momentum buffer in place, so the scale compounded). Note that Adam-type optimizers are
invariant to a global scale of the gradient: with them ``alpha`` matters only through the
relative weight of the filtered directions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MODES = ("none", "global_scaling", "flat_scaling_v1", "flat_scaling_v2", "dynamic")
#: Modes that need the top eigenvectors ``U`` (and so ``nfilter >= 1`` and ``eig_freq >= 1``).
FILTERING_MODES = ("flat_scaling_v1", "flat_scaling_v2", "dynamic")


def project(grad: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``U U^T g``: the part of ``grad`` ``(D,)`` inside the span of ``basis`` ``(D, N)``."""
    return basis @ (basis.T @ grad)


def global_scaling(grad: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha g`` ``(D,)``: every direction accelerated alike (mode ``global_scaling``)."""
    return alpha * grad


def flat_scaling_v1(grad: torch.Tensor, basis: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha P g = alpha (g - U U^T g)`` ``(D,)``: the top-N directions ``basis`` ``(D, N)``
    frozen, the rest accelerated by ``alpha`` (mode ``flat_scaling_v1``).
    """
    return alpha * (grad - project(grad, basis))


def flat_scaling_v2(grad: torch.Tensor, basis: torch.Tensor, alpha: float) -> torch.Tensor:
    """``U U^T g + alpha P g`` ``(D,)``: the top-N directions ``basis`` ``(D, N)`` at the
    base rate, the rest accelerated by ``alpha`` (mode ``flat_scaling_v2``).
    """
    inside = project(grad, basis)
    return inside + alpha * (grad - inside)


def max_stable_sharpness(lr: float, alpha: float = 1.0) -> float:
    """``2 / (alpha eta)``: the largest curvature GD at rate ``alpha * eta`` is stable on."""
    return 2.0 / (alpha * lr)


def dynamic_frozen(eigenvalues: torch.Tensor, alpha: float, lr: float) -> torch.Tensor:
    """Boolean mask ``(N,)`` of the eigenvalues above ``2 / (alpha eta)``: the directions
    the dynamic filter freezes.
    """
    return eigenvalues > max_stable_sharpness(lr, alpha)


def dynamic_scaling(
    grad: torch.Tensor, basis: torch.Tensor, eigenvalues: torch.Tensor, alpha: float, lr: float
) -> torch.Tensor:
    """``alpha P_S g`` ``(D,)``: freeze the eigenvectors ``basis`` ``(D, N)`` whose
    ``eigenvalues`` ``(N,)`` exceed ``2 / (alpha eta)``, accelerate the rest by ``alpha``
    (the seed README's dynamic projection).
    """
    # P_S g = g - U diag(1_S) U^T g: the masked coefficients spare a copy of U's columns.
    frozen = dynamic_frozen(eigenvalues, alpha, lr).to(device=basis.device, dtype=basis.dtype)
    return alpha * (grad - basis @ (frozen * (basis.T @ grad)))


def warmup_scaling(alpha: float, step: int, warmup: int) -> float:
    """``alpha_t = 1 + (alpha - 1) min(1, (t + 1) / W)``: alpha reached after ``W`` steps
    (the same linear ramp as the learning-rate warmup); ``W = 0`` gives ``alpha``.
    """
    if warmup <= 0:
        return alpha
    return 1.0 + (alpha - 1.0) * min(1.0, (step + 1) / warmup)


@dataclass(frozen=True)
class FilterStats:
    """What one filtered step did.

    Attributes:
        grad_norm: ``||g||``.
        filtered_norm: ``||F(g)||``.
        subspace_fraction: ``||U^T g||^2 / ||g||^2``, the share of the gradient inside the top-N
            eigenspace (None before any eigenbasis is set).
        scaling: ``alpha_t`` used in this step (after warmup).
        frozen: directions frozen in this step (N for v1, ``|S|`` for dynamic, else 0).
    """

    grad_norm: float
    filtered_norm: float
    subspace_fraction: float | None
    scaling: float
    frozen: int


class SpectralFilter:
    """One of :data:`MODES` with its scaling, and the current top eigenpairs.

    Only the latest eigenbasis is held (:meth:`set_eigenbasis` replaces it): the fork kept
    every eigenvector set ever computed (52 GB for fc-tanh).

    Args:
        mode: one of :data:`MODES`.
        scaling: ``alpha > 0``.
        warmup: ``W``, steps over which alpha rises from 1 (0 = none).
    """

    def __init__(self, mode: str, scaling: float, warmup: int = 0):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
        self.mode, self.scaling, self.warmup = mode, scaling, warmup
        self.eigenvalues: torch.Tensor | None = None
        self.basis: torch.Tensor | None = None

    def set_eigenbasis(self, eigenvalues: torch.Tensor, eigenvectors: torch.Tensor) -> None:
        """Use ``eigenvectors`` ``(D, N)`` (orthonormal) with ``eigenvalues`` ``(N,)`` from now."""
        self.eigenvalues, self.basis = eigenvalues, eigenvectors

    def apply(self, grad: torch.Tensor, step: int, lr: float) -> tuple[torch.Tensor, FilterStats]:
        """``F(grad)`` ``(D,)`` at replay ``step`` with learning rate ``lr``, and its stats."""
        if self.mode in FILTERING_MODES and self.basis is None:
            raise RuntimeError(f"mode {self.mode} needs an eigenbasis before the first step")
        alpha = warmup_scaling(self.scaling, step, self.warmup)
        frozen = 0
        if self.mode == "none":
            filtered = grad
        elif self.mode == "global_scaling":
            filtered = global_scaling(grad, alpha)
        elif self.mode == "flat_scaling_v1":
            filtered, frozen = flat_scaling_v1(grad, self.basis, alpha), self.basis.shape[1]
        elif self.mode == "flat_scaling_v2":
            filtered = flat_scaling_v2(grad, self.basis, alpha)
        else:
            filtered = dynamic_scaling(grad, self.basis, self.eigenvalues, alpha, lr)
            frozen = int(dynamic_frozen(self.eigenvalues, alpha, lr).sum())
        grad_norm = float(torch.linalg.vector_norm(grad))
        fraction = None
        if self.basis is not None and grad_norm > 0:
            fraction = float(torch.linalg.vector_norm(self.basis.T @ grad) ** 2) / grad_norm**2
        stats = FilterStats(
            grad_norm, float(torch.linalg.vector_norm(filtered)), fraction, alpha, frozen
        )
        return filtered, stats


class FilteredOptimizer:
    """Filter the gradient in the Hessian's eigenbasis, then step any torch optimizer.

    :meth:`step` flattens ``p.grad`` of ``params`` into ``g`` ``(D,)`` (in the order of the
    eigenvectors' rows: the trainable parameters in ``model.parameters()`` order, as the
    Hessian operator), writes ``F(g)`` back into ``p.grad`` and calls ``optimizer.step()``.
    The optimizer's state is left alone.

    Args:
        optimizer: any torch optimizer (or wrapper, e.g. Lookahead) over ``params``.
        params: the parameters, in the eigenvectors' order.
        spectral_filter: the filter and its current eigenbasis.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        params: list[torch.Tensor],
        spectral_filter: SpectralFilter,
    ):
        self.optimizer, self.params, self.filter = optimizer, list(params), spectral_filter

    @property
    def param_groups(self) -> list[dict]:
        """The wrapped optimizer's parameter groups (schedules set their ``lr`` here)."""
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients through the wrapped optimizer."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, step: int) -> FilterStats:
        """Filter the gradients (replay ``step``, current lr of the first group), then step."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([grad.reshape(-1) for grad in grads])
        filtered, stats = self.filter.apply(flat, step, self.param_groups[0]["lr"])
        if filtered is not flat:
            offset = 0
            for param in self.params:
                count = param.numel()
                param.grad = filtered[offset : offset + count].view_as(param).clone()
                offset += count
        self.optimizer.step()
        return stats
