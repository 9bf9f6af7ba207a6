"""Training-loop building blocks shared by the train and replay stages.

- :class:`BatchSchedule`: which examples form the batch of step t. Each epoch's order is
  a permutation drawn from a generator seeded by (seed, epoch), so the batch of any step
  is a pure function of the step: resuming from a snapshot at step t replays exactly the
  batches an uninterrupted run would have seen, with no sampler state to save.
- :func:`loss_and_gradient`: loss and gradient of one logical batch, accumulated over
  physical chunks (full-batch gradient descent on data that does not fit in one pass).
- :func:`evaluate`: loss and accuracy over a split.
- snapshots: model, optimizer, schedule and RNG state, written atomically.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hessov import batching
from hessov.errors import ConfigError, UnsafeFileError
from hessov.fileio import atomic_write
from hessov.paramstore import trainable_parameters
from hessov.problems import Problem

TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class BatchSchedule:
    """Batch of examples for each training step.

    Args:
        num_examples: size N of the training split.
        batch_size: examples per step; 0 means the full split every step (GD).
        seed: base seed of the epoch permutations.
    """

    num_examples: int
    batch_size: int
    seed: int

    def __post_init__(self):
        self._cached_epoch, self._cached_order = None, None
        if self.batch_size > self.num_examples:
            raise ConfigError(
                f"BATCH_SIZE={self.batch_size} exceeds the {self.num_examples} training examples"
            )

    @property
    def full_batch(self) -> bool:
        """Whether every step takes the whole split (gradient descent)."""
        return self.batch_size in (0, self.num_examples)

    @property
    def steps_per_epoch(self) -> int:
        """Steps per epoch: ``N // B`` (the examples left over are skipped), or 1 for full batch."""
        return 1 if self.full_batch else self.num_examples // self.batch_size

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The permutation ``(N,)`` of the training split used in ``epoch``."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_examples, generator=generator)

    def indices(self, step: int) -> torch.Tensor:
        """Example indices ``(B,)`` of the batch used for the update at ``step``."""
        if self.full_batch:
            return torch.arange(self.num_examples)
        epoch, position = divmod(step, self.steps_per_epoch)
        if self._cached_epoch != epoch:
            self._cached_order, self._cached_epoch = self.epoch_order(epoch), epoch
        return self._cached_order[position * self.batch_size : (position + 1) * self.batch_size]


def loss_and_gradient(
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: batching.Inputs,
    targets: torch.Tensor,
    chunk_size: int = 0,
) -> torch.Tensor:
    """Mean loss over ``inputs`` (``B`` examples, :mod:`hessov.batching`); gradients
    accumulated into ``.grad``.

    With ``chunk_size > 0`` the batch is processed in chunks of that many examples, each
    chunk's mean loss weighted by its share of the batch, so the result equals one pass.

    Returns:
        The mean loss, a 0-d tensor in the loss's dtype.
    """
    total = batching.num_examples(inputs)
    chunk = chunk_size if 0 < chunk_size < total else total
    loss_sum = None
    for start in range(0, total, chunk):
        x = batching.chunk(inputs, start, start + chunk)
        y = batching.chunk(targets, start, start + chunk)
        loss = batching.batch_loss(model, loss_fn, x, y) * (batching.num_examples(x) / total)
        loss.backward()
        # The first chunk's loss itself: the same bits as adding it to a zero.
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
    return loss_sum


#: Examples per forward pass of an evaluation.
EVAL_CHUNK = 2000


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: batching.Inputs,
    targets: torch.Tensor,
    num_classes: int,
    count: int = 0,
    chunk_size: int = EVAL_CHUNK,
) -> tuple[float, float | None]:
    """Mean loss and accuracy (None for unlabelled problems) over a split, in eval mode.

    Args:
        model: the network; put back in its mode afterwards.
        loss_fn: the problem's loss.
        inputs: the split's inputs, ``N`` examples (:mod:`hessov.batching`).
        targets: ``(N, ...)``, int64 labels ``(N,)`` for classification.
        num_classes: 0 for unlabelled problems (no accuracy).
        count: evaluate only the examples ``evaluation_indices(N, count)``
            (``EVAL_DATAPOINTS``); 0 or at least ``N``: the whole split.
        chunk_size: examples per forward pass.
    """
    was_training = model.training
    model.eval()
    size = batching.num_examples(inputs)
    indices = evaluation_indices(size, count).to(targets.device) if 0 < count < size else None
    loss_sum, correct, total = 0.0, 0, size if indices is None else count
    for start in range(0, total, chunk_size):
        if indices is None:
            x = batching.chunk(inputs, start, start + chunk_size)
            y = batching.chunk(targets, start, start + chunk_size)
        else:
            x = batching.take(inputs, indices[start : start + chunk_size])
            y = batching.take(targets, indices[start : start + chunk_size])
        loss, output = _loss_and_output(model, loss_fn, x, y, num_classes)
        loss_sum += float(loss) * batching.num_examples(x)
        if num_classes:
            correct += int((output.argmax(dim=1) == y).sum())
    model.train(was_training)
    return loss_sum / total, (correct / total if num_classes else None)


