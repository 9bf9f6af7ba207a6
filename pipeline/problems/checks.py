"""Checks that a problem's Hessian is one the pipeline can measure, before any training.

Each check raises :class:`~hessov.errors.ConfigError` with the key ``problem:`` and a message
that says what to change: a loss that does not average over the examples (the stages weight
chunks of data by their share, which is right only for a mean), data holding NaN or inf,
and a model whose eval-mode forward pass is still random (the Hessian must be a fixed
matrix: two passes over the data must agree).
"""

from __future__ import annotations

import torch
from torch import nn

from hessov import batching
from hessov.errors import ConfigError
from hessov.skerch_ext.operator import RANDOM_IN_EVAL_HINT

#: Examples the eval-mode determinism probe runs the model on.
PROBE_EXAMPLES = 8


def check_loss(loss: nn.Module) -> None:
    """Refuse a loss whose ``reduction`` attribute is anything but ``'mean'``."""
    reduction = getattr(loss, "reduction", "mean")
    if reduction != "mean":
        raise ConfigError(
            f"problem: the loss {type(loss).__name__} has reduction={reduction!r}; the Hessian "
            "is that of the mean loss over the examples: build the loss with reduction='mean'"
        )


def check_finite(split: str, inputs: batching.Inputs, targets: torch.Tensor) -> None:
    """Refuse NaN or inf in the floating tensors of a split, naming the split."""
    for part, data in (("inputs", inputs), ("targets", targets)):
        count = batching.non_finite_count(data)
        if count:
            raise ConfigError(
                f"problem: the {split} split's {part} hold {count} NaN or inf values; clean "
                "or drop those examples before building the Problem"
            )


@torch.no_grad()
def check_eval_deterministic(model: nn.Module, inputs: batching.Inputs) -> None:
    """Refuse a model whose eval-mode output on the first examples differs between two calls.

    The probe draws from the global random generators inside ``torch.random.fork_rng``, so
    training sees the same random numbers as without it; the model's mode is restored.
    """
    probe = batching.chunk(inputs, 0, PROBE_EXAMPLES)
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            first = batching.call_model(model, probe)
            second = batching.call_model(model, probe)
    finally:
        model.train(was_training)
    pairs = zip(batching.tensors(first), batching.tensors(second), strict=True)
    same = all(
        not isinstance(a, torch.Tensor)
        or torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-8, equal_nan=True)
        for a, b in pairs
    )
    if not same:
        raise ConfigError(
            f"problem: two eval-mode calls on the same inputs differ: {RANDOM_IN_EVAL_HINT}"
        )
