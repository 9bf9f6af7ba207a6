"""The Python API: top-k Hessian eigenpairs in a notebook, and a run's results as arrays.

:func:`top_eigenpairs` sketches the loss Hessian of any ``(model, loss, data)`` in this
process, with the functions the pipeline's stages use (the batched Hessian-vector products of
:class:`hessov.skerch_ext.operator.AutogradHessian`, the sketches and recoveries of
:func:`hessov.skerch_ext.incore.sketched_eigh`, the a-posteriori check of Fernandez et al.
2025), and returns the same :class:`Eigenpairs` that :func:`load` reads from a run's
``eigen/step_T_SPLIT.h5``. :func:`load` opens a run directory written by the command line
(or by a :class:`hessov.Recorder`) for analysis in a notebook.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from torch import nn

from hessov import summary
from hessov.errors import ConfigError, MissingInputError
from hessov.paramblock import block_rows, recorded_layout, restrict
from hessov.paramstore import ColumnStore
from hessov.problems.data import as_split
from hessov.rundir import RunDir


@dataclass(frozen=True)
class Eigenpairs:
    """Top-k eigenpairs of a Hessian with their a-posteriori check.

    Attributes:
        eigenvalues: ``(k,)``, sorted by ``|lambda|`` descending.
        eigenvectors: ``(D, k)``, orthonormal columns.
        apost_rel_err: a-posteriori estimate of ``||H - W diag(L) W^T||_F / ||H||_F``.
        apost_error: the same, absolute.
        frobenius_estimate: the estimate of ``||H||_F`` it divides by.
        scree_lower: ``(k,)`` lower bounds of the scree curve (Fernandez et al. 2025).
        scree_upper: ``(k,)`` upper bounds.
        recovery: ``"two_pass"`` or ``"single_pass"``.
        hvps: Hessian-vector products spent on the sketch, every round's (probes excluded).
        error_bounds: ``(k,)`` absolute bound on each eigenvalue, ``inf`` where not resolved
            (two-pass; :mod:`hessov.skerch_ext.krylov`); None for single pass.
    """

    eigenvalues: np.ndarray
    eigenvectors: np.ndarray
    apost_rel_err: float
    apost_error: float
    frobenius_estimate: float
    scree_lower: np.ndarray
    scree_upper: np.ndarray
    recovery: str
    hvps: int
    error_bounds: np.ndarray | None = None

    @classmethod
    def from_file(cls, path: str | Path) -> Eigenpairs:
        """Read an eigen file written by the solve stage."""
        with h5py.File(path, "r") as handle:
            attrs = handle.attrs
            return cls(
                handle["eigenvalues"][:],
                handle["eigenvectors"][:],
                float(attrs["apost_rel_err"]),
                float(attrs["apost_error"]),
                float(attrs["frobenius_estimate"]),
                handle["scree_lower"][:],
                handle["scree_upper"][:],
                str(attrs["recovery"]),
                int(attrs["hvps"]),
                handle["error_bounds"][:] if "error_bounds" in handle else None,
            )


def top_eigenpairs(  # noqa: PLR0913 (the problem's three, then keyword-only settings)
    model: nn.Module,
    loss: nn.Module,
    data,
    k: int,
    *,
    recovery: str = "two_pass",
    seed: int = 0,
    batch_size: int = 0,
    block_size: int | None = None,
    num_apost: int = 30,
    rounds: int = 2,
) -> Eigenpairs:
    """Top-``k`` eigenpairs of the Hessian of the mean ``loss`` over ``data``.

    The Hessian is taken w.r.t. the model's trainable parameters in eval mode (the model is
    put back in its mode afterwards), in the parameters' dtype and on their device, where the
    data's floating tensors are moved too. The loss must use mean reduction and the data be
    finite, as for a :class:`hessov.Problem`.

    Args:
        model: any ``nn.Module`` with trainable parameters.
        loss: a loss with mean reduction, ``loss(model(inputs), targets)``.
        data: ``(inputs, targets)``: ``inputs`` a tensor, tuple or dict of tensors ``(N, ...)``
            (README, "Your own model"), ``targets`` ``(N, ...)``; or a
            :class:`~hessov.problems.data.Split` or a ``Dataset``.
        k: eigenpairs wanted, at most D; both recoveries spend ``2k`` HVPs (two-pass:
            ``rounds * k``).
        recovery: ``"two_pass"`` (the pipeline's default, most accurate per HVP: ``k`` HVPs,
            then ``k`` on the basis) or ``"single_pass"`` (one round of ``s = 2k``).
        seed: the seed of the random test matrices and probes.
        batch_size: examples per forward pass (0: all at once).
        block_size: columns per batched HVP (default: the pipeline's automatic choice).
        num_apost: Gaussian probes of the a-posteriori check.
        rounds: two-pass only: ``q >= 2`` rounds of ``k`` HVPs (block Krylov,
            :mod:`hessov.skerch_ext.krylov`); each round more is more accurate and tightens
            ``error_bounds``.
    """
    from hessov.skerch_ext.incore import sketched_eigh
    from hessov.sketchspec import automatic_block_size

    was_training = model.training
    try:
        operator = _operator(model, loss, data, batch_size)
        block = block_size or automatic_block_size(operator.dim)
        result = sketched_eigh(
            operator.matmat,
            operator.dim,
            k,
            2 * k if recovery == "single_pass" else None,
            seed=seed,
            recovery=recovery,
            block_size=min(block, k),
            dtype=operator.dtype,
            device=operator.device,
            num_apost=num_apost,
            rounds=rounds,
        )
    finally:
        model.train(was_training)
    return Eigenpairs(
        result.eigenvalues.cpu().numpy(),
        result.eigenvectors.cpu().numpy(),
        result.relative_error,
        result.apost.error,
        result.apost.frobenius,
        result.scree_lower.cpu().numpy(),
        result.scree_upper.cpu().numpy(),
        recovery,
        result.hvps["sketch"] + result.hvps.get("second_pass", 0),
        None if result.bounds is None else result.bounds.error_bounds.numpy(),
    )


def _operator(model: nn.Module, loss: nn.Module, data, batch_size: int):
    """The checked Hessian operator of ``model`` on ``data``, the data moved to the trainable
    parameters' device and floating dtype.
    """
    from hessov import batching
    from hessov.problems.checks import check_finite, check_loss
    from hessov.skerch_ext.operator import AutogradHessian

    parameters = [p for p in model.parameters() if p.requires_grad]
    if not parameters:
        raise ConfigError("model: it has no trainable parameters (requires_grad): D would be 0")
    check_loss(loss)
    split = as_split(data)
    check_finite("data", split.inputs, split.targets)
    device, dtype = parameters[0].device, parameters[0].dtype
    inputs = batching.to_device(split.inputs, device, dtype)
    targets = batching.to_device(split.targets, device, dtype)
    return AutogradHessian(model, loss, inputs, targets, batch_size=batch_size)


class RunResults:
    """A run directory's results as arrays, for a notebook (:func:`load`)."""

    def __init__(self, run_dir: str | Path):
        """Open ``run_dir``; a clear error when it is not a run."""
        self.run = RunDir(Path(run_dir))
        if not self.run.config.is_file():
            raise MissingInputError(f"{self.run.root} is not a hessov run (no config.yaml)")

    @property
    def steps(self) -> list[int]:
        """The recorded steps."""
        return ColumnStore(self.run.require(self.run.params, "train")).steps()

    def params(self, step: int) -> np.ndarray:
        """The flattened trainable parameters ``(D,)`` recorded at ``step``: the sketched
        block's rows only when the layout sketched a block (``params=``), so that they line
        up with the eigenvectors.
        """
        recorded = ColumnStore(self.run.require(self.run.params, "train")).read(step)
        if not self.run.sketch_spec.is_file():
            return recorded
        from hessov.sketchspec import load_spec

        names = load_spec(self.run).params
        return restrict(recorded, block_rows(recorded_layout(self.run), names))

    def parameter_layout(self) -> list[dict]:
        """Name, shape and offset of every parameter in the flattened vector."""
        with h5py.File(self.run.require(self.run.params, "train"), "r") as handle:
            return json.loads(handle.attrs["parameter_layout"])

    def solved(self) -> list[tuple[int, str]]:
        """The ``(step, split)`` pairs with eigenpairs, as ``hessov status`` reads them."""
        from hessov.launch.status import run_status

        return sorted(
            (item.step, item.split) for item in run_status(self.run)["sketches"] if item.solved
        )

    def eigen(self, step: int, split: str = "train") -> Eigenpairs:
        """The eigenpairs the solve stage wrote for ``step`` and ``split``."""
        return Eigenpairs.from_file(self.run.require(self.run.eigen(step, split), "solve"))

    def summary(self) -> dict:
        """What ``hessov summary RUN`` prints: one key per finished stage, and each
        variant's under ``variants``.
        """
        return summary.load(self.run)


def load(run_dir: str | Path) -> RunResults:
    """A run's results as arrays: ``hessov.load(RUN).eigen(1000, "train").eigenvalues``."""
    return RunResults(run_dir)
