"""ScaledAdam: Adam with steps relative to each tensor's size and a learned per-tensor scale.

Where it comes from. The k2-fsa/icefall speech toolkit (Daniel Povey, 2022, Apache-2.0) grew a line
of experimental optimizers: Eve (see ``eve.py``), then Cain and LearnedGradient, then ScaledAdam,
used by its Zipformer models (Yao et al. 2024, "Zipformer: A faster and better encoder for automatic
speech recognition", arXiv:2310.11230). The ideas kept here: a parameter update should be a
*relative* change, proportional to the tensor's root-mean-square value, so one learning rate suits
tensors of very different magnitudes; the magnitude itself is learned separately, as a log-scale;
and gradients are clipped against their own recent history instead of an absolute threshold.

What this class does, exactly. Let ``P = 4`` (``SCALE_UPDATE_PERIOD``) and, for each step:

1. Clipping (global, over every parameter that has a gradient). ``n = ||concat(grads)||_2``
   is appended to a ring buffer of the last ``grad_norm_window`` norms (this step's included).
   With ``T = clipping_scale * median(buffer)`` (``torch.median``: for an even count the lower
   of the two middle values), every gradient used below is ``g = grad * min(1, T / n)``.
   The first step is never clipped, since then ``median == n``. ``clipping_scale = 0``
   disables clipping.
2. Scalar parameters (``numel == 1``): a bias-corrected Adam step with step size
   ``lr * scalar_lr_scale``; no rms scaling, no learned scale.
3. Tensors (``numel > 1``), at their step ``t = 0, 1, ...`` (``t`` counts steps taken before):

   - on the first step, ``param_rms = max(rms(p), param_min_rms)``;
   - ``s_t = sum(p * g)``, the derivative of the loss with respect to a log-scale ``c`` in
     ``p = p_unit * exp(c)``, is stored in slot ``t mod P`` of a length-``P`` buffer;
   - every ``P``-th step (``t mod P == P - 1``; ``k = (t + 1) / P`` is the count of such
     updates), the log-scale takes one step from the buffer's ``P`` values ``s``, with a
     second moment of its own and no first moment (averaging ``P`` steps already smooths)::

         w = beta2^P                                   (decay per scale update)
         u <- w u + (1 - w) mean(s^2)
         lr_c = lr * scalar_lr_scale * P               (one update stands for P steps)
         dc = -lr_c * mean(s) / (sqrt(u / (1 - w^k)) + eps)
         dc = +lr_c if rms(p) < param_min_rms;  dc = -lr_c if rms(p) > param_max_rms
         p <- p * exp(dc);   param_rms <- max(rms(p), param_min_rms)

     so ``param_rms`` is refreshed exactly every ``P`` steps and held fixed in between;
   - then a bias-corrected, elementwise Adam step scaled by the tensor's rms::

         m <- beta1 m + (1 - beta1) g;   v <- beta2 v + (1 - beta2) g^2
         p <- p - lr * param_rms * (m / (1 - beta1^(t+1))) / (sqrt(v / (1 - beta2^(t+1))) + eps)

   There is no weight decay: the learned scale and the rms limits play its role.

How this differs from the seed, which is unfinished and does not run. Kept from its
LearnedGradient: the per-tensor ``param_rms`` refreshed every ``P`` steps, the scale gradient
``sum(p * g)`` buffered over ``P`` steps with ``beta2^P`` and ``lr_c`` as above, and the forced
scale step outside ``[param_min_rms, param_max_rms]`` (the seed's default maximum is 2.0, 3.0
here). Left out: LearnedGradient's learned per-dimension learning-rate matrices and per-element
step clamping; Cain's per-element rms factorized over the tensor's axes, its scale update at
every step routed through the momentum buffer, and its clamping of parameters to
``[-param_max, param_max]``. Changed: the seed's scale update also keeps a first moment and
applies ``p * (1 + dc)``; here there is no first moment and ``p * exp(dc)``, so that ``c`` really
is a log-scale. The seed's small-tensor Adam skips the first-moment bias correction and
normalizes by one tensor-wide second moment, and covers tensors of up to 5 elements; here only
``numel == 1`` is a scalar, and Adam is fully bias-corrected and elementwise. Clipping against
the median of recent norms is not in the seed: it follows the ``clipping_scale`` idea of
icefall's later ScaledAdam, whose bookkeeping (when the threshold is refreshed) differs.

State (for ``state_dict``): per tensor ``step`` (int), ``exp_avg``, ``exp_avg_sq`` (shaped like
``p``), ``param_rms`` and ``scale_exp_avg_sq`` (0-d), ``scale_grads`` (shape ``(P,)``); per
scalar ``step``, ``exp_avg``, ``exp_avg_sq``; and, in the state of the first parameter of the
first group, ``grad_norm_history`` (shape ``(grad_norm_window,)``) and ``grad_norms_seen`` (int),
so that the standard optimizer checkpointing carries the clipping history too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

SCALE_UPDATE_PERIOD = 4


def _rms(tensor: torch.Tensor) -> torch.Tensor:
    """Root-mean-square of all elements, as a 0-d tensor."""
    return tensor.pow(2).mean().sqrt()


class ScaledAdam(torch.optim.Optimizer):
    """Adam whose step is relative to each tensor's rms, with a learned log-scale per tensor.

    See the module docstring for the exact update.

    Args:
        params: tensors or parameter groups, as for any torch optimizer.
        lr: relative step size: a tensor moves by about ``lr * rms(p)`` per element and step.
        betas: decay rates of the first and second gradient moments.
        eps: added to the roots of second moments to avoid division by zero.
        scalar_lr_scale: multiplies ``lr`` for scalar parameters and for the log-scales.
        param_min_rms: floor of the rms used to scale steps; below it the scale grows.
        param_max_rms: above this rms the scale shrinks, whatever the gradient says.
        clipping_scale: gradients are clipped at this multiple of the median of recent
            total gradient norms; 0 disables clipping.
        grad_norm_window: how many recent total gradient norms the median is taken over.
    """

    def __init__(  # noqa: PLR0913, PLR0917 (a torch optimizer: one per hyperparameter)
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.03,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-8,
        scalar_lr_scale: float = 0.1,
        param_min_rms: float = 1e-5,
        param_max_rms: float = 3.0,
        clipping_scale: float = 2.0,
        grad_norm_window: int = 128,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"ScaledAdam: lr must be >= 0, got {lr}")
        if eps < 0.0:
            raise ValueError(f"ScaledAdam: eps must be >= 0, got {eps}")
        if len(betas) != 2 or not all(0.0 <= beta < 1.0 for beta in betas):  # noqa: PLR2004 (a pair)
            raise ValueError(f"ScaledAdam: betas must be two values in [0, 1), got {betas}")
        if scalar_lr_scale < 0.0:
            raise ValueError(f"ScaledAdam: scalar_lr_scale must be >= 0, got {scalar_lr_scale}")
        if not 0.0 < param_min_rms < param_max_rms:
            raise ValueError(
                "ScaledAdam: need 0 < param_min_rms < param_max_rms, got "
                f"{param_min_rms} and {param_max_rms}"
            )
        if clipping_scale < 0.0:
            raise ValueError(f"ScaledAdam: clipping_scale must be >= 0, got {clipping_scale}")
        if grad_norm_window < 1:
            raise ValueError(f"ScaledAdam: grad_norm_window must be >= 1, got {grad_norm_window}")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            scalar_lr_scale=scalar_lr_scale,
            param_min_rms=param_min_rms,
            param_max_rms=param_max_rms,
        )
        super().__init__(params, defaults)
        # Clipping acts on the total norm over all groups, so its settings are not per group.
        self.clipping_scale = clipping_scale
        self.grad_norm_window = grad_norm_window

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Take one optimization step; ``closure`` re-evaluates the loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        params_with_grad = [
            param
            for group in self.param_groups
            for param in group["params"]
            if param.grad is not None
        ]
        if not params_with_grad:
            return loss
        clip_factor = self._clip_factor(params_with_grad) if self.clipping_scale > 0 else None

        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad if clip_factor is None else param.grad * clip_factor
                state = self.state[param]
                if param.numel() == 1:
                    if "step" not in state:
                        self._init_adam_state(param, state)
                    self._adam_step(
                        param, grad, state, group, group["lr"] * group["scalar_lr_scale"]
                    )
                else:
                    self._tensor_step(param, grad, state, group)
        return loss

    def _clip_factor(self, params_with_grad: list[torch.Tensor]) -> torch.Tensor:
        """Record this step's total gradient norm; return min(1, threshold / norm) as a 0-d tensor.

        Everything stays a tensor so that clipping costs no host-device synchronization.
        """
        first_param = self.param_groups[0]["params"][0]
        history_state = self.state[first_param]
        if "grad_norm_history" not in history_state:
            history_state["grad_norm_history"] = torch.zeros(
                self.grad_norm_window, dtype=first_param.dtype, device=first_param.device
            )
            history_state["grad_norms_seen"] = 0
        history = history_state["grad_norm_history"]
        seen = history_state["grad_norms_seen"]

        per_param_norms = torch.stack(
            [torch.linalg.vector_norm(param.grad).to(history) for param in params_with_grad]
        )
        total_norm = torch.linalg.vector_norm(per_param_norms)
        history[seen % self.grad_norm_window] = total_norm
        seen += 1
        history_state["grad_norms_seen"] = seen

        threshold = self.clipping_scale * history[: min(seen, self.grad_norm_window)].median()
        # An all-zero gradient gives 0 / tiny = 0 here, which is harmless: the gradient is zero.
        tiny = torch.finfo(total_norm.dtype).tiny
        return (threshold / total_norm.clamp(min=tiny)).clamp(max=1.0)

    @staticmethod
    def _init_adam_state(param: torch.Tensor, state: dict[str, Any]) -> None:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(param)
        state["exp_avg_sq"] = torch.zeros_like(param)

    @staticmethod
    def _adam_step(
        param: torch.Tensor,
        grad: torch.Tensor,
        state: dict[str, Any],
        group: dict[str, Any],
        step_size: float | torch.Tensor,
    ) -> None:
        """Bias-corrected elementwise Adam step; ``step_size`` may be a 0-d tensor."""
        beta1, beta2 = group["betas"]
        state["step"] += 1
        step = state["step"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denom = (exp_avg_sq / (1.0 - beta2**step)).sqrt_().add_(group["eps"])
        param.sub_(exp_avg / denom * (step_size / (1.0 - beta1**step)))

    def _tensor_step(
        self,
        param: torch.Tensor,
        grad: torch.Tensor,
        state: dict[str, Any],
        group: dict[str, Any],
    ) -> None:
        if "step" not in state:
            self._init_adam_state(param, state)
            state["param_rms"] = _rms(param).clamp(min=group["param_min_rms"])
            state["scale_grads"] = torch.zeros(
                SCALE_UPDATE_PERIOD, dtype=param.dtype, device=param.device
            )
            state["scale_exp_avg_sq"] = torch.zeros((), dtype=param.dtype, device=param.device)

        step = state["step"]
        state["scale_grads"][step % SCALE_UPDATE_PERIOD] = (param * grad).sum()
        if step % SCALE_UPDATE_PERIOD == SCALE_UPDATE_PERIOD - 1:
            self._update_log_scale(param, state, group, (step + 1) // SCALE_UPDATE_PERIOD)
        self._adam_step(param, grad, state, group, group["lr"] * state["param_rms"])

    @staticmethod
    def _update_log_scale(
        param: torch.Tensor, state: dict[str, Any], group: dict[str, Any], num_updates: int
    ) -> None:
        """Rescale ``param`` by exp(one Adam-like step on its log-scale); refresh ``param_rms``."""
        beta2_per_update = group["betas"][1] ** SCALE_UPDATE_PERIOD
        scale_grads = state["scale_grads"]
        scale_exp_avg_sq = state["scale_exp_avg_sq"]
        scale_exp_avg_sq.mul_(beta2_per_update).add_(
            scale_grads.pow(2).mean(), alpha=1.0 - beta2_per_update
        )
        denom = (scale_exp_avg_sq / (1.0 - beta2_per_update**num_updates)).sqrt() + group["eps"]
        scale_lr = group["lr"] * group["scalar_lr_scale"] * SCALE_UPDATE_PERIOD
        log_scale_step = -scale_lr * scale_grads.mean() / denom

        rms = _rms(param)
        # Outside the allowed rms range the gradient's opinion is overruled, steering back in.
        log_scale_step = torch.where(
            rms < group["param_min_rms"],
            scale_lr,
            torch.where(rms > group["param_max_rms"], -scale_lr, log_scale_step),
        )
        scale_factor = log_scale_step.exp()
        param.mul_(scale_factor)
        state["param_rms"] = (rms * scale_factor).clamp(min=group["param_min_rms"])
