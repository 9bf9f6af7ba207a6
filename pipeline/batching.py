"""Model inputs of any structure: a tensor, a tuple of tensors or a dict of tensors.

A problem's inputs are what its model is called with: ``model(inputs)`` for a tensor,
``model(*inputs)`` for a tuple, ``model(**inputs)`` for a dict. Every tensor in them holds
one row per example (the example dimension first), so taking examples, slicing a chunk and
moving to a device act on every tensor alike. Only floating tensors take the run's dtype:
integer tensors (token ids, masks, labels) keep theirs. Targets go through the same
functions (they are usually one tensor). Every stage that touches data goes through this
module: the training loop, the chunked gradient, evaluation, the Hessian operator, the
Hessian subsets and the replays.

A tensor too large for memory (ImageNet's 1.28M training images are 770 GB in float32) can be
a :class:`LazyRows` instead: it reads only the examples that are taken, when they are taken.
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

#: Index tensors a :class:`LazyRows` takes.
INDEX_DTYPES = (torch.int64, torch.int32)


class LazyRows(ABC):
    """Examples ``(N, *row_shape)`` read on demand, in place of a tensor held in memory.

    It answers what hessov asks of an input tensor: ``rows[index]`` with an int64 tensor
    ``(n,)`` or a slice returns a real tensor ``(n, *row_shape)`` on :attr:`device` in
    :attr:`dtype`; :attr:`shape`; ``rows.to(device=..., dtype=...)`` returns a copy that reads
    to there. A subclass implements :meth:`read`. Its values are not scanned for NaN or inf
    (that would read every example), so a subclass must produce finite values by construction.

    Args:
        count: ``N``, the number of examples.
        row_shape: the shape of one example.
    """

    def __init__(self, count: int, row_shape: Sequence[int]):
        self.count, self.row_shape = count, tuple(row_shape)
        self.device, self.dtype = torch.device("cpu"), torch.float32

    @abstractmethod
    def read(self, indices: list[int]) -> torch.Tensor:
        """The examples ``indices``, in that order: float32 ``(n, *row_shape)`` on the CPU."""

    @property
    def shape(self) -> torch.Size:
        """``(N, *row_shape)``."""
        return torch.Size((self.count, *self.row_shape))

    @property
    def ndim(self) -> int:
        """``1 + len(row_shape)``."""
        return 1 + len(self.row_shape)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: torch.Tensor | slice) -> torch.Tensor:
        if isinstance(index, slice):
            indices = list(range(*index.indices(self.count)))
        elif isinstance(index, torch.Tensor) and index.ndim == 1 and index.dtype in INDEX_DTYPES:
            indices = index.cpu().tolist()
        else:  # a boolean mask, too, which tolist() would turn into the indices 0 and 1
            raise TypeError(f"{type(self).__name__} takes a slice or an int64 index tensor (n,)")
        if any(not -self.count <= i < self.count for i in indices):
            raise IndexError(f"index out of range for {self.count} examples")
        rows = self.read([i % self.count for i in indices])
        return rows.to(device=self.device, dtype=self.dtype)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        """A copy that returns its rows on ``device`` in ``dtype`` (each kept when None);
        ``rows.to(torch.float64)`` sets the dtype, as for a tensor.
        """
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        moved = copy.copy(self)
        moved.device = torch.device(device) if device is not None else self.device
        moved.dtype = dtype or self.dtype
        return moved

    def is_floating_point(self) -> bool:
        """True: the rows are floating tensors, which take the run's dtype."""
        return True


#: A model's inputs: one tensor, a tuple of tensors or a dict of tensors, examples first; any
#: tensor may be a :class:`LazyRows`.
Inputs = torch.Tensor | LazyRows | tuple[torch.Tensor, ...] | dict[str, torch.Tensor]


def map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], inputs: Inputs) -> Inputs:
    """``inputs`` with ``fn`` applied to every tensor, keeping the structure (a list becomes a
    tuple).
    """
    if isinstance(inputs, torch.Tensor | LazyRows):
        return fn(inputs)
    if isinstance(inputs, Mapping):
        return {key: fn(value) for key, value in inputs.items()}
    if isinstance(inputs, tuple | list):
        return tuple(fn(value) for value in inputs)
    raise TypeError(
        f"inputs must be a tensor, a tuple or a dict of tensors, got {type(inputs).__name__}"
    )


