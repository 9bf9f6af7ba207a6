"""Optimizers and learning-rate schedules, built from the run configuration.

:func:`build_optimizer` turns an :class:`~hessov.config.OptimizerConfig` into a torch
optimizer: torch's own SGD, Adam, AdamW, RMSprop, Adagrad, NAdam and RAdam, or this package's
:class:`~hessov.optim.eve.Eve` and :class:`~hessov.optim.scaled_adam.ScaledAdam`; with
``lookahead_k > 0`` the result is wrapped in :class:`~hessov.optim.lookahead.Lookahead`.
Each optimizer receives only the configuration fields it accepts, so a configuration may carry
fields for other optimizers. :func:`build_schedule` turns a
:class:`~hessov.config.ScheduleConfig` into a per-step learning-rate schedule
(:mod:`hessov.optim.schedules`).

Everything built here is checkpointable with ``state_dict()`` / ``load_state_dict()``: a run
resumed from a snapshot takes bit-identical steps to one that was never interrupted. Invalid
names or values raise :class:`~hessov.errors.ConfigError` (a ``ValueError``) naming the
configuration key (``optimizer.name``, ``schedule.warmup_steps``, ...). Definitions and sources:
the module docstrings; README.md, "Configuration", lists the choices.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from hessov.config import OptimizerConfig, ScheduleConfig
from hessov.errors import ConfigError
from hessov.optim.eve import Eve
from hessov.optim.lookahead import Lookahead
from hessov.optim.scaled_adam import ScaledAdam
from hessov.optim.schedules import ClosedFormSchedule, Constant, CosineDecay, Eden, StepDecay

# Optimizer class and the OptimizerConfig fields passed to it as keyword arguments.
_OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], tuple[str, ...]]] = {
    "SGD": (torch.optim.SGD, ("lr", "momentum", "dampening", "weight_decay", "nesterov")),
    "Adam": (torch.optim.Adam, ("lr", "betas", "eps", "weight_decay")),
    "AdamW": (torch.optim.AdamW, ("lr", "betas", "eps", "weight_decay")),
    "RMSprop": (torch.optim.RMSprop, ("lr", "alpha", "eps", "weight_decay", "momentum")),
    "Adagrad": (torch.optim.Adagrad, ("lr", "eps", "weight_decay")),
    "NAdam": (torch.optim.NAdam, ("lr", "betas", "eps", "weight_decay")),
    "RAdam": (torch.optim.RAdam, ("lr", "betas", "eps", "weight_decay")),
    "Eve": (Eve, ("lr", "betas", "eps", "weight_decay", "target_rms")),
    "ScaledAdam": (
        ScaledAdam,
        ("lr", "betas", "eps", "scalar_lr_scale", "clipping_scale", "param_min_rms"),
    ),
}
OPTIMIZER_NAMES: tuple[str, ...] = tuple(_OPTIMIZERS)
SCHEDULE_NAMES: tuple[str, ...] = ("constant", "step", "cosine", "warmup", "eden")

__all__ = [
    "OPTIMIZER_NAMES",
    "SCHEDULE_NAMES",
    "ClosedFormSchedule",
    "Constant",
    "CosineDecay",
    "Eden",
    "Eve",
    "Lookahead",
    "ScaledAdam",
    "StepDecay",
    "build_optimizer",
    "build_schedule",
]


def _optimizer_kwarg(cfg: OptimizerConfig, field: str) -> Any:
    value = getattr(cfg, field)
    if field == "betas":
        # The config may hold an omegaconf ListConfig; optimizers expect a pair of floats.
        betas = tuple(float(beta) for beta in value)
        if len(betas) != 2:  # noqa: PLR2004 (a pair)
            raise ConfigError(f"optimizer.betas: must have two entries, got {list(value)}")
        return betas
    return value


def build_optimizer(
    params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], cfg: OptimizerConfig
) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg.name`` over ``params``, wrapped in Lookahead if asked.

    Raises:
        ConfigError: unknown ``optimizer.name`` (the message lists the valid ones), SGD with
            ``optimizer.nesterov`` but no momentum or with dampening, an invalid
            ``optimizer.lookahead_k`` / ``optimizer.lookahead_alpha``, or a value the
            optimizer rejects (the message gives the name and the values passed).
    """
    if cfg.name not in _OPTIMIZERS:
        raise ConfigError(
            f"optimizer.name: unknown {cfg.name!r}; valid names: {', '.join(OPTIMIZER_NAMES)}"
        )
    if cfg.name == "SGD" and cfg.nesterov and (cfg.momentum <= 0.0 or cfg.dampening != 0.0):
        raise ConfigError(
            "optimizer.nesterov: true needs optimizer.momentum > 0 and optimizer.dampening = 0, "
            f"got momentum={cfg.momentum}, dampening={cfg.dampening}"
        )
    if cfg.lookahead_k < 0:
        raise ConfigError(f"optimizer.lookahead_k: must be >= 0, got {cfg.lookahead_k}")
    if cfg.lookahead_k > 0 and not 0.0 < cfg.lookahead_alpha <= 1.0:
        raise ConfigError(
            f"optimizer.lookahead_alpha: must be in (0, 1], got {cfg.lookahead_alpha}"
        )

    optimizer_class, fields = _OPTIMIZERS[cfg.name]
    kwargs = {field: _optimizer_kwarg(cfg, field) for field in fields}
    try:
        optimizer = optimizer_class(params, **kwargs)
    except ValueError as error:
        # The optimizer's own message names its argument; add where it came from.
        raise ConfigError(f"optimizer.name: {cfg.name} rejects {kwargs}: {error}") from error
    if cfg.lookahead_k > 0:
        optimizer = Lookahead(optimizer, k=cfg.lookahead_k, alpha=cfg.lookahead_alpha)
    return optimizer


