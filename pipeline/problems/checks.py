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


def _calls_by_module(model: nn.Module, probe: batching.Inputs) -> list[tuple[str, list, list]]:
    """One eval-mode call of ``model``: every module's name, input and output tensors, in the
    order the modules finish (a submodule before the module that calls it).
    """
    seen: list[tuple[str, list, list]] = []

    def hook(name: str):
        return lambda _module, args, output: seen.append(
            (name, _tensors_of(args), _tensors_of(output))
        )

    handles = [module.register_forward_hook(hook(name)) for name, module in model.named_modules()]
    try:
        batching.call_model(model, probe)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _tensors_of(value) -> list[torch.Tensor]:
    """The tensors of a module's inputs or output (a tensor, or a tuple, list or dict)."""
    if isinstance(value, torch.Tensor | tuple | list | dict):
        return [t for t in batching.tensors(value) if torch.is_tensor(t)]
    return []


def _differ(first: list, second: list) -> bool:
    return len(first) != len(second) or not all(
        a.shape == b.shape
        and torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-8, equal_nan=True)
        for a, b in zip(first, second, strict=True)
    )


def _describe(model: nn.Module, name: str) -> str:
    module = model.get_submodule(name)
    return f"{name!r} ({type(module).__name__})" if name else f"the model ({type(model).__name__})"


def _random_place(model: nn.Module, first: list, second: list) -> str | None:
    """Where two eval-mode calls first part: in a module's forward (its output differs, its
    input does not) or in its parent's forward before calling it (its input differs).
    """
    for (name, inputs_a, output_a), (other, inputs_b, output_b) in zip(first, second, strict=False):
        if name != other:  # e.g. a layer skipped at random
            return f"in the modules they call: {_describe(model, name)} against {other!r}"
        if _differ(inputs_a, inputs_b):
            parent = name.rpartition(".")[0]
            return (
                f"in the forward of {_describe(model, parent)}, before it calls "
                f"{_describe(model, name)}"
            )
        if _differ(output_a, output_b):
            return f"in the forward of {_describe(model, name)}"
    if len(first) != len(second):
        return "in how many modules they call"
    return None


@torch.no_grad()
def check_eval_deterministic(model: nn.Module, inputs: batching.Inputs) -> None:
    """Refuse a model whose eval-mode output on the first examples differs between two calls,
    naming where the calls first part (:func:`_random_place`).

    The probe draws from the global random generators inside ``torch.random.fork_rng``, so
    training sees the same random numbers as without it; the model's mode is restored.
    """
    probe = batching.chunk(inputs, 0, PROBE_EXAMPLES)
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            first, second = _calls_by_module(model, probe), _calls_by_module(model, probe)
    finally:
        model.train(was_training)
    place = _random_place(model, first, second)
    if place is not None:
        raise ConfigError(
            f"problem: two eval-mode calls on the same inputs differ, first {place}: "
            f"{RANDOM_IN_EVAL_HINT}"
        )
