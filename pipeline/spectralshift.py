"""The most negative eigenpairs by a spectral shift (``which=smallest``).

For ``sigma >= lambda_max``, ``sigma I - H`` is positive semi-definite, and its eigenpairs of
largest magnitude, the ones a sketch finds, are ``H``'s smallest: ``mu_i = sigma - lambda_i``
with the same eigenvectors. A run with ``which=smallest`` sketches ``sigma I - H`` (every
measurement round multiplies with it, :func:`shifted`) and the solve reports ``lambda =
sigma - mu``, most negative first. An error is shift-invariant, ``|mu - mu^| = |lambda -
lambda^|``, so the solve's bound of every eigenvalue holds as it is; a relative error is not
(``|mu|`` is about ``sigma``), so ``target_rel_err`` is refused with it.

The shift of each step and split is a Lanczos estimate of the largest-magnitude eigenpair
``(theta, u)`` of ``H`` plus its residual: ``sigma = |theta| + ||H u - theta u||``. Some
eigenvalue lies within the residual of ``theta`` (Bauer-Fike); when it is the extreme one,
which is what Lanczos converges to first from a random start, ``sigma >= ||H||_2 >=
lambda_max``. That is not guaranteed: a shift below ``lambda_max`` would show as negative
``mu`` among the solve's values, and the tests check ``sigma >= ||H||_2`` against the exact
spectrum. The shift is written by
the ``shift`` job before the first measurement round (:mod:`hessov.stages.shift`) to
``measurements/step_T_SPLIT/shift.json``. A larger shift only costs accuracy relative to
``sigma``; the cost of the shift is a few tens of HVPs.
"""

from __future__ import annotations

import json

import torch

from hessov.errors import MissingInputError
from hessov.rundir import RunDir
from hessov.skerch_ext.operator import MatMat


def read_shift(run: RunDir, step: int, split: str) -> float:
    """The shift of ``step`` and ``split``; a clear error naming the job that writes it."""
    path = run.shift(step, split)
    if not path.is_file():
        raise MissingInputError(
            f"{path} is missing: write it with `hessov shift {run.root} step={step} split={split}`"
        )
    return float(json.loads(path.read_text())["shift"])


def shift_of(run: RunDir, spec, step: int, split: str) -> float | None:
    """The shift the sketch of ``step`` and ``split`` uses: ``None`` unless ``which=smallest``."""
    return read_shift(run, step, split) if spec.which == "smallest" else None


def shifted(matmat: MatMat, sigma: float | None) -> MatMat:
    """``M -> sigma M - H M`` (``matmat`` itself when ``sigma`` is ``None``)."""
    if sigma is None:
        return matmat
    return lambda matrix: torch.sub(matrix * sigma, matmat(matrix))


def hessian_eigenvalues(eigenvalues: torch.Tensor, sigma: float | None) -> torch.Tensor:
    """The sketched operator's eigenvalues ``(k,)`` as ``H``'s: ``sigma - mu`` when shifted."""
    return eigenvalues if sigma is None else sigma - eigenvalues