def build_schedule(
    optimizer: torch.optim.Optimizer,
    cfg: ScheduleConfig,
    *,
    max_steps: int,
    steps_per_epoch: int,
) -> LRScheduler:
    """The learning-rate schedule named by ``cfg.name``; call its ``step()`` after each step.

    ``max_steps`` is the run's length (the end of the cosine decay) and ``steps_per_epoch``
    converts steps into Eden's epoch index.

    Raises:
        ConfigError: unknown ``schedule.name`` (the message lists the valid ones), a
            ``schedule.warmup_steps`` that the schedule cannot honour, or an invalid value of
            another schedule field (the message names the schedule).
    """
    _check_schedule(cfg)
    try:
        if cfg.name in ("constant", "warmup"):
            return Constant(optimizer, warmup_steps=cfg.warmup_steps)
        if cfg.name == "step":
            return StepDecay(
                optimizer,
                gamma=cfg.gamma,
                step_size=cfg.step_size,
                warmup_steps=cfg.warmup_steps,
            )
        if cfg.name == "cosine":
            return CosineDecay(
                optimizer,
                total_steps=max_steps,
                min_lr=cfg.min_lr,
                warmup_steps=cfg.warmup_steps,
            )
        return Eden(
            optimizer,
            lr_batches=cfg.eden_batches,
            lr_epochs=cfg.eden_epochs,
            steps_per_epoch=steps_per_epoch,
        )
    except ValueError as error:
        raise ConfigError(
            f"schedule.name: {cfg.name} with max_steps={max_steps}, "
            f"steps_per_epoch={steps_per_epoch}: {error}"
        ) from error


def _check_schedule(cfg: ScheduleConfig) -> None:
    """Refuse an unknown ``schedule.name`` and a ``warmup_steps`` the schedule cannot honour."""
    if cfg.name not in SCHEDULE_NAMES:
        raise ConfigError(
            f"schedule.name: unknown {cfg.name!r}; valid names: {', '.join(SCHEDULE_NAMES)}"
        )
    if cfg.warmup_steps < 0:
        raise ConfigError(f"schedule.warmup_steps: must be >= 0, got {cfg.warmup_steps}")
    if cfg.name == "warmup" and cfg.warmup_steps == 0:
        raise ConfigError("schedule.warmup_steps: must be > 0 with schedule.name=warmup")
    # Silently ignoring a requested warmup would hide a misconfigured run.
    if cfg.name == "constant" and cfg.warmup_steps > 0:
        raise ConfigError(
            f"schedule.warmup_steps: {cfg.warmup_steps} with schedule.name=constant; "
            "use schedule.name=warmup for a warmup followed by a constant lr"
        )
    if cfg.name == "eden" and cfg.warmup_steps > 0:
        raise ConfigError(
            f"schedule.warmup_steps: {cfg.warmup_steps} with schedule.name=eden; Eden has its own "
            "fixed warmup (0.5 -> 1 over 500 batches); set schedule.warmup_steps=0"
        )
