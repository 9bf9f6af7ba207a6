"""Recover top-|lambda| eigenpairs of a symmetric operator from its sketches.

Two recoveries, each ending in a small symmetric core ``C`` that represents ``H`` in an
orthonormal basis ``V``, ``H ~= V C V^T``:

* Single pass (SEIGH "oversampled" recovery: Fernandez et al., "Connecting Parameter
  Magnitudes and Hessian Eigenspaces at Scale using Sketched Methods"; Tropp et al. 2017,
  "Practical sketching algorithms for low-rank matrix approximation", section 4, with the
  inner sketch of Tropp et al. 2019, "Streaming low-rank matrix approximation with an
  application to scientific simulation", section 4.2): from ``Y = H Omega[:, :k]`` and
  ``Z = Psi H Omega`` (s x s), ``V = Q = qr(Y)`` and ``C = (Psi Q)^+ Z ((Omega^T Q)^+)^T``,
  two least-squares solves. No HVP beyond the ``s`` of the sketch.
* Two pass (Halko, Martinsson and Tropp 2011, "Finding structure with randomness",
  section 5.3): given the second-round measurements ``H Q``, Rayleigh-Ritz. Plain, on
  ``span(Q)`` with ``C = Q^T (H Q)``; by default extended to the block Krylov space
  ``span(Q, H Q)`` (:func:`block_krylov_extension`, cf. block Lanczos, Golub and Underwood
  1977), which the same ``2k`` HVPs determine except for one block. The extension acts as
  one more power iteration: with 710 HVPs on the exact Hessian of the 7,030-parameter
  mnist_mini MLP, the largest top-20 relative eigenvalue error was about 1e-4 against 5e-3
  for plain Rayleigh-Ritz and 1e-2 for single pass (bench/RESULTS.md). Nystrom's
  ``(H Q)(Q^T H Q)^+(H Q)^T`` (HMT section 5.4) is nearly as accurate but needs a residual
  filter for indefinite ``H`` and then returns fewer than ``k`` pairs.

All symmetrize the core (skerch 1.2.0's ``oversampled_h`` does not), take ``eigh``, sort by
``|lambda|`` descending (Hessians are indefinite) and return ``W = Q U``. A basis ``Q`` with
more columns than the eigenpairs reported ("oversampled Q") is the main lever on accuracy:
``num_eigenpairs`` truncates the result.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

#: ``X -> T X`` for a random test matrix ``T`` with ``s`` rows, applied to a ``(D, b)`` block.
BlockTransform = Callable[[torch.Tensor], torch.Tensor]


def orthonormal_basis(outer: torch.Tensor) -> torch.Tensor:
    """Thin QR basis ``Q`` of the outer sketch: ``(D, k)`` to ``(D, k)``."""
    return torch.linalg.qr(outer, mode="reduced").Q


def least_squares(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``argmin_x ||a x - b||_F`` for a tall, full-column-rank ``a`` (m, n) and ``b`` (m, r).

    Via a thin QR of ``a``, which is stable for the well-conditioned random projections
    ``Psi Q``, ``Omega^T Q`` and runs unchanged on any device. Shape ``(n, r)``.
    """
    q, r = torch.linalg.qr(a, mode="reduced")
    return torch.linalg.solve_triangular(r, q.T @ b, upper=True)


def single_pass_core(
    basis: torch.Tensor,
    inner: torch.Tensor,
    omega_t_apply: BlockTransform,
    psi_apply: BlockTransform,
) -> torch.Tensor:
    """The symmetrized SEIGH core ``C = (Psi Q)^+ Z ((Omega^T Q)^+)^T``, shape ``(k, k)``.

    Args:
        basis: ``Q``, orthonormal, ``(D, k)``.
        inner: ``Z = Psi H Omega``, ``(s, s)`` with ``s >= k``.
        omega_t_apply: ``X -> Omega^T X``, ``(D, b) -> (s, b)``.
        psi_apply: ``X -> Psi X``, ``(D, b) -> (s, b)``.
    """
    return core_from_projections(psi_apply(basis), omega_t_apply(basis), inner)


