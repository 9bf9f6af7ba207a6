"""Structured run configuration: schema, loading, overrides and validation.

A run's configuration is assembled in one fixed order, later layers winning:

1. the schema defaults below (:class:`RunConfig`);
2. the problem's file ``config/problems/<problem>.yaml``;
3. the tuning defaults for that problem and optimizer (``config/tuning.yaml``,
   like the paper's ``basic_config``);
4. a preset (``config/presets/<preset>.yaml``), when ``preset=`` is given;
5. ``KEY=VALUE`` overrides from the command line (omegaconf dotlist).

The result is validated (:func:`validate`) before any work starts: an unknown key,
a wrong type or an impossible value raises :class:`ConfigError` naming the key.
The resolved configuration is saved in the run directory, and every later stage
reads it from there, so a stage never re-derives what training used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or impossible; the message names the key."""


@dataclass
class OptimizerConfig:
    """Which optimizer trains the network, and its hyperparameters.

    ``name`` is one of torch's SGD, Adam, AdamW, RMSprop, Adagrad, NAdam, RAdam, or
    ours: Eve, ScaledAdam. ``lookahead_k > 0`` wraps any of them in Lookahead.
    Fields an optimizer does not use are ignored by it.
    """

    name: str = "SGD"
    lr: float = 0.1
    momentum: float = 0.0
    nesterov: bool = False
    dampening: float = 0.0
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    alpha: float = 0.99  # RMSprop smoothing constant
    # Eve: weight decay applies only while ||p|| > target_rms * sqrt(numel).
    target_rms: float = 0.1
    # ScaledAdam
    scalar_lr_scale: float = 0.1
    clipping_scale: float = 2.0
    param_min_rms: float = 1e-5
    # Lookahead: k fast steps, then slow <- slow + lookahead_alpha * (fast - slow).
    lookahead_k: int = 0
    lookahead_alpha: float = 0.5


@dataclass
class ScheduleConfig:
    """Learning-rate schedule, stepped once per training step.

    ``name``: constant | step | cosine | warmup | eden.
    - step: lr * gamma ** (step // step_size)
    - cosine: cosine decay from lr to min_lr over the run's MAX_STEPS
    - warmup: linear warmup over warmup_steps, then constant
    - eden: the Eden schedule (REFERENCE section 7) with eden_batches, eden_epochs
    ``warmup_steps`` also prepends a linear warmup to step and cosine.
    """

    name: str = "constant"
    gamma: float = 0.1
    step_size: int = 1000
    min_lr: float = 0.0
    warmup_steps: int = 0
    eden_batches: float = 5000.0
    eden_epochs: float = 6.0
