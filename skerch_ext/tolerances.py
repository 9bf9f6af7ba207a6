"""How far two computations of the same sketch may differ when their bits are not the same.

A sketch's products are computed by BLAS and torch kernels whose last bits depend on the
kernel path: the CPU's instruction set (AVX-512, AVX2, none: ``ATEN_CPU_CAPABILITY``,
``MKL_CBWR``, ``MKL_ENABLE_INSTRUCTIONS``), the device, the thread count and even the number
of columns multiplied together. Columns of the random test matrices are the same bits
everywhere by construction (:mod:`hessov.skerch_ext.random_matrices`), and so is anything computed
again on the same machine with the same kernel path and block widths: a rerun, a resumed
worker, any partition of the layout's blocks into tasks. Everything else is compared with
the tolerances below, derived once here.

**Rounding level.** An inner product of length ``n`` evaluated in floating point with unit
roundoff ``u``, in any order, satisfies ``|fl(x^T y) - x^T y| <= g(n) |x|^T |y|``. The worst
case is ``g(n) = n u / (1 - n u)`` (Higham, *Accuracy and Stability of Numerical
Algorithms*, 2nd ed., eq. 3.4), which is far too pessimistic for n in the millions. Treating
the rounding errors as independent, mean-zero random variables, Higham & Mary ("A new
approach to probabilistic rounding error analysis", SIAM J. Sci. Comput. 41(5), 2019,
Theorems 2.4 and 3.1) give ``g(n) = lam sqrt(n) u`` to first order, holding for all n
partial sums at once with probability at least ``1 - 2 n exp(-lam^2 / 2)``; we choose
``lam`` so that this failure probability is ``FAILURE_PROBABILITY``. :func:`rounding_level`
is that ``g(n)``.

**Products.** Two evaluations of one product, each within ``g(n) |A| |x|`` of the exact
one, differ by at most ``2 g(n) |A| |x|`` entrywise: :func:`product_tolerance`.

**Eigenvalues.** The products of a sketch run through a network's backward passes and then
the solve's QR and Rayleigh-Ritz, whose inner products are at most ``D`` long. Modelling
each run's result as the exact computation on a perturbed ``H + E_run`` with
``||E_run|| <= g(D) ||H||`` (the backward error of products whose terms do not cancel
catastrophically, which the measured figures in the README confirm), two runs see operators
at most ``||E_a - E_b|| <= 2 g(D) ||H||`` apart, and by Weyl's inequality their eigenvalues
differ by at most that: :func:`eigenvalue_tolerance`. This holds for the eigenvalues the
sketch resolves (Ritz values with small residuals, which are stationary in the subspace).
A Ritz value the sketch does not resolve moves with the sketched subspace itself, by up to
the sketch's own error: each run's reported eigenvalues are within ``||H - H_hat||_2 <=
||H - H_hat||_F`` of the true ones (Weyl again), so two runs agree within the sum of their
a-posteriori errors; pass that as ``sketch_error`` where it is the larger.

**Eigenvector subspaces.** Single eigenvectors inside a cluster of close eigenvalues are
not defined by the operator, so they are compared only as the span of the top ``m``
(by magnitude) across a gap that defines it. With eigenvalues sorted by magnitude, every
eigenvalue outside the top ``m`` has ``|lambda| <= |lambda_{m+1}|`` and every one inside
``|lambda| >= |lambda_m|``, so the two sets are separated by at least
``gap_m = |lambda_m| - |lambda_{m+1}|``. The Davis-Kahan sin-theta theorem (Davis & Kahan,
"The rotation of eigenvectors by a perturbation. III", SIAM J. Numer. Anal. 7(1), 1970)
then bounds the largest principal angle between the two runs' top-``m`` spaces by
``sin theta <= ||E|| / (gap_m - ||E||)``: :func:`subspace_tolerance`, and
:func:`largest_angle_sine` measures it. :func:`compare_eigenpairs` applies all of it to two
runs' eigenpairs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: The chance we accept that the probabilistic rounding bound fails for one comparison.
FAILURE_PROBABILITY = 1e-6


def unit_roundoff(dtype: torch.dtype) -> float:
    """``u``: half the machine epsilon of ``dtype`` (2^-24 for float32, 2^-53 for float64)."""
    return torch.finfo(dtype).eps / 2


def rounding_level(dtype: torch.dtype, length: int) -> float:
    """``g(n) = lam sqrt(n) u``: the relative error of a length-``n`` inner product that holds
    with probability ``1 - FAILURE_PROBABILITY`` (module docstring, Higham & Mary 2019).
    """
    lam = math.sqrt(2 * math.log(2 * length / FAILURE_PROBABILITY))
    return lam * math.sqrt(length) * unit_roundoff(dtype)


def product_tolerance(abs_product: torch.Tensor, dtype: torch.dtype, length: int) -> torch.Tensor:
    """Entrywise bound ``2 g(n) |A| |x|`` on the difference of two evaluations of ``A x``.

    Args:
        abs_product: ``|A| |x|``, any shape, computed in higher precision.
        dtype: The dtype the products were computed in.
        length: ``n``, the inner dimension of the product.
    """
    return 2 * rounding_level(dtype, length) * abs_product


def eigenvalue_tolerance(
    norm: float, dim: int, dtype: torch.dtype, sketch_error: float = 0.0
) -> float:
    """``max(2 g(D) ||H||, sketch_error)``: how far two runs' eigenvalues may be apart.

    Args:
        norm: ``||H||_2`` (the largest eigenvalue magnitude is a fine estimate).
        dim: ``D``, the longest inner product of the computation.
        dtype: The dtype of the products and of the solve.
        sketch_error: For eigenvalues the sketch may not resolve, the sum of the two runs' absolute
            spectral-norm errors (e.g. from their a-posteriori estimates); 0 otherwise.
    """
    return max(2 * rounding_level(dtype, dim) * norm, sketch_error)


def subspace_tolerance(eigenvalues: torch.Tensor, size: int, perturbation: float) -> float | None:
    """Davis-Kahan bound on sin of the largest angle between two runs' top-``size`` spaces.

    Args:
        eigenvalues: ``(k,)``, sorted by magnitude, descending; ``size < k``.
        size: ``m``, the dimension of the top eigenspace compared.
        perturbation: ``||E_a - E_b||``, e.g. :func:`eigenvalue_tolerance`.

    Returns:
        ``perturbation / (gap - perturbation)``, or ``None`` where no gap larger than the
        perturbation defines the subspace.
    """
    magnitudes = eigenvalues.abs().double()
    gap = (magnitudes[size - 1] - magnitudes[size]).item()
    if gap <= perturbation:
        return None
    return perturbation / (gap - perturbation)


def largest_angle_sine(first: torch.Tensor, second: torch.Tensor) -> float:
    """``sin`` of the largest principal angle between the column spans of two ``(D, m)``
    matrices, computed in float64 after orthonormalising each (so that the bases' own
    rounding, e.g. float32 storage, does not count as an angle).
    """
    basis_a = torch.linalg.qr(first.double()).Q
    basis_b = torch.linalg.qr(second.double()).Q
    residual = basis_b - basis_a @ (basis_a.T @ basis_b)
    return torch.linalg.matrix_norm(residual, ord=2).item()


@dataclass
class Agreement:
    """Two runs' eigenpairs against the tolerances (see :func:`compare_eigenpairs`).

    Attributes:
        tolerance: ``2 g(D) ||H||``, for the eigenvalues the sketch resolves.
        sketch_tolerance: The same widened to the two runs' own errors, for all ``k``.
        bounds: ``{m: Davis-Kahan bound}`` for each top-``m`` space a gap defines.
        sines: ``{m: measured sin theta}`` for the same ``m``.
        resolved_difference: Largest ``|lambda_a - lambda_b|`` over the top ``max(bounds)``.
        all_difference: Largest ``|lambda_a - lambda_b|`` over all ``k``.
    """

    tolerance: float
    sketch_tolerance: float
    bounds: dict[int, float]
    sines: dict[int, float]
    resolved_difference: float
    all_difference: float

    @property
    def holds(self) -> bool:
        """Every compared figure within its tolerance, and at least one gapped space."""
        return (
            bool(self.bounds)
            and all(self.sines[m] <= bound for m, bound in self.bounds.items())
            and self.resolved_difference <= self.tolerance
            and self.all_difference <= self.sketch_tolerance
        )


def compare_eigenpairs(
    first: tuple[torch.Tensor, torch.Tensor],
    second: tuple[torch.Tensor, torch.Tensor],
    dtype: torch.dtype,
    sketch_error: float = 0.0,
    max_size: int = 10,
) -> Agreement:
    """Compare two runs' ``(eigenvalues (k,), eigenvectors (D, k))``, sorted by magnitude.

    Args:
        first: ``(eigenvalues (k,), eigenvectors (D, k))`` of one run.
        second: The same of the other run.
        dtype: The dtype both were computed in.
        sketch_error: The sum of the two runs' absolute spectral-norm errors (e.g. twice the sum of
            their a-posteriori estimates), for the eigenvalues the sketch may not resolve.
        max_size: The largest top-``m`` space compared.
    """
    (values_a, vectors_a), (values_b, vectors_b) = first, second
    dim = vectors_a.shape[0]
    norm = max(values_a.abs().max().item(), values_b.abs().max().item())
    tolerance = eigenvalue_tolerance(norm, dim, dtype)
    bounds = {}
    for size in range(1, min(max_size, len(values_a) - 1) + 1):
        bound_a = subspace_tolerance(values_a, size, tolerance)
        bound_b = subspace_tolerance(values_b, size, tolerance)
        if bound_a is not None and bound_b is not None:
            bounds[size] = max(bound_a, bound_b)
    sines = {m: largest_angle_sine(vectors_a[:, :m], vectors_b[:, :m]) for m in bounds}
    difference = (values_a.double() - values_b.double()).abs()
    resolved = difference[: max(bounds, default=0)]
    return Agreement(
        tolerance=tolerance,
        sketch_tolerance=eigenvalue_tolerance(norm, dim, dtype, sketch_error),
        bounds=bounds,
        sines=sines,
        resolved_difference=resolved.max().item() if len(resolved) else 0.0,
        all_difference=difference.max().item(),
    )
