"""The loss Hessian of a recorded training step, built from a run directory alone.

Every Hessian stage (check-operator, measure, exhaustive) needs the same object:
the problem's network with the trainable parameters and the buffers (BatchNorm's running
statistics, any ``register_buffer``) recorded at step ``T`` (read from ``params.h5`` by
:func:`hessov.paramstore.load_recorded_state`), the deterministic Hessian subset of the
train or test split recorded by the train stage, the model in eval mode, as a batched
Hessian-vector product (:class:`hessov.skerch_ext.operator.AutogradHessian`) on the
requested device and dtype. With ``curvature=ggn`` the same stages multiply with the
generalised Gauss-Newton matrix instead (:class:`hessov.skerch_ext.ggn.AutogradGGN`), and
with ``params=PATTERN`` with the block of the selected parameters (:mod:`hessov.paramblock`,
the others frozen at their recorded values). This
module builds it in one place so the stages cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hessov import batching
from hessov.config import RunConfig
from hessov.errors import ConfigError, MissingInputError
from hessov.paramblock import block_names, freeze_outside
from hessov.paramstore import ColumnStore, load_recorded_state, parameter_layout
from hessov.problems import Problem, build_problem
from hessov.rundir import SPLITS, RunDir
from hessov.runlog import read_events
from hessov.skerch_ext.ggn import AutogradGGN
from hessov.skerch_ext.operator import AutogradHessian, MatMat
from hessov.training import TORCH_DTYPES, set_cpu_threads, to_device


@dataclass
class HessianAtStep:
    """The Hessian of one step and split, ready to multiply.

    Attributes:
        matmat: ``M (D, b) -> H @ M (D, b)`` on ``device`` in ``dtype``.
        dim: D.
        problem: the problem, its model holding the recorded parameters and buffers.
        inputs, targets: the Hessian subset, ``N`` examples: the model's inputs (a tensor,
            tuple or dict, :mod:`hessov.batching`) and ``(N, ...)``.
        dtype, device: of the operator.
    """

    matmat: MatMat
    dim: int
    problem: Problem
    inputs: batching.Inputs
    targets: torch.Tensor
    dtype: torch.dtype
    device: torch.device


def recorded_subsets(run: RunDir) -> dict[str, torch.Tensor]:
    """Hessian subset indices ``(N,)`` per split, as the train stage recorded them."""
    events = read_events(run.require(run.log, "train"), "hessian_subsets")
    if not events:
        raise MissingInputError(f"{run.log} records no Hessian subsets: rerun `hessov train`")
    return {split: torch.tensor(events[0][split], dtype=torch.int64) for split in SPLITS}


def check_step_and_split(run: RunDir, step: int, split: str) -> None:
    """Refuse a split that does not exist or a step that was not recorded."""
    if split not in SPLITS:
        raise ConfigError(f"split: must be one of {SPLITS}, got {split!r}")
    recorded = ColumnStore(run.require(run.params, "train")).steps()
    if step not in recorded:
        raise ConfigError(f"step: {step} was not recorded; recorded steps: {recorded}")


def curvature_operator(curvature: str, model, loss, data, batch_size: int) -> AutogradHessian:
    """The operator of ``curvature`` (``hessian`` or ``ggn``) for ``model`` and ``loss`` on
    ``data`` (inputs, targets), ``batch_size`` examples per pass.

    Raises:
        ConfigError: ``curvature=ggn`` for a loss the GGN is not defined for, naming the key.
    """
    if curvature != "ggn":  # hessian, or both: a run's own sketch is of the Hessian
        return AutogradHessian(model, loss, *data, batch_size=batch_size)
    try:
        return AutogradGGN(model, loss, *data, batch_size=batch_size)
    except ValueError as err:
        raise ConfigError(f"curvature: {err}; use curvature=hessian") from None


def check_curvature(cfg: RunConfig, problem: Problem) -> None:
    """Refuse ``curvature=ggn`` (or ``both``) for a problem whose loss has no GGN, before
    any job runs.
    """
    if cfg.curvature != "hessian" and isinstance(problem.loss, batching.ModelLoss):
        raise ConfigError(
            f"curvature: {cfg.curvature} needs the loss as a function of the model's outputs; "
            f"{cfg.problem}'s is a hessov.ModelLoss: use curvature=hessian"
        )


def hessian_at_step(
    run: RunDir,
    cfg: RunConfig,
    step: int,
    split: str,
    *,
    check_deterministic: bool = True,
) -> HessianAtStep:
    """Build the Hessian of ``split``'s subset at recorded ``step`` (see module doc).

    Raises:
        ConfigError: a split or step that was not recorded, or (with
            ``check_deterministic``) a Hessian that two passes over the data do not agree on,
            with the likely cause.
    """
    check_step_and_split(run, step, split)
    set_cpu_threads(cfg.threads)
    problem = build_problem(cfg)
    to_device(problem, cfg.device, cfg.dtype)
    load_recorded_state(problem.model, ColumnStore(run.params), step)
    freeze_outside(problem.model, block_names(parameter_layout(problem.model), cfg.params))
    indices = recorded_subsets(run)[split].to(cfg.device)
    data = getattr(problem, split)
    inputs, targets = batching.take(data.inputs, indices), batching.take(data.targets, indices)
    operator = curvature_operator(
        cfg.curvature, problem.model, problem.loss, (inputs, targets), cfg.HESSIAN_BATCH_SIZE
    )
    if check_deterministic:
        try:
            operator.check_deterministic(seed=cfg.RANDOM_SEED)
        except RuntimeError as err:
            raise ConfigError(
                f"problem: the Hessian of {cfg.problem} at step {step} ({split}) is not "
                f"deterministic, so it cannot be sketched: {err}"
            ) from None
    return HessianAtStep(
        operator.matmat,
        operator.dim,
        problem,
        inputs,
        targets,
        TORCH_DTYPES[cfg.dtype],
        torch.device(cfg.device),
    )