def evaluation_indices(size: int, count: int) -> torch.Tensor:
    """``count`` example indices spread evenly through a split of ``size``: ``(count,)`` int64,
    ``floor(i * size / count)``. A split stored class by class (an image folder) gives each
    class about its share of the split.
    """
    return torch.arange(count, dtype=torch.int64) * size // count


def _loss_and_output(model: nn.Module, loss_fn, inputs, targets, num_classes: int):
    """A chunk's mean loss and, for accuracy, the model's output (one forward pass, except
    for a :class:`~hessov.batching.ModelLoss`, which calls the model its own way).
    """
    if isinstance(loss_fn, batching.ModelLoss):
        output = batching.call_model(model, inputs) if num_classes else None
        return loss_fn(model, inputs, targets), output
    output = batching.call_model(model, inputs)
    return loss_fn(output, targets), output


def flat_gradient(
    model: nn.Module, loss_fn: nn.Module, inputs: batching.Inputs, targets: torch.Tensor, chunk: int
) -> torch.Tensor:
    """Full gradient ``(D,)`` of the mean loss over ``inputs`` w.r.t. the trainable
    parameters, model in eval mode (the same function whose Hessian the sketch stages
    measure).
    """
    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    loss_and_gradient(model, loss_fn, inputs, targets, chunk)
    params = trainable_parameters(model)
    grad = torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
    )
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return grad


def set_cpu_threads(threads: int) -> int:
    """Set torch's intra-op CPU threads: ``threads``, or for 0 the Slurm allocation
    (``$SLURM_CPUS_PER_TASK``) or all cores. Small networks run fastest on one thread
    (bench/RESULTS.md); oversubscribed cores make multi-threaded steps many times slower.
    """
    if threads == 0:
        threads = int(os.environ.get("SLURM_CPUS_PER_TASK") or os.cpu_count() or 1)
    torch.set_num_threads(threads)
    return threads


def to_device(problem: Problem, device: str, dtype: str) -> None:
    """Move the problem's model and data to ``device`` in ``dtype``, in place: the model's
    floating parameters and buffers and the data's floating tensors take ``dtype``, integer
    tensors (token ids, labels) keep theirs.
    """
    torch_dtype = TORCH_DTYPES[dtype]
    problem.model.to(device=device, dtype=torch_dtype)
    for split in (problem.train, problem.test):
        split.inputs = batching.to_device(split.inputs, device, torch_dtype)
        split.targets = batching.to_device(split.targets, device, torch_dtype)
    if problem.exact_hessian is not None:
        problem.exact_hessian = problem.exact_hessian.to(dtype=torch.float64)


def save_snapshot(path: Path, step: int, model, optimizer, schedule=None) -> None:
    """Write model, optimizer (and its class name), schedule (``{}`` without one) and RNG
    state at ``step`` (before its update).

    Only tensors and plain values, so that :func:`load_snapshot` reads it with
    ``weights_only=True``.
    """
    state = {
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "optimizer_class": type(optimizer).__name__,
        "schedule": {} if schedule is None else schedule.state_dict(),
        "torch_rng": torch.get_rng_state(),
    }
    with atomic_write(path) as tmp:
        torch.save(state, tmp)


def load_snapshot(path: Path, device: str = "cpu") -> dict:
    """Read a snapshot written by :func:`save_snapshot`, unpickling tensors and plain values
    only: run directories often sit on shared file systems, and a pickle can run any code.

    Raises:
        UnsafeFileError: the file holds other objects (not a hessov snapshot, or tampered
            with); nothing of it is executed.
    """
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()[0]
        raise UnsafeFileError(
            f"{path}: refused to load; it holds objects other than tensors and plain values "
            f"({reason}). hessov's snapshots never do: it was written by something else or "
            "changed since."
        ) from None
