"""Lookahead: k fast steps with any optimizer, then one step back towards slow weights.

Zhang, Lucas, Hinton & Ba 2019, "Lookahead Optimizer: k steps forward, 1 step back"
(arXiv:1907.08610). With fast weights ``theta`` (the
model's parameters, moved by the inner optimizer) and slow weights ``phi`` (a copy kept here),
starting from ``phi = theta``:

    every step:           theta <- inner_optimizer_step(theta)
    after every k steps:  phi <- phi + alpha (theta - phi);   theta <- phi

The slow weights are captured lazily, just before the first step that touches a parameter, so
parameters added later with ``add_param_group`` are covered too.

To a learning-rate scheduler this object is the optimizer: it shares the very
``param_groups`` list of the inner optimizer, so changing ``group["lr"]`` here changes the
inner optimizer's step. ``state_dict()`` holds the inner optimizer's state dict, the slow
weights and the position within the current k-step cycle, so a resumed run continues
bit-identically.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch


class Lookahead(torch.optim.Optimizer):
    """Wrap ``inner_optimizer``: every ``k`` steps, pull the weights back towards slow weights.

    Args:
        inner_optimizer: the optimizer taking the fast steps; its param_groups are shared.
        k: number of fast steps between two synchronizations.
        alpha: fraction of the way the slow weights move towards the fast ones, in (0, 1].
    """

    def __init__(self, inner_optimizer: torch.optim.Optimizer, k: int = 5, alpha: float = 0.5):
        if k < 1:
            raise ValueError(f"Lookahead: k must be >= 1, got {k}")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"Lookahead: alpha must be in (0, 1], got {alpha}")
        self.inner_optimizer = inner_optimizer
        self.k = k
        self.alpha = alpha
        self.fast_steps = 0
        # The base class registers the inner group dicts themselves (it does not copy them);
        # sharing the list object as well keeps later add_param_group calls visible to both.
        super().__init__(inner_optimizer.param_groups, inner_optimizer.defaults)
        self.param_groups = inner_optimizer.param_groups

    def _params(self) -> list[torch.Tensor]:
        return [param for group in self.param_groups for param in group["params"]]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One fast step of the inner optimizer; every k-th step also synchronizes."""
        for param in self._params():
            if "slow_param" not in self.state[param]:
                self.state[param]["slow_param"] = param.detach().clone()

        # The inner step runs the closure under enable_grad itself.
        loss = self.inner_optimizer.step(closure)

        self.fast_steps += 1
        if self.fast_steps % self.k == 0:
            for param in self._params():
                slow_param = self.state[param]["slow_param"]
                slow_param.add_(param - slow_param, alpha=self.alpha)
                param.copy_(slow_param)
        return loss

    def state_dict(self) -> dict[str, Any]:
        """Inner state dict, slow weights by parameter index, and the step count."""
        slow_params = {
            index: self.state[param]["slow_param"]
            for index, param in enumerate(self._params())
            if "slow_param" in self.state[param]
        }
        return {
            "inner_optimizer": self.inner_optimizer.state_dict(),
            "slow_params": slow_params,
            "fast_steps": self.fast_steps,
            "k": self.k,
            "alpha": self.alpha,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; parameters are matched by position."""
        self.inner_optimizer.load_state_dict(state_dict["inner_optimizer"])
        # Loading replaces the inner param_groups list; share the new one again.
        self.param_groups = self.inner_optimizer.param_groups
        params = self._params()
        self.state = defaultdict(dict)
        for index, slow_param in state_dict["slow_params"].items():
            param = params[index]
            # A copy, so that training on does not write into the caller's state dict.
            self.state[param]["slow_param"] = slow_param.to(
                device=param.device, dtype=param.dtype, copy=True
            )
        self.fast_steps = state_dict["fast_steps"]
        self.k = state_dict["k"]
        self.alpha = state_dict["alpha"]
