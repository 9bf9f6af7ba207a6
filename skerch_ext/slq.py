"""The eigenvalue density of a symmetric operator by stochastic Lanczos quadrature (SLQ).

For a unit start vector ``v``, ``m`` Lanczos steps build a tridiagonal ``T`` ``(m, m)``
whose eigenvalues ``theta_i`` and squared first eigenvector components ``tau_i`` are the
nodes and weights of the Gauss quadrature of the measure ``sum_j (u_j^T v)^2
delta(t - lambda_j)``; its mean over random ``v`` is the spectral density
``(1/D) sum_j delta(t - lambda_j)`` (Golub and Meurant 2010; Ubaru, Chen and Saad 2017,
"Fast estimation of tr(f(A)) via stochastic Lanczos quadrature"; Ghorbani, Krishnan and
Xiao 2019, "An investigation into neural net optimization via Hessian eigenvalue density").
Each run is independent of the others: one array task each.

Deflated (the sketch's eigenpairs known): the runs start in the complement of the sketched
eigenvectors ``U`` ``(D, n)`` and multiply with ``P H P``, ``P = I - U U^T``, so that their
nodes resolve the bulk instead of spending steps on the outliers; the outliers come back
exactly, the sketch's eigenvalues with weight ``1/D`` each, the bulk with ``(D - n)/D``
(:func:`deflated_measure`). The Lanczos vectors are reorthogonalised fully, in float64, as
in Ghorbani et al.'s code (a lost orthogonality would duplicate nodes).

Densities are compared with the Wasserstein-1 distance of their measures,
``int |F_a(t) - F_b(t)| dt`` with ``F`` the cumulative distributions (:func:`wasserstein1`),
and drawn broadened by a Gaussian of width ``sigma`` (:func:`broadened`).
"""

from __future__ import annotations

import math

import torch

from hessov.skerch_ext.hutchinson import Projection
from hessov.skerch_ext.operator import MatMat


def lanczos_quadrature(matmat: MatMat, project: Projection, start: torch.Tensor, steps: int):
    """Nodes ``(m,)`` and weights ``(m,)`` (float64, summing to 1) of ``m <= steps`` Lanczos
    steps on ``P H P`` from ``P start`` (``start`` ``(D,)`` in the operator's dtype), with
    full reorthogonalisation; fewer than ``steps`` when the Krylov space is exhausted.
    """
    dtype = start.dtype
    vector = project(start[:, None])[:, 0].double()
    basis = [vector / vector.norm()]
    alphas, betas = [], []
    for _ in range(steps):
        product = project(matmat(basis[-1].to(dtype)[:, None]))[:, 0].double()
        alphas.append(float(basis[-1] @ product))
        stacked = torch.stack(basis, dim=1)
        for _ in range(2):  # twice is enough (Giraud et al. 2005)
            product -= stacked @ (stacked.T @ product)
            # Against the deflated space too: the basis' rounding along it would otherwise
            # build up step by step, and once the complement is exhausted the run would go
            # on inside the deflated space.
            product = project(product[:, None])[:, 0]
        beta = float(product.norm())
        if len(alphas) == steps or beta <= 1e-10 * max(abs(a) for a in alphas):
            break
        betas.append(beta)
        basis.append(product / beta)
    tridiagonal = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas, dtype=torch.float64)
        tridiagonal += torch.diag(off, 1) + torch.diag(off, -1)
    nodes, vectors = torch.linalg.eigh(tridiagonal)
    return nodes, vectors[0] ** 2


def deflated_measure(
    outliers: torch.Tensor, runs: list[tuple[torch.Tensor, torch.Tensor]], dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights (float64, summing to 1) of the density of ``H`` from the sketch's
    eigenvalues ``outliers`` ``(n,)`` and the runs' bulk quadratures on ``P H P``.
    """
    bulk_share = (dim - len(outliers)) / dim / len(runs)
    nodes = [outliers.double()] + [run[0] for run in runs]
    weights = [torch.full((len(outliers),), 1 / dim, dtype=torch.float64)]
    weights += [run[1] * bulk_share for run in runs]
    return torch.cat(nodes), torch.cat(weights)


def broadened(nodes: torch.Tensor, weights: torch.Tensor, grid: torch.Tensor, sigma: float):
    """``(G,)``: the density ``sum_i w_i N(t; theta_i, sigma^2)`` on ``grid`` ``(G,)``."""
    scaled = (grid[:, None] - nodes[None, :]) / sigma
    kernel = torch.exp(-0.5 * scaled**2) / (sigma * math.sqrt(2 * math.pi))
    return kernel @ weights


def wasserstein1(nodes_a, weights_a, nodes_b, weights_b) -> float:
    """``int |F_a - F_b| dt`` of two discrete measures on the line (nodes ``(m,)`` with
    weights ``(m,)`` summing to 1 each); in the units of the nodes.
    """
    nodes = torch.cat([nodes_a, nodes_b]).double()
    signed = torch.cat([weights_a.double(), -weights_b.double()])
    order = nodes.argsort()
    cumulative = torch.cumsum(signed[order], dim=0)[:-1]
    return float((cumulative.abs() * nodes[order].diff()).sum())
