"""Loss modules usable both for training and by curvlinops.

curvlinops normalises mini-batch contributions through the loss module's ``reduction``
attribute (``"mean"``: each batch weighted by its size over the data size), and makes the
loss functional through ``named_parameters``: so every loss here is an ``nn.Module`` with
``reduction = "mean"`` that returns the mean over the batch of the per-example loss.
"""

from __future__ import annotations

import torch
from torch import nn


class HalfSquaredLoss(nn.Module):
    """``0.5 * sum_j (out_j - target_j)^2``, averaged over the batch.

    For classification the integer labels are turned into one-hot targets, as in
    Cohen et al. 2021 (their "mse" loss). Inputs: ``(N, C)`` outputs,
    ``(N,)`` int64 labels or ``(N, C)`` float targets.
    """

    reduction = "mean"

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The mean loss, a 0-d tensor."""
        if target.dtype in (torch.int64, torch.int32):
            target = nn.functional.one_hot(target, output.shape[1]).to(output.dtype)
        return 0.5 * (output - target).pow(2).sum() / output.shape[0]


class HalfSquaredNorm(nn.Module):
    """``0.5 * sum_j out_j^2``, averaged over the batch; the target is ignored (the noisy
    quadratic model, whose network already outputs the scaled residual).
    """

    reduction = "mean"

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The mean loss, a 0-d tensor; ``target`` is unused."""
        return 0.5 * output.pow(2).sum() / output.shape[0]


class MeanOfOutput(nn.Module):
    """For models that output their per-example loss (``quadratic_deep``): the batch mean."""

    reduction = "mean"

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The mean of the per-example losses ``output`` ``(N,)``; ``target`` is unused."""
        return output.mean()


def cross_entropy() -> nn.Module:
    """Cross-entropy with mean reduction (the paper's loss)."""
    return nn.CrossEntropyLoss(reduction="mean")