def tensors(inputs: Inputs) -> list[torch.Tensor]:
    """The tensors of ``inputs``, in order (a dict's in its key order)."""
    if isinstance(inputs, torch.Tensor | LazyRows):
        return [inputs]
    values = inputs.values() if isinstance(inputs, Mapping) else inputs
    return list(values)


def num_examples(inputs: Inputs) -> int:
    """``N``, the length of the first tensor's first dimension."""
    return tensors(inputs)[0].shape[0]


def take(inputs: Inputs, index: torch.Tensor) -> Inputs:
    """The examples ``index`` ``(n,)`` (int64, on the tensors' device), in that order."""
    return map_tensors(lambda tensor: tensor[index], inputs)


def chunk(inputs: Inputs, start: int, stop: int) -> Inputs:
    """The examples ``start:stop``, as views (read, for a :class:`LazyRows`)."""
    return map_tensors(lambda tensor: tensor[start:stop], inputs)


def chunks(inputs: Inputs, size: int) -> list[Inputs]:
    """Consecutive chunks of at most ``size`` examples (the last may be shorter), as views."""
    total = num_examples(inputs)
    return [chunk(inputs, start, start + size) for start in range(0, total, size)]


def to_device(inputs: Inputs, device: str | torch.device, dtype: torch.dtype) -> Inputs:
    """``inputs`` on ``device``, floating tensors cast to ``dtype``, the others unchanged."""

    def move(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.is_floating_point():
            return tensor.to(device=device, dtype=dtype)
        return tensor.to(device=device)

    return map_tensors(move, inputs)


def call_model(model: nn.Module, inputs: Inputs) -> Any:
    """``model(inputs)``, ``model(*inputs)`` for a tuple, ``model(**inputs)`` for a dict."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple | list):
        return model(*inputs)
    return model(inputs)


class ModelLoss:
    """A loss that takes the model and the batch, for objectives other than
    ``loss(model(inputs), targets)``: a language model's next-token loss over the inputs
    alone, a loss that reads several outputs or adds a term of the parameters.

    ``hessov.Problem(model=..., loss=hessov.ModelLoss(fn), ...)`` with
    ``fn(model, inputs, targets) -> loss``, a 0-d tensor: the **mean** over the batch's
    examples (hessov weights chunks of a batch by their share of it). The model is called by
    ``fn`` itself, in whatever mode hessov has put it in (eval for every Hessian).

    Args:
        fn: ``(model, inputs, targets) -> mean loss``.
    """

    #: What :func:`hessov.problems.checks.check_loss` reads: ``fn`` must return a mean.
    reduction = "mean"

    def __init__(self, fn: Callable[[nn.Module, Inputs, torch.Tensor], torch.Tensor]):
        self.fn = fn

    def __call__(self, model: nn.Module, inputs: Inputs, targets: torch.Tensor) -> torch.Tensor:
        """The mean loss of the batch ``(inputs, targets)`` under ``model``."""
        return self.fn(model, inputs, targets)


def batch_loss(model: nn.Module, loss_fn, inputs: Inputs, targets: torch.Tensor) -> torch.Tensor:
    """The mean loss of one batch: ``loss_fn(model(inputs), targets)``, or for a
    :class:`ModelLoss` ``loss_fn(model, inputs, targets)``.
    """
    if isinstance(loss_fn, ModelLoss):
        return loss_fn(model, inputs, targets)
    return loss_fn(call_model(model, inputs), targets)


def non_finite_count(inputs: Inputs) -> int:
    """How many values of the floating tensors of ``inputs`` are NaN or infinite (a
    :class:`LazyRows` is finite by its contract, and not read).
    """
    return sum(
        int((~torch.isfinite(tensor)).sum())
        for tensor in tensors(inputs)
        if isinstance(tensor, torch.Tensor) and (tensor.is_floating_point() or tensor.is_complex())
    )


def resident_bytes(inputs: Inputs) -> int:
    """Bytes ``inputs`` hold in memory (nothing for a :class:`LazyRows`)."""
    return sum(
        tensor.numel() * tensor.element_size()
        for tensor in tensors(inputs)
        if isinstance(tensor, torch.Tensor)
    )


def example_bytes(inputs: Inputs) -> int:
    """Bytes of one example of ``inputs`` once in memory (a :class:`LazyRows` in its dtype)."""
    total = 0
    for tensor in tensors(inputs):
        itemsize = torch.empty(0, dtype=tensor.dtype).element_size()
        total += math.prod(tensor.shape[1:]) * itemsize
    return total
