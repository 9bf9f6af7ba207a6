"""Learning-rate schedules in closed form, stepped once per training step.

Every schedule here gives each parameter group's learning rate as a function of that group's
base learning rate ``base`` (its lr when the schedule was created) and the step index ``s``:
the number of optimizer steps taken so far, so ``s = 0`` sets the lr of the first step. They are
torch ``LRScheduler``s: call ``schedule.step()`` after every ``optimizer.step()``.

With ``W = warmup_steps`` a linear warmup ``lr = base * (s + 1) / W`` for ``s < W`` is prepended
to Constant, StepDecay and CosineDecay, whose own clock ``t = s - W`` then starts at 0:

- Constant:    ``lr = base``.
- StepDecay:   ``lr = base * gamma ** (t // step_size)``.
- CosineDecay: ``lr = min_lr + (base - min_lr) * (1 + cos(pi * min(t, T) / T)) / 2`` with
  ``T = total_steps - W``, reaching ``min_lr`` at ``s = total_steps`` and staying there
  (Loshchilov & Hutter 2017, "SGDR", arXiv:1608.03983, without restarts).
- Eden (k2-fsa/icefall, Daniel Povey 2022), with batch index
  ``b = s`` and epoch ``e = s // steps_per_epoch``::

      lr = base * ((b^2 + B^2) / B^2) ** -0.25 * ((e^2 + E^2) / E^2) ** -0.25 * warmup(b)
      warmup(b) = 0.5 + 0.5 * min(b, 500) / 500

  i.e. flat for ``b << B`` and ``e << E``, then decaying like ``b^-0.5`` and ``e^-0.5``. The
  warmup factor rising from 0.5 to 1 over the first 500 batches is part of the definition; it
  is not the prepended linear warmup.

Resuming: ``state_dict()`` holds plain numbers only; ``load_state_dict()`` also re-applies the
restored step's learning rates to the optimizer, so a resumed run gets the right lr whether the
optimizer state is loaded before or after the schedule is built.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

EDEN_WARMUP_BATCHES = 500
EDEN_WARMUP_START = 0.5


class ClosedFormSchedule(LRScheduler):
    """A schedule whose lr is ``lr_at(base_lr, step)``; subclasses define ``lr_at``."""

    def lr_at(self, base_lr: float, step: int) -> float:
        """The learning rate of step ``step`` (0-based) for a group whose base lr is ``base_lr``."""
        raise NotImplementedError

    def get_lr(self) -> list[float]:
        """The learning rates of the current step, one per parameter group."""
        return [self.lr_at(base_lr, self.last_epoch) for base_lr in self.base_lrs]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the schedule and set the optimizer's lrs to those of the restored step."""
        super().load_state_dict(state_dict)
        # Building a schedule resets the optimizer's lr to that of step 0; undo that here.
        learning_rates = self.get_lr()
        for group, learning_rate in zip(self.optimizer.param_groups, learning_rates, strict=True):
            group["lr"] = learning_rate
        self._last_lr = learning_rates


class _LinearWarmupThen(ClosedFormSchedule):
    """Linear warmup over ``warmup_steps``, then ``lr_after_warmup(base_lr, step - W)``."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int) -> None:
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        # Attributes first: the base constructor already evaluates the lr of step 0.
        self.warmup_steps = warmup_steps
        super().__init__(optimizer)

    def lr_after_warmup(self, base_lr: float, steps_after_warmup: int) -> float:
        """The learning rate ``steps_after_warmup`` steps after the end of the warmup."""
        raise NotImplementedError

    def lr_at(self, base_lr: float, step: int) -> float:
        """Linear warmup for ``step < W``, then :meth:`lr_after_warmup` of ``step - W``."""
        if step < self.warmup_steps:
            return base_lr * (step + 1) / self.warmup_steps
        return self.lr_after_warmup(base_lr, step - self.warmup_steps)


class Constant(_LinearWarmupThen):
    """``lr = base`` after an optional linear warmup (the ``warmup`` schedule)."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int = 0) -> None:
        super().__init__(optimizer, warmup_steps)

    def lr_after_warmup(self, base_lr: float, steps_after_warmup: int) -> float:
        """``base``, whatever the step."""
        return base_lr


class StepDecay(_LinearWarmupThen):
    """``lr = base * gamma ** (t // step_size)``, ``t`` counted from the end of the warmup."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        gamma: float,
        step_size: int,
        warmup_steps: int = 0,
    ) -> None:
        if step_size < 1:
            raise ValueError(f"step_size must be >= 1, got {step_size}")
        if gamma <= 0.0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        self.gamma = gamma
        self.step_size = step_size
        super().__init__(optimizer, warmup_steps)

    def lr_after_warmup(self, base_lr: float, steps_after_warmup: int) -> float:
        """``base * gamma ** (t // step_size)``."""
        return base_lr * self.gamma ** (steps_after_warmup // self.step_size)


class CosineDecay(_LinearWarmupThen):
    """Half a cosine from ``base`` down to ``min_lr``, ending at step ``total_steps``."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        min_lr: float = 0.0,
        warmup_steps: int = 0,
    ) -> None:
        if total_steps <= warmup_steps:
            raise ValueError(
                f"total_steps ({total_steps}) must exceed warmup_steps ({warmup_steps})"
            )
        if min_lr < 0.0:
            raise ValueError(f"min_lr must be >= 0, got {min_lr}")
        self.total_steps = total_steps
        self.min_lr = min_lr
        super().__init__(optimizer, warmup_steps)

    def lr_after_warmup(self, base_lr: float, steps_after_warmup: int) -> float:
        """Half a cosine from ``base`` to ``min_lr`` over ``total_steps - W``, then ``min_lr``."""
        decay_steps = self.total_steps - self.warmup_steps
        progress = min(steps_after_warmup, decay_steps) / decay_steps
        return self.min_lr + (base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class Eden(ClosedFormSchedule):
    """The Eden schedule: decays with both the batch and the epoch index (see module doc)."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        lr_batches: float,
        lr_epochs: float,
        steps_per_epoch: int,
    ) -> None:
        if lr_batches <= 0.0 or lr_epochs <= 0.0:
            raise ValueError(
                f"lr_batches and lr_epochs must be > 0, got {lr_batches} and {lr_epochs}"
            )
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        self.lr_batches = lr_batches
        self.lr_epochs = lr_epochs
        self.steps_per_epoch = steps_per_epoch
        super().__init__(optimizer)

    def lr_at(self, base_lr: float, step: int) -> float:
        """Eden's lr at batch ``b = step`` and epoch ``e = step // steps_per_epoch``."""
        batch, epoch = step, step // self.steps_per_epoch
        batch_factor = ((batch**2 + self.lr_batches**2) / self.lr_batches**2) ** -0.25
        epoch_factor = ((epoch**2 + self.lr_epochs**2) / self.lr_epochs**2) ** -0.25
        warmup_factor = EDEN_WARMUP_START + (1.0 - EDEN_WARMUP_START) * (
            min(batch, EDEN_WARMUP_BATCHES) / EDEN_WARMUP_BATCHES
        )
        return base_lr * batch_factor * epoch_factor * warmup_factor
