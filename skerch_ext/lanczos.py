"""Top eigenpairs of a symmetric matrix-free operator by implicitly restarted Lanczos.

The replay stage (README.md, "Spectral-filter replays") needs the top ``N`` Hessian eigenvectors
every ``eig_freq`` steps, and the sharpness flow its top eigenvalues. For a few tens of eigenpairs
of a Hessian that changes between calls, ARPACK's implicitly restarted Lanczos
(``scipy.sparse.linalg.eigsh``; Lehoucq, Sorensen and Yang 1998, "ARPACK Users' Guide") is the
cheapest exact-to-tolerance method: it needs only Hessian-vector products, and a start vector inside
the previous top eigenspace makes a recomputation after a few training steps converge in few
restarts. Cohen et al. 2021 compute their sharpness the same way.

ARPACK works in float64 on numpy arrays; the products run in the operator's own dtype and
device, so the accuracy is bounded by the operator's precision: ``tol`` (relative residual
``||H v - lambda v|| <= tol * |lambda|``) should not go below its rounding (~1e-6 in float32).
The in-core sketch (:mod:`hessov.skerch_ext.incore`) is the alternative for many eigenpairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, eigsh

from hessov.skerch_ext.operator import MatMat


@dataclass(frozen=True)
class LanczosResult:
    """Top eigenpairs of a symmetric operator.

    Attributes:
        eigenvalues: ``(k,)`` float64, sorted by ``|lambda|`` descending.
        eigenvectors: ``(D, k)`` in the operator's dtype and device, orthonormal columns, column
            ``i`` belonging to ``eigenvalues[i]``.
        hvps: operator-vector products spent (a block of ``b`` columns counts ``b``).
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    hvps: int


def top_eigenpairs(  # noqa: PLR0913 (ARPACK's options, keyword-only and mostly defaulted)
    matmat: MatMat,
    dim: int,
    k: int,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    tol: float = 1e-5,
    start: torch.Tensor | None = None,
    seed: int = 0,
    max_restarts: int | None = None,
) -> LanczosResult:
    """The ``k`` eigenpairs of largest magnitude of the symmetric ``D x D`` operator.

    Args:
        matmat: ``M (D, b) -> H @ M (D, b)`` on tensors of ``dtype`` on ``device``.
        dim: ``D``.
        k: eigenpairs wanted, ``1 <= k < D`` (ARPACK cannot return all of them).
        tol: relative residual at which ARPACK stops (see the module docstring).
        start: ``(D,)`` start vector, e.g. the sum of the previous top eigenvectors; None draws a
            Gaussian one from ``seed``, so that every call is reproducible.
        dtype: The dtype ``matmat`` takes and the eigenvectors are returned in.
        device: The device ``matmat`` takes and the eigenvectors are returned on.
        seed: Seed of the Gaussian start vector when ``start`` is None.
        max_restarts: ARPACK's ``maxiter`` (None = its default, ``10 D``).

    Raises:
        ValueError: ``k`` outside ``1..D-1``.
        scipy.sparse.linalg.ArpackNoConvergence: ARPACK did not reach ``tol``.
    """
    if not 1 <= k < dim:
        raise ValueError(f"k={k} eigenpairs need 1 <= k < D={dim}")
    count = [0]

    def apply(block: np.ndarray) -> np.ndarray:
        matrix = torch.from_numpy(np.ascontiguousarray(block, dtype=np.float64).reshape(dim, -1))
        count[0] += matrix.shape[1]
        product = matmat(matrix.to(device=device, dtype=dtype))
        return product.detach().to(device="cpu", dtype=torch.float64).numpy()

    operator = LinearOperator((dim, dim), matvec=apply, matmat=apply, dtype=np.float64)
    if start is None:
        generator = torch.Generator().manual_seed(seed)
        start = torch.randn(dim, generator=generator, dtype=torch.float64)
    v0 = start.detach().to(device="cpu", dtype=torch.float64).numpy()
    values, vectors = eigsh(operator, k=k, which="LM", tol=tol, v0=v0, maxiter=max_restarts)
    order = np.argsort(-np.abs(values), kind="stable")
    eigenvalues = torch.from_numpy(values[order].copy())
    eigenvectors = torch.from_numpy(vectors[:, order].copy()).to(device=device, dtype=dtype)
    return LanczosResult(eigenvalues, eigenvectors, count[0])