def core_from_projections(
    psi_basis: torch.Tensor, omega_t_basis: torch.Tensor, inner: torch.Tensor
) -> torch.Tensor:
    """:func:`single_pass_core` from ``Psi Q`` and ``Omega^T Q`` (both ``(s, k)``), however
    they were computed (whole, or a block of columns at a time).
    """
    left = least_squares(psi_basis, inner)  # (k, s): (Psi Q)^+ Z
    core = least_squares(omega_t_basis, left.T).T  # (k, k)
    return symmetrized(core)


def two_pass_core(basis: torch.Tensor, h_basis: torch.Tensor) -> torch.Tensor:
    """The symmetrized Rayleigh-Ritz core ``C = Q^T (H Q)``: ``(D, k), (D, k) -> (k, k)``."""
    return symmetrized(basis.T @ h_basis)


def symmetrized(core: torch.Tensor) -> torch.Tensor:
    """``(C + C^T) / 2``: the nearest symmetric matrix, so that ``eigh`` sees both triangles."""
    return (core + core.T) / 2


def eigenpairs_from_core(
    basis: torch.Tensor, core: torch.Tensor, num_eigenpairs: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs of ``Q C Q^T``, sorted by ``|lambda|`` descending.

    Args:
        basis: ``Q``, ``(D, k)``.
        core: Symmetric ``C``, ``(k, k)``.
        num_eigenpairs: ``r <= k`` pairs to keep (all ``k`` if None).

    Returns:
        Eigenvalues ``(r,)`` and orthonormal eigenvectors ``W = Q U`` ``(D, r)``.
    """
    eigenvalues, coefficients = ritz_coefficients(core, num_eigenpairs)
    return eigenvalues, basis @ coefficients


def seigh_single_pass(
    outer: torch.Tensor,
    inner: torch.Tensor,
    omega_t_apply: BlockTransform,
    psi_apply: BlockTransform,
    num_eigenpairs: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Single-pass SEIGH from ``Y = H Omega[:, :k]`` (D, k) and ``Z = Psi H Omega`` (s, s).

    Returns:
        Eigenvalues ``(r,)`` and eigenvectors ``(D, r)``, ``r = num_eigenpairs or k``.
    """
    basis = orthonormal_basis(outer)
    core = single_pass_core(basis, inner, omega_t_apply, psi_apply)
    return eigenpairs_from_core(basis, core, num_eigenpairs)


def block_krylov_extension(
    basis: torch.Tensor, h_basis: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Basis ``[Q, P]`` (D, 2k) and core (2k, 2k) of the Rayleigh-Ritz problem on the block
    Krylov space ``span(Q, H Q)``, from ``Q`` and ``H Q`` alone.

    With ``P`` an orthonormal basis of ``(I - Q Q^T) H Q`` and ``E = P^T H Q`` (known, since
    ``H Q`` is), ``[Q, P]^T H [Q, P] = [[Q^T H Q, E^T], [E, P^T H P]]``. Only the block
    ``P^T H P`` would need more HVPs; it is set to zero. ``P`` spans the residual directions
    of the Ritz vectors, whose Rayleigh quotients lie in the bulk of the spectrum, so for the
    top eigenpairs the omission is a second-order effect: the coupling ``E`` alone moves the
    Ritz values by ``||E u||^2 / mu`` to first order, the bulk block only by a factor
    ``(1 + O(x / mu))`` of that. (Nystrom's ``(H Q)(Q^T H Q)^+(H Q)^T`` is the same form with
    the block estimated as ``E C^+ E^T``, which needs a residual filter for indefinite ``H``.)
    ``P`` is orthogonalised against ``Q`` twice, for numerical orthogonality.

    When ``2k > D`` the complement of ``span(Q)`` has only ``D - k < k`` dimensions: a thin
    QR would fill ``P``'s surplus columns with directions not orthogonal to ``Q``.
    :func:`complement_basis` keeps the residual's directions that are there, so ``P`` has
    ``r <= D - k`` columns and the core is ``(k + r, k + r)``.
    """
    return extended_core(basis, h_basis, next_block(basis, h_basis))


def next_block(basis: torch.Tensor, product: torch.Tensor) -> torch.Tensor:
    """The next Krylov block: an orthonormal basis of ``(I - V V^T) H Q_last``.

    Args:
        basis: ``V``, the blocks so far, orthonormal, ``(D, n)``.
        product: ``H Q_last``, the last block's products, ``(D, b)``.

    Returns:
        ``(D, r)``, orthogonal to ``V``: ``r = b`` while ``n + b <= D``, else the residual's
        directions outside ``span(V)`` (:func:`complement_basis`).
        Projected twice, for numerical orthogonality.
    """
    residual = product - basis @ (basis.T @ product)
    if basis.shape[1] + product.shape[1] > basis.shape[0]:
        return complement_basis(basis, residual)
    block = orthonormal_basis(residual)
    return orthonormal_basis(block - basis @ (basis.T @ block))


def extended_core(
    basis: torch.Tensor, products: torch.Tensor, extension: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Basis ``[V, E]`` ``(D, n + r)`` and core ``(n + r, n + r)`` of the extended space:
    ``[[V^T H V, (E^T H V)^T], [E^T H V, 0]]`` from ``V`` ``(D, n)``, ``H V`` ``(D, n)`` and
    the last block ``E`` ``(D, r)``.
    """
    core = coupled_core(basis.T @ products, extension.T @ products)
    return torch.cat([basis, extension], dim=1), core


def coupled_core(projected: torch.Tensor, coupling: torch.Tensor) -> torch.Tensor:
    """``[[sym(V^T H V), C^T], [C, 0]]`` ``(n + r, n + r)`` from ``V^T H V`` ``(n, n)`` and the
    coupling ``C = E^T H V`` ``(r, n)``: the extended core, however its blocks were summed
    (whole, or over row blocks).
    """
    num = projected.shape[0]
    size = num + coupling.shape[0]
    core = torch.zeros(size, size, dtype=projected.dtype, device=projected.device)
    core[:num, :num] = symmetrized(projected)
    core[num:, :num] = coupling
    core[:num, num:] = coupling.T
    return core


def complement_basis(basis: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis ``(D, r)`` of the part of ``residual`` ``(D, k)`` outside
    ``span(basis)`` ``(D, k)``: its left singular vectors, after projecting ``basis`` out
    twice, whose singular values exceed ``D`` roundings of the largest (at most ``D - k``).
    """
    projected = residual - basis @ (basis.T @ residual)
    projected = projected - basis @ (basis.T @ projected)
    left, values, _ = torch.linalg.svd(projected, full_matrices=False)
    tolerance = values[0] * projected.shape[0] * torch.finfo(projected.dtype).eps
    rank = min(int((values > tolerance).sum()), basis.shape[0] - basis.shape[1])
    return left[:, :rank]


def seigh_two_pass(
    basis: torch.Tensor,
    h_basis: torch.Tensor,
    num_eigenpairs: int | None = None,
    krylov_extension: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-pass recovery from ``Q`` (D, k) (see :func:`orthonormal_basis`) and ``H Q`` (D, k).

    By default Rayleigh-Ritz on the block Krylov space ``span(Q, H Q)``
    (:func:`block_krylov_extension`): the same ``2k`` HVPs as plain Rayleigh-Ritz on
    ``span(Q)`` (``krylov_extension=False``, what skerch's two-pass recovery does), but the
    extra block acts as one more power iteration. On the mnist_mini Hessian (710 HVPs,
    k=355) the top-20 eigenvalue error drops from about 0.5% to about 0.01%.

    Returns:
        Eigenvalues ``(r,)`` and eigenvectors ``(D, r)``, ``r = num_eigenpairs or k``.
    """
    num = num_eigenpairs or basis.shape[1]
    if not krylov_extension:
        return eigenpairs_from_core(basis, two_pass_core(basis, h_basis), num)
    return eigenpairs_from_core(*block_krylov_extension(basis, h_basis), num)


def ritz_coefficients(
    core: torch.Tensor, num_eigenpairs: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top ``r`` eigenpairs of a symmetric ``core`` ``(c, c)`` by ``|lambda|``: eigenvalues
    ``(r,)`` and coefficients ``U`` ``(c, r)``, so that ``W = V U`` for the core's basis ``V``.
    """
    eigenvalues, eigenvectors = torch.linalg.eigh(core)
    order = eigenvalues.abs().argsort(descending=True)[:num_eigenpairs]
    return eigenvalues[order], eigenvectors[:, order]
