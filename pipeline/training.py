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
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.errors import ConfigError
from pipeline.fileio import atomic_write
from pipeline.problems import Problem

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
    inputs: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int = 0,
) -> torch.Tensor:
    """Mean loss over ``inputs`` ``(B, ...)``; gradients accumulated into ``.grad``.

    With ``chunk_size > 0`` the batch is processed in chunks of that many examples, each
    chunk's mean loss weighted by its share of the batch, so the result equals one pass.
    """
    total = inputs.shape[0]
    chunk = chunk_size if 0 < chunk_size < total else total
    loss_sum = torch.zeros((), dtype=inputs.dtype, device=inputs.device)
    for start in range(0, total, chunk):
        x, y = inputs[start : start + chunk], targets[start : start + chunk]
        loss = loss_fn(model(x), y) * (x.shape[0] / total)
        loss.backward()
        loss_sum += loss.detach()
    return loss_sum


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    num_classes: int,
    chunk_size: int = 2000,
) -> tuple[float, float | None]:
    """Mean loss and accuracy (None for unlabelled problems) over a split, in eval mode."""
    was_training = model.training
    model.eval()
    loss_sum, correct, total = 0.0, 0, inputs.shape[0]
    for start in range(0, total, chunk_size):
        x, y = inputs[start : start + chunk_size], targets[start : start + chunk_size]
        output = model(x)
        loss_sum += float(loss_fn(output, y)) * x.shape[0]
        if num_classes:
            correct += int((output.argmax(dim=1) == y).sum())
    model.train(was_training)
    return loss_sum / total, (correct / total if num_classes else None)


def flat_gradient(
    model: nn.Module, loss_fn: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, chunk: int
) -> torch.Tensor:
    """Full gradient ``(D,)`` of the mean loss over ``inputs``, model in eval mode
    (the same function whose Hessian the sketch stages measure).
    """
    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    loss_and_gradient(model, loss_fn, inputs, targets, chunk)
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
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
    """Move the problem's model and data to ``device`` in ``dtype``, in place."""
    torch_dtype = TORCH_DTYPES[dtype]
    problem.model.to(device=device, dtype=torch_dtype)
    for split in (problem.train, problem.test):
        split.images = split.images.to(device=device, dtype=torch_dtype)
        split.labels = split.labels.to(device=device)
    if problem.exact_hessian is not None:
        problem.exact_hessian = problem.exact_hessian.to(dtype=torch.float64)


def save_snapshot(path: Path, step: int, model, optimizer, schedule) -> None:
    """Write model, optimizer, schedule and RNG state at ``step`` (before its update)."""
    state = {
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "torch_rng": torch.get_rng_state(),
    }
    with atomic_write(path) as tmp:
        torch.save(state, tmp)


def load_snapshot(path: Path, device: str) -> dict:
    """Read a snapshot written by :func:`save_snapshot`."""
    return torch.load(path, map_location=device, weights_only=False)
