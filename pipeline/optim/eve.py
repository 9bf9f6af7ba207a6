"""Eve: AdamW whose weight decay switches off once a tensor is small enough.

Eve was introduced, unpublished, in the k2-fsa/icefall speech toolkit (Daniel Povey, 2022;
``optim.py`` of the pruned-transducer recipes, Apache-2.0). It is
meant for networks whose layers are nearly invariant to the absolute scale of their weights:
there, unconditional weight decay only shrinks weights until the effective learning rate blows
up. Eve instead pulls every non-scalar tensor towards a target root-mean-square value and
leaves it alone below it.

Update for one parameter tensor ``p`` (any shape) with gradient ``g`` at step ``t = 1, 2, ...``
(all operations elementwise, as in Adam, Kingma & Ba 2015, arXiv:1412.6980):

    m <- beta1 m + (1 - beta1) g
    v <- beta2 v + (1 - beta2) g^2
    if numel(p) > 1 and ||p||_2 > target_rms * sqrt(numel(p)):   # i.e. rms(p) > target_rms
        p <- (1 - weight_decay) p
    p <- p - lr / (1 - beta1^t) * m / (sqrt(v / (1 - beta2^t)) + eps)

The decay is decoupled from the gradient as in AdamW (Loshchilov & Hutter 2019,
arXiv:1711.05101) but, as in the seed, it is *not* multiplied by ``lr``: ``weight_decay`` is
the fraction removed per step. Scalars (``numel == 1``) are never decayed because in such
networks they are usually learned scales. The norm test uses ``p`` before this step's update.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


class Eve(torch.optim.Optimizer):
    """AdamW with weight decay applied only while a non-scalar tensor's rms exceeds target_rms.

    Args:
        params: tensors or parameter groups, as for any torch optimizer.
        lr: step size of the Adam part.
        betas: decay rates of the first and second gradient moments.
        eps: added to the root of the second moment to avoid division by zero.
        weight_decay: fraction of ``p`` removed per step while ``rms(p) > target_rms``; not
            scaled by ``lr``.
        target_rms: rms below which weight decay stops.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-8,
        weight_decay: float = 1e-3,
        target_rms: float = 0.1,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"Eve: lr must be >= 0, got {lr}")
        if eps < 0.0:
            raise ValueError(f"Eve: eps must be >= 0, got {eps}")
        if len(betas) != 2 or not all(0.0 <= beta < 1.0 for beta in betas):  # noqa: PLR2004 (a pair)
            raise ValueError(f"Eve: betas must be two values in [0, 1), got {betas}")
        if not 0.0 <= weight_decay < 1.0:
            raise ValueError(f"Eve: weight_decay must be in [0, 1), got {weight_decay}")
        if target_rms <= 0.0:
            raise ValueError(f"Eve: target_rms must be > 0, got {target_rms}")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            target_rms=target_rms,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Take one optimization step; ``closure`` re-evaluates the loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                state = self.state[param]
                if "step" not in state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
                state["step"] += 1
                step = state["step"]
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]

                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                denom = (exp_avg_sq.sqrt() / (1.0 - beta2**step) ** 0.5).add_(group["eps"])

                if param.numel() > 1:
                    # A 0/1 tensor instead of a Python bool keeps the test on the device (no sync).
                    norm_threshold = group["target_rms"] * param.numel() ** 0.5
                    is_above_target = (torch.linalg.vector_norm(param) > norm_threshold).to(
                        param.dtype
                    )
                    param.mul_(1.0 - group["weight_decay"] * is_above_target)

                param.addcdiv_(exp_avg, denom, value=-group["lr"] / (1.0 - beta1**step))
        return loss
