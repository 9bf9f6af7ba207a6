"""Noisy quadratic model (NQM): exact expected-loss dynamics, steps to a target loss, and the
learning rates, momenta and schedules that minimise them, per batch size.

Why: the NQM is the smallest model in which batch size, learning rate, momentum,
preconditioning and schedules interact the way they do in neural-network training, and it is
exactly solvable, so its claims can be checked without simulation noise. This module answers
the batch-size questions of Zhang et al. 2019 (below) with closed forms instead of Monte-Carlo
runs; ``simulate_nqm`` runs the actual stochastic updates to check them.

Reference: G. Zhang, L. Li, Z. Nado, J. Martens, S. Sachdeva, G. E. Dahl, C. J. Shallue and
R. Grosse, "Which Algorithmic Choices Matter at Which Batch Sizes? Insights From a Noisy
Quadratic Model", NeurIPS 2019 (arXiv:1907.04164), sections 2-4 and appendix B.

Model (Zhang et al. 2019, section 2): loss ``L(x) = 0.5 * sum_i h_i x_i^2`` over ``K`` dimensions
with curvatures ``h_i = 1/i``. A batch of ``B`` examples gives the gradient ``h_i x_i + e_i`` with
independent zero-mean noise of variance ``sigma_i^2 = h_i / B``. The start is ``x_0 ~ N(0, I)``, so
``s_i = E[x_i^2]`` starts at ``s_0 = 1`` and the expected loss is ``E[L] = 0.5 * sum_i h_i s_i``. A
diagonal preconditioner ``P_i = h_i^(-p)`` (``p = 0``: SGD, ``p = 0.5``: Adam-like) gives dimension
``i`` the learning rate ``a_i = a P_i``. Every dimension evolves on its own; below, ``x = a_i h_i``
(the per-step contraction) and ``q = a_i^2 sigma_i^2`` (the injected noise).

SGD: ``s' = (1 - x)^2 s + q``, so with ``beta = (1 - x)^2`` and the stationary value
``s* = q / (1 - beta) = a_i / (B (2 - x))``::

    s_t = s* + beta^t (s_0 - s*),        stable iff 0 < x < 2.

Heavy-ball momentum ``b``: ``v' = b v - a_i (h_i theta + e)``, ``theta' = theta + v'``, i.e.
with ``n = a_i e`` (variance ``q``)::

    theta' = (1 - x) theta + b v - n
    v'     =      -x theta + b v - n

The second moments ``(S, V, C) = (E theta^2, E v^2, E theta v)`` then follow the affine 3x3
system (expand the products; ``n`` is independent of ``theta, v``)::

    S' = (1 - x)^2 S + b^2 V + 2 b (1 - x) C + q
    V' =       x^2 S + b^2 V - 2 b x C       + q
    C' = -x (1 - x) S + b^2 V + b (1 - 2x) C  + q

which is ``Sigma' = A Sigma A^T + q [[1, 1], [1, 1]]`` for ``Sigma = [[S, C], [C, V]]`` and
``A = [[1 - x, b], [-x, b]]``. Its solution is ``Sigma_t = Sigma* + A^t (Sigma_0 - Sigma*)
A^tT``, and by Cayley-Hamilton ``A^t = f_t A - b f_(t-1) I`` with the Lucas sequence
``f_t = (r1^t - r2^t) / (r1 - r2)`` of the eigenvalues of ``A``, the roots of
``z^2 - (1 - x + b) z + b``. (The 3x3 matrix has eigenvalues ``r1^2, r1 r2, r2^2``: this is its
eigendecomposition, done analytically.) ``f_t`` is evaluated in closed form with exp, expm1
and sin, never as a difference of powers, so it is accurate at critical damping
(``r1 = r2``) and for any horizon (``t`` up to ``2^53``). ``theta`` is an AR(2) process,
``theta_(t+1) = (1 + b - x) theta_t - b theta_(t-1) - n_t``, whose stationary moments are::

    S* = (1 + b) q / ((1 - b) x (2 (1 + b) - x)),   C* = S* x / (1 + b),   V* = 2 C*,

stable iff ``0 <= b < 1`` and ``0 < x < 2 (1 + b)``.

Exponential moving average (EMA) of the iterates, ``u' = g u + (1 - g) theta'`` with
``u_0 = theta_0`` and the loss measured at ``u`` (paper section 3.4), is the same kind of
system with ``A = [[1 - x, 0], [(1 - g)(1 - x), g]]``, noise direction ``(1, 1 - g)`` and::

    E[theta u]* = (1 - g) s* / (1 - g (1 - x)),
    E[u^2]*     = (1 - g) s* (1 + g (1 - x)) / ((1 + g) (1 - g (1 - x))).

Steps to target: the steps to a target loss ``C`` are the integer ``n`` with
``L(n - 1) > C >= L(n)``, found by bisection on a bracket that keeps this invariant
(``L(lo) > C >= L(hi)``), so the answer is exact; it is infinite when the stationary loss is
``>= C``, the dynamics are unstable, or the crossing lies beyond ``max_steps``. When ``L`` is
non-increasing in ``t`` the crossing is the first passage. That holds for SGD and preconditioned SGD
whenever the target is reachable: every ``s_i`` then moves monotonically from ``s_0`` down to
``s*_i < s_0``. Under momentum ``E[theta^2]`` may oscillate, and the answer is a crossing found by
the bisection.

The fewest steps over a grid of learning rates (and momenta) is one bisection for the whole
grid: a grid point whose loss is still above ``C`` at a probe ``t`` that another point has
reached cannot be the best, and is dropped. Grids are log-spaced in ``a`` and in ``1 - b``;
a pattern search then refines around the best point with finer log-spaced grids in the
effective learning rate ``a / (1 - b)`` and ``1 - b`` (along the ridge of equal effective
rate, where heavy ball behaves like SGD at small batch sizes). Across a batch-size sweep the
previous optimum is searched again, so the fewest steps never rise with the batch size (at a
fixed ``(a, b)`` a larger batch only removes noise).

Schedules and the critical batch size: a piecewise-constant schedule with learning rate ``a_k`` for
``n_k`` steps composes the SGD closed form piece by piece; the final loss and its exact gradient
with respect to ``log a_k`` (reverse mode, written out in ``schedule_final_loss``) feed scipy's
L-BFGS-B.

The critical batch size (``critical_batch_size``) is the smallest batch size ``B`` of a
doubling sweep at which doubling the batch reduces the fewest steps by less than a factor
``speedup`` (default 1.5): ``steps(B) / steps(2B) < 1.5``. Below it, more than half of the
ideal gain of doubling (a factor 2, perfect scaling) is realised; above it, less.

Shapes: ``h`` is ``(K,)``; grids of ``G`` configurations give ``(G, K)`` per-dimension arrays
and ``(G,)`` losses.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from tqdm import tqdm

DEFAULT_MAX_STEPS = 2**40
MAX_MOVES = 8


# --------------------------------------------------------------------------- the model


def nqm_curvatures(K: int) -> np.ndarray:
    """Hessian diagonal ``h_i = 1/i`` for ``i = 1..K``, shape ``(K,)`` (float64)."""
    if K < 1:
        raise ValueError(f"K must be >= 1, got {K}")
    return 1.0 / np.arange(1, K + 1, dtype=np.float64)


def nqm_noise_variance(h: np.ndarray, batch_size: float) -> np.ndarray:
    """Gradient-noise variance ``sigma_i^2 = h_i / B`` of a batch of ``B`` examples."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    return np.asarray(h, dtype=np.float64) / batch_size


def preconditioner(h: np.ndarray, power: float) -> np.ndarray:
    """Diagonal preconditioner ``P_i = h_i^(-p)``, shape of ``h``."""
    return np.asarray(h, dtype=np.float64) ** (-power)


@dataclass(frozen=True)
class Optimizer:
    """One algorithm on the NQM.

    ``power``: preconditioner power ``p`` (``P = h^-p``; 0 is plain SGD, 0.5 Adam-like).
    ``momentum``: heavy-ball momentum is searched over a grid (else ``b = 0``).
    ``ema_decay``: decay ``g`` of an exponential moving average of the iterates, at which the
    loss is measured; ``None`` for none. EMA with momentum is not modelled.
    """

    power: float = 0.0
    momentum: bool = False
    ema_decay: float | None = None

    def __post_init__(self):
        if self.ema_decay is not None:
            if self.momentum:
                raise ValueError("EMA of the iterates is modelled without momentum only")
            if not 0.0 < self.ema_decay < 1.0:
                raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")


# --------------------------------------------------------------------------- closed forms


def _signed_power(negative: np.ndarray, log_abs: np.ndarray, n: np.ndarray, odd: np.ndarray):
    """``r^n`` from ``r < 0`` and ``log|r|`` for integer ``n >= 0`` of parity ``odd``;
    ``0^0 = 1``.
    """
    magnitude = np.exp(np.where(n == 0, 0.0, n * log_abs))
    return np.where(negative & odd, -magnitude, magnitude)


def _real_lucas(r1: np.ndarray, one_minus_q: np.ndarray, q_negative: np.ndarray) -> dict:
    """Per-element data for ``f_n`` with real roots, ``|r1| >= |r2|``, ``q = r2 / r1``.

    ``f_n = r1^(n-1) (1 - q^n) / (1 - q)``; for ``q >= 0``, ``1 - q^n = -expm1(n log q)``, so
    nothing cancels when ``r1 ~ r2`` (then ``f_n -> n r1^(n-1)``). The caller forms
    ``1 - q`` without cancellation.
    """
    with np.errstate(divide="ignore"):
        return {
            "r1_negative": r1 < 0,
            "log_abs_r1": np.log(np.abs(r1)),
            # 1/r1 only ever multiplies f_(n-1) by det = r1 r2, which is 0 when r1 is.
            "inv_r1": np.divide(1.0, r1, out=np.zeros_like(r1), where=r1 != 0),
            "log_abs_q": np.where(
                q_negative, np.log(np.abs(1.0 - one_minus_q)), np.log1p(-np.minimum(one_minus_q, 1))
            ),
            "q_negative": q_negative,
            "one_minus_q": one_minus_q,
        }


def _complex_lucas(rho: np.ndarray, phi: np.ndarray) -> dict:
    """Per-element data for ``f_n`` with roots ``rho e^(+-i phi)``:
    ``f_n = rho^(n-1) sin(n phi) / sin(phi)``.
    """
    return {"log_rho": np.log(rho), "inv_rho": 1.0 / rho, "phi": phi, "sin_phi": np.sin(phi)}


def _geometric_sum(data: dict, n: np.ndarray, odd: np.ndarray) -> np.ndarray:
    """``(1 - q^n) / (1 - q) = sum_(k<n) q^k`` for real roots."""
    with np.errstate(invalid="ignore", divide="ignore"):
        e = np.expm1(np.where(n == 0, 0.0, n * data["log_abs_q"]))
        numerator = np.where(data["q_negative"] & odd, 2.0 + e, -e)
        ratio = np.where(data["one_minus_q"] > 0, numerator / data["one_minus_q"], n)
    return np.where(n == 0, 0.0, ratio)


def _lucas_pair(data: dict, n: np.ndarray, odd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(f_n, f_(n-1))`` per element for ``n >= 1`` (parity ``odd``)."""
    if "log_rho" in data:
        lead = np.exp((n - 1.0) * data["log_rho"]) / data["sin_phi"]
        return lead * np.sin(n * data["phi"]), lead * data["inv_rho"] * np.sin(
            (n - 1.0) * data["phi"]
        )
    lead = _signed_power(data["r1_negative"], data["log_abs_r1"], n - 1.0, ~odd)
    return lead * _geometric_sum(data, n, odd), lead * data["inv_r1"] * _geometric_sum(
        data, n - 1.0, ~odd
    )


#: Below this ``x``, ``log|1 - x|`` is ``log1p(-x)``, which keeps the digits of small ``x``.
_LOG1P_BELOW = 0.5


def _log_abs_one_minus(x: np.ndarray) -> np.ndarray:
    """``log|1 - x|`` without cancellation for small ``x``; ``-inf`` at ``x = 1``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(
            x < _LOG1P_BELOW,
            np.log1p(-np.minimum(x, _LOG1P_BELOW)),
            np.log(np.abs(1.0 - x)),
        )


class _SGDModes:
    """Closed-form SGD (optionally preconditioned) for ``G`` learning rates at once.

    ``s_t = s*/B + beta^t (s_0 - s*/B)`` per element, with ``s*`` the stationary value at
    ``B = 1`` (it scales as ``1/B``). Arrays are ``(G, K)``; ``take`` selects rows.
    """

    def __init__(self, lr: np.ndarray, h: np.ndarray, power: float = 0.0, s0: float = 1.0):
        self.lr = np.atleast_1d(np.asarray(lr, dtype=np.float64))
        self.momentum = np.zeros_like(self.lr)
        self.s0 = s0
        step = self.lr[:, None] * preconditioner(h, power)
        x = step * h
        self.stable = np.all((x > 0) & (x < 2), axis=1)  # noqa: PLR2004 (SGD's 0 < x < 2)
        self.log_beta = 2.0 * _log_abs_one_minus(x)
        with np.errstate(divide="ignore"):
            self.s_unit = step / (2.0 - x)
        self.weight = 0.5 * h
        self.initial_loss = float(self.weight.sum() * s0)

    def take(self, rows: np.ndarray) -> _SGDModes:
        subset = copy.copy(self)
        for name in ("lr", "momentum", "stable", "log_beta", "s_unit"):
            setattr(subset, name, getattr(self, name)[rows])
        return subset

    def stationary_loss(self, batch_size: float) -> np.ndarray:
        return np.where(self.stable, (self.s_unit @ self.weight) / batch_size, np.inf)

    def second_moment(self, t: np.ndarray, batch_size: float) -> np.ndarray:
        t = np.broadcast_to(np.asarray(t, dtype=np.float64), self.lr.shape)[:, None]
        s_star = self.s_unit / batch_size
        with np.errstate(over="ignore", invalid="ignore"):
            decay = np.exp(np.where(t == 0, 0.0, t * self.log_beta))
            return s_star + decay * (self.s0 - s_star)

    def loss(self, t: np.ndarray, batch_size: float) -> np.ndarray:
        return self.second_moment(t, batch_size) @ self.weight


class _LinearModes:
    """Second moments of a 2-d linear system ``z' = A z + d n`` for ``G`` configurations.

    ``E[z z^T]_t = Sigma* + A^t (Sigma_0 - Sigma*) A^tT`` with ``A^t = f_t A - det f_(t-1) I``
    (Cayley-Hamilton); the loss coordinate is ``z[row]``, so only row ``row`` of ``A^t`` is
    needed: ``(u, w) = f_t (A[row, 0], A[row, 1]) - det f_(t-1) e_row``. ``Sigma*`` scales as
    ``1/B``; it is kept at ``B = 1``.

    The ``G x K`` elements are stored flat in two groups, real and complex eigenvalues, each
    element with its row, so that ``take`` and the loss (a per-row ``bincount``) never
    evaluate the other group's formula.
    """

    # The arrays of one precomputation, which its two builders (momentum, EMA) pass once.
    def __init__(self, row, lr, momentum, h, s0, x, a_row, det, star, sigma_0, stable, lucas):  # noqa: PLR0913, PLR0917
        """``x``, ``a_row``, ``det``, ``star`` (``(S00, S01, S11)`` at ``B = 1``): ``(G, K)``;
        ``lucas``: ``(real, r1, one_minus_q, q_negative, rho, phi)``, ``(G, K)`` each.
        """
        self.row, self.lr, self.momentum, self.sigma_0 = row, lr, momentum, sigma_0
        self.shape = x.shape
        weight = 0.5 * h
        self.initial_loss = float(weight.sum() * s0)
        self.stable = np.all(stable, axis=1)
        with np.errstate(invalid="ignore"):
            self.stationary_unit = star[2 * row] @ weight
        real, r1, one_minus_q, q_negative, rho, phi = lucas
        rows, cols = np.indices(self.shape)
        per_element = {
            "row": rows,
            "col": cols,
            "weight": np.broadcast_to(weight, self.shape),
            "a0": a_row[0],
            "a1": a_row[1],
            "det": det,
            "s00": star[0],
            "s01": star[1],
            "s11": star[2],
        }
        self.groups = []
        for mask in (real, ~real):
            if not mask.any():
                continue
            group = {
                name: np.broadcast_to(value, self.shape)[mask]
                for name, value in per_element.items()
            }
            if mask is real:
                group.update(_real_lucas(r1[mask], one_minus_q[mask], q_negative[mask]))
            else:
                group.update(_complex_lucas(rho[mask], phi[mask]))
            self.groups.append(group)

    def take(self, rows: np.ndarray) -> _LinearModes:
        subset = copy.copy(self)
        new_index = np.full(self.shape[0], -1)
        new_index[rows] = np.arange(rows.size)
        subset.shape = (rows.size, self.shape[1])
        for name in ("lr", "momentum", "stable", "stationary_unit"):
            setattr(subset, name, getattr(self, name)[rows])
        subset.groups = []
        for group in self.groups:
            keep = new_index[group["row"]] >= 0
            selected = {name: value[keep] for name, value in group.items()}
            selected["row"] = new_index[selected["row"]]
            subset.groups.append(selected)
        return subset

    def stationary_loss(self, batch_size: float) -> np.ndarray:
        return np.where(self.stable, self.stationary_unit / batch_size, np.inf)

    def _group_moments(self, t: np.ndarray, batch_size: float):
        """Yield ``(group, E[z_row^2] per element)`` for ``t >= 1`` per row."""
        odd = np.remainder(t, 2.0) == 1.0
        for group in self.groups:
            n, n_odd = t[group["row"]], odd[group["row"]]
            with np.errstate(over="ignore", invalid="ignore"):
                f_n, f_prev = _lucas_pair(group, n, n_odd)
                u = f_n * group["a0"]
                w = f_n * group["a1"]
                if self.row == 0:
                    u -= group["det"] * f_prev
                else:
                    w -= group["det"] * f_prev
                stars = [group[name] / batch_size for name in ("s00", "s01", "s11")]
                d00, d01, d11 = (
                    init - star for init, star in zip(self.sigma_0, stars, strict=True)
                )
                yield group, stars[2 * self.row] + u * u * d00 + 2.0 * u * w * d01 + w * w * d11

    def second_moment(self, t: np.ndarray, batch_size: float) -> np.ndarray:
        t = np.broadcast_to(np.asarray(t, dtype=np.float64), self.shape[:1])
        moments = np.empty(self.shape)
        for group, moment in self._group_moments(np.maximum(t, 1.0), batch_size):
            moments[group["row"], group["col"]] = moment
        moments[t == 0] = self.sigma_0[2 * self.row]
        return moments

    def loss(self, t: np.ndarray, batch_size: float) -> np.ndarray:
        t = np.broadcast_to(np.asarray(t, dtype=np.float64), self.shape[:1])
        total = np.zeros(self.shape[0])
        for group, moment in self._group_moments(np.maximum(t, 1.0), batch_size):
            total += np.bincount(group["row"], group["weight"] * moment, self.shape[0])
        return np.where(t == 0, self.initial_loss, total)


def _momentum_modes(lr, momentum, h, power: float = 0.0, s0: float = 1.0) -> _LinearModes:
    """Heavy-ball momentum for ``G`` pairs ``(lr, b)``: state ``(theta, v)``, loss at theta."""
    lr = np.atleast_1d(np.asarray(lr, dtype=np.float64))
    momentum = np.atleast_1d(np.asarray(momentum, dtype=np.float64))
    step = lr[:, None] * preconditioner(h, power)
    x = step * h
    b = np.broadcast_to(momentum[:, None], x.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        s_star = (1.0 + b) * step / ((1.0 - b) * (2.0 * (1.0 + b) - x))
        c_star = s_star * x / (1.0 + b)
    root_b = np.sqrt(b)
    # tau^2 - 4b factored, so that its sign and size are exact near critical damping.
    disc = (x - (1.0 - root_b) ** 2) * (x - (1.0 + root_b) ** 2)
    tau = 1.0 - x + b
    real = disc >= 0
    root_disc = np.sqrt(np.abs(disc))
    abs_r1 = 0.5 * (np.abs(tau) + root_disc)
    with np.errstate(divide="ignore", invalid="ignore"):
        one_minus_q = np.where(abs_r1 > 0, root_disc / abs_r1, 1.0)
    lucas = (
        real,
        np.where(tau < 0, -abs_r1, abs_r1),
        one_minus_q,
        np.zeros(x.shape, dtype=bool),
        root_b,
        np.arctan2(root_disc, tau),
    )
    stable = (x > 0) & (x < 2.0 * (1.0 + b)) & (b >= 0) & (b < 1)
    return _LinearModes(
        row=0,
        lr=lr,
        momentum=momentum,
        h=h,
        s0=s0,
        x=x,
        a_row=(1.0 - x, b),
        det=b,
        star=(s_star, c_star, 2.0 * c_star),
        sigma_0=(s0, 0.0, 0.0),
        stable=stable,
        lucas=lucas,
    )


def _ema_modes(lr, decay: float, h, power: float = 0.0, s0: float = 1.0) -> _LinearModes:
    """SGD with an EMA ``u`` of its iterates: state ``(theta, u)``, loss at ``u``."""
    lr = np.atleast_1d(np.asarray(lr, dtype=np.float64))
    step = lr[:, None] * preconditioner(h, power)
    x = step * h
    g = decay
    with np.errstate(divide="ignore", invalid="ignore"):
        s_star = step / (2.0 - x)
        lag = 1.0 - g * (1.0 - x)
        cross = (1.0 - g) * s_star / lag
        average = (1.0 - g) * s_star * (1.0 + g * (1.0 - x)) / ((1.0 + g) * lag)
    r_theta = 1.0 - x
    theta_leads = np.abs(r_theta) >= g
    r1 = np.where(theta_leads, r_theta, g)
    r2 = np.where(theta_leads, g, r_theta)
    with np.errstate(divide="ignore", invalid="ignore"):
        one_minus_q = np.where(r1 != 0, (r1 - r2) / r1, 1.0)
    lucas = (np.ones(x.shape, dtype=bool), r1, one_minus_q, r1 * r2 < 0, None, None)
    return _LinearModes(
        row=1,
        lr=lr,
        momentum=np.zeros_like(lr),
        h=h,
        s0=s0,
        x=x,
        a_row=((1.0 - g) * (1.0 - x), np.full(x.shape, g)),
        det=g * (1.0 - x),
        star=(s_star, cross, average),
        sigma_0=(s0, s0, s0),
        stable=(x > 0) & (x < 2),  # noqa: PLR2004 (SGD's 0 < x < 2)
        lucas=lucas,
    )


def _modes(optimizer: Optimizer, lr, momentum, h: np.ndarray, s0: float = 1.0):
    if optimizer.ema_decay is not None:
        return _ema_modes(lr, optimizer.ema_decay, h, optimizer.power, s0)
    if optimizer.momentum:
        return _momentum_modes(lr, momentum, h, optimizer.power, s0)
    return _SGDModes(lr, h, optimizer.power, s0)


def sgd_second_moment(t, lr, h, batch_size, power=0.0, s0=1.0) -> np.ndarray:
    """``E[x_i^2]`` after ``t`` steps of (preconditioned) SGD, shape ``(K,)``."""
    return _SGDModes(np.array([lr]), h, power, s0).second_moment(t, batch_size)[0]


def momentum_second_moment(t, lr, momentum, h, batch_size, power=0.0, s0=1.0) -> np.ndarray:
    """``E[theta_i^2]`` after ``t`` heavy-ball steps from ``v_0 = 0``, shape ``(K,)``."""
    return _momentum_modes(lr, momentum, h, power, s0).second_moment(t, batch_size)[0]


def ema_second_moment(t, lr, decay, h, batch_size, power=0.0, s0=1.0) -> np.ndarray:
    """``E[u_i^2]`` of the EMA ``u`` of the SGD iterates after ``t`` steps, shape ``(K,)``."""
    return _ema_modes(lr, decay, h, power, s0).second_moment(t, batch_size)[0]


def momentum_transition_matrix(lr, momentum, h, power=0.0) -> np.ndarray:
    """The 3x3 map of ``(E theta^2, E v^2, E theta v)`` per dimension, shape ``(K, 3, 3)``
    (module docstring); the affine noise part is ``q (1, 1, 1)`` with ``q = (a P)^2 h / B``.
    """
    x = lr * preconditioner(h, power) * h
    b = momentum
    matrix = np.zeros((x.size, 3, 3))
    matrix[:, :, 1] = b**2
    matrix[:, 0, 0] = (1 - x) ** 2
    matrix[:, 0, 2] = 2 * b * (1 - x)
    matrix[:, 1, 0] = x**2
    matrix[:, 1, 2] = -2 * b * x
    matrix[:, 2, 0] = -x * (1 - x)
    matrix[:, 2, 2] = b * (1 - 2 * x)
    return matrix


def expected_loss(
    optimizer: Optimizer,
    lr: float,
    batch_size: float,
    h: np.ndarray,
    steps: Sequence[int],
    momentum: float = 0.0,
    s0: float = 1.0,
) -> np.ndarray:
    """Exact ``E[L]`` after each number of steps in ``steps``, shape ``(len(steps),)``."""
    steps = np.asarray(steps, dtype=np.float64)
    modes = _modes(
        optimizer, np.full(steps.size, lr), np.full(steps.size, momentum), np.asarray(h), s0
    )
    return modes.loss(steps, batch_size)


# --------------------------------------------------------------------------- steps to target


def _fewest_steps(modes, batch_size: float, target: float, max_steps: int, hint: int | None):
    """Fewest steps to ``E[L] <= target`` over the rows of ``modes``: ``(steps, row)``.

    One bisection for all rows. Invariant: every active row has ``L(lo) > target`` and every
    active row has ``L(hi) <= target``; a row still above the target at a probe that another
    row reached is dropped (for monotone ``L`` its crossing lies beyond the probe, so it cannot
    be the fewest). Ends at ``hi = lo + 1``: the kept rows cross exactly there.
    ``steps`` is ``math.inf`` (row ``None``) when no row reaches the target within
    ``max_steps``.
    """
    if modes.initial_loss <= target:
        return 0, None
    reachable = np.flatnonzero(modes.stationary_loss(batch_size) < target)
    if reachable.size == 0:
        return math.inf, None
    rows, modes = reachable, modes.take(reachable)
    lo, hi = 0, None
    probe = int(min(max(hint or 1, 1), max_steps))
    while hi is None:
        losses = modes.loss(np.full(rows.size, float(probe)), batch_size)
        reached = np.flatnonzero(losses <= target)
        if reached.size:
            hi, rows, modes, best = probe, rows[reached], modes.take(reached), losses[reached]
        elif probe >= max_steps:
            return math.inf, None
        else:
            # Galloping keeps the bracket within a factor 2 of the answer.
            lo, probe = probe, min(2 * probe, max_steps)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        losses = modes.loss(np.full(rows.size, float(mid)), batch_size)
        reached = np.flatnonzero(losses <= target)
        if reached.size:
            hi, rows, modes, best = mid, rows[reached], modes.take(reached), losses[reached]
        else:
            lo = mid
    return hi, int(rows[np.argmin(best)])


def steps_to_target(
    optimizer: Optimizer,
    lr: float,
    batch_size: float,
    h: np.ndarray,
    target: float = 0.01,
    momentum: float = 0.0,
    max_steps: int = DEFAULT_MAX_STEPS,
    s0: float = 1.0,
) -> float:
    """Fewest steps ``n`` with ``L(n - 1) > target >= L(n)`` for one configuration (an int),
    or ``math.inf`` when the target is out of reach (see the module docstring).
    """
    modes = _modes(optimizer, np.array([lr]), np.array([momentum]), np.asarray(h), s0)
    return _fewest_steps(modes, batch_size, target, max_steps, None)[0]


@dataclass(frozen=True)
class SearchGrid:
    """Log-spaced grids of learning rates and momenta (log-spaced in ``1 - b``, from
    ``b = 0`` to ``momentum_max``), refined ``refine_rounds`` times around the best point
    with ``refine_points`` per axis spanning its two neighbours on the previous grid.
    """

    lr_min: float = 1e-6
    lr_max: float = 4.0
    lr_points: int = 34
    momentum_max: float = 0.999
    momentum_points: int = 10
    refine_rounds: int = 4
    refine_points: int = 7
    max_steps: int = DEFAULT_MAX_STEPS

    def log_learning_rates(self) -> np.ndarray:
        """``log a``, ``lr_points`` of them, evenly spaced from ``lr_min`` to ``lr_max``."""
        return np.linspace(math.log(self.lr_min), math.log(self.lr_max), self.lr_points)

    def log_momentum_gaps(self) -> np.ndarray:
        """``log(1 - b)`` from 0 (``b = 0``) down to ``log(1 - momentum_max)``."""
        return np.linspace(0.0, math.log1p(-self.momentum_max), self.momentum_points)


@dataclass(frozen=True)
class Optimum:
    """Fewest steps to the target (``math.inf`` if unreachable, 0 if the start is already
    below it) and the learning rate and momentum that attain it (``None`` if none does).
    """

    steps: float
    lr: float | None
    momentum: float | None


def _grid_modes(optimizer, lrs, momenta, h, s0):
    """Modes for the points ``(lrs[j], momenta[j])`` (momenta ignored without momentum)."""
    return _modes(optimizer, np.asarray(lrs, float), np.asarray(momenta, float), h, s0)


def _local_points(best: Optimum, lr_spacing, gap_spacing, points: int, gap_lower: float):
    """A ``points x points`` grid around ``best`` in ``(log a/(1 - b), log(1 - b))``, the
    best point exactly among them.

    Steps to target depend mostly on the effective learning rate ``a / (1 - b)`` (exactly so
    at small batch sizes), so a product grid in ``(a, b)`` would cut across that ridge; this
    one moves along it.
    """
    offsets = np.linspace(-1.0, 1.0, points)
    center_gap = math.log1p(-(best.momentum or 0.0))
    gaps = np.unique(np.clip(center_gap + gap_spacing * offsets, gap_lower, 0.0))
    log_eff, log_gap = np.meshgrid(
        math.log(best.lr) - center_gap + lr_spacing * offsets, gaps, indexing="ij"
    )
    lrs = np.exp(log_eff + log_gap).ravel()
    momenta = -np.expm1(log_gap).ravel()
    return np.append(lrs, best.lr), np.append(momenta, best.momentum or 0.0)


class _Search:
    """The grid search of one algorithm; the coarse grid's modes are built once and reused
    for every batch size (only the noise, ``1/B``, changes between batch sizes).
    """

    def __init__(self, optimizer: Optimizer, h: np.ndarray, grid: SearchGrid, s0: float = 1.0):
        self.optimizer, self.h, self.grid, self.s0 = optimizer, h, grid, s0
        self.log_lr = grid.log_learning_rates()
        self.log_gap = grid.log_momentum_gaps() if optimizer.momentum else np.zeros(1)
        log_lr, log_gap = np.meshgrid(self.log_lr, self.log_gap, indexing="ij")
        self.coarse = _grid_modes(
            optimizer, np.exp(log_lr).ravel(), -np.expm1(log_gap).ravel(), h, s0
        )

    def _run(self, modes, batch_size, target, hint, best: Optimum) -> Optimum:
        steps, row = _fewest_steps(modes, batch_size, target, self.grid.max_steps, hint)
        if row is None or steps >= best.steps:
            return best
        momentum = float(modes.momentum[row]) if self.optimizer.momentum else None
        return Optimum(steps, float(modes.lr[row]), momentum)

    def optimum(self, batch_size: float, target: float, hint=None, points=()) -> Optimum:
        """Fewest steps over the coarse grid, the extra ``(lr, b)`` ``points`` and the
        refined grids; ``hint`` is a step count at which some point is expected to have
        reached the target (it only speeds up the search).

        Refinement is a pattern search: a local grid spanning the neighbours of the best
        point; when the best moves to the local grid's edge the grid follows it at the same
        spacing (at most ``MAX_MOVES`` times), otherwise the spacing shrinks, ``refine_rounds``
        times in all.
        """
        grid = self.grid
        if self.coarse.initial_loss <= target:
            return Optimum(0, None, None)
        best = Optimum(math.inf, None, None)
        if points:
            lrs, momenta = zip(*points, strict=True)
            extra = _grid_modes(self.optimizer, lrs, momenta, self.h, self.s0)
            best = self._run(extra, batch_size, target, hint, best)
        hints = [c for c in (hint, best.steps) if c is not None and not math.isinf(c)]
        best = self._run(self.coarse, batch_size, target, min(hints, default=None), best)
        lr_spacing = (self.log_lr[-1] - self.log_lr[0]) / max(grid.lr_points - 1, 1)
        gap_spacing = -self.log_gap[-1] / max(len(self.log_gap) - 1, 1)
        shrinks, moves = 0, 0
        while shrinks < grid.refine_rounds and best.lr is not None:
            lrs, momenta = _local_points(
                best, lr_spacing, gap_spacing, grid.refine_points, self.log_gap[-1]
            )
            local = _grid_modes(self.optimizer, lrs, momenta, self.h, self.s0)
            moved = self._run(local, batch_size, target, int(best.steps), best)
            gap_step = abs(
                math.log1p(-(moved.momentum or 0.0)) - math.log1p(-(best.momentum or 0.0))
            )
            eff_step = abs(
                math.log(moved.lr / best.lr)
                - math.log1p(-(moved.momentum or 0.0))
                + math.log1p(-(best.momentum or 0.0))
            )
            on_edge = eff_step > 0.99 * lr_spacing or gap_step > 0.99 * gap_spacing > 0
            best = moved
            if on_edge and moves < MAX_MOVES:
                moves += 1
            else:
                shrinks += 1
                lr_spacing *= 2.0 / (grid.refine_points - 1)
                gap_spacing *= 2.0 / (grid.refine_points - 1)
        return best


def optimal_hyperparameters(
    optimizer: Optimizer,
    h: np.ndarray,
    batch_size: float,
    target: float = 0.01,
    grid: SearchGrid = SearchGrid(),
    hint: float | None = None,
    points: Sequence[tuple[float, float]] = (),
    s0: float = 1.0,
) -> Optimum:
    """Fewest steps to ``target`` over the learning-rate (and momentum) grid, refined, and
    over the extra ``(lr, momentum)`` ``points``.
    """
    search = _Search(optimizer, np.asarray(h, dtype=np.float64), grid, s0)
    return search.optimum(batch_size, target, hint, points)


def sweep_batch_sizes(
    optimizer: Optimizer,
    h: np.ndarray,
    batch_sizes: Sequence[int],
    target: float = 0.01,
    grid: SearchGrid = SearchGrid(),
    related: Sequence[Optimum] | None = None,
    progress: bool = False,
    desc: str = "nqm",
) -> list[Optimum]:
    """``optimal_hyperparameters`` for each batch size, in increasing order of batch size.

    The optimum at the previous (smaller) batch size is searched again as an extra point:
    at a fixed learning rate and momentum the loss at every step only falls as the batch
    grows (less noise), so the fewest steps can never rise with the batch size. ``related``:
    optima of another algorithm per batch size whose ``(lr, momentum or 0)`` are points of
    this one (e.g. SGD's for momentum, whose grid contains ``b = 0``); they are added too.
    """
    search = _Search(optimizer, np.asarray(h, dtype=np.float64), grid)
    order = np.argsort(batch_sizes, kind="stable")
    results: list[Optimum | None] = [None] * len(batch_sizes)
    previous = Optimum(math.inf, None, None)
    for index in tqdm(order, desc=desc, disable=not progress):
        points, hints = [], []
        for known in [previous] + ([related[index]] if related is not None else []):
            if known.lr is not None:
                points.append((known.lr, known.momentum or 0.0))
                hints.append(known.steps)
        previous = search.optimum(batch_sizes[index], target, min(hints, default=None), points)
        results[index] = previous
    return results


def critical_batch_size(
    batch_sizes: Sequence[int], steps: Sequence[float], speedup: float = 1.5
) -> int | None:
    """Smallest ``B`` with ``2B`` also swept and ``steps(B) / steps(2B) < speedup``.

    A batch size at which the target is unreachable is never critical. ``None`` when no
    doubling in the sweep falls below ``speedup`` (the sweep did not reach saturation).
    """
    by_batch = dict(zip(batch_sizes, steps, strict=True))
    for batch_size in sorted(by_batch):
        now, doubled = by_batch[batch_size], by_batch.get(2 * batch_size)
        if doubled is None or math.isinf(now) or doubled == 0:
            continue
        if now / doubled < speedup:
            return int(batch_size)
    return None


# --------------------------------------------------------------------------- schedules


def schedule_piece_steps(total_steps: int, pieces: int) -> np.ndarray:
    """Lengths of ``pieces`` consecutive pieces summing to ``total_steps``, as equal as
    possible (earlier pieces take the remainder), shape ``(pieces,)``.
    """
    base, extra = divmod(int(total_steps), pieces)
    return np.array([base + (k < extra) for k in range(pieces)], dtype=np.float64)


def schedule_final_loss(
    log_lrs: np.ndarray,
    piece_steps: np.ndarray,
    h: np.ndarray,
    batch_size: float,
    power: float = 0.0,
    s0: float = 1.0,
) -> tuple[float, np.ndarray]:
    """Final ``E[L]`` of (preconditioned) SGD under a piecewise-constant schedule, and its
    exact gradient with respect to ``log_lrs`` (shape ``(pieces,)``).

    Piece ``k`` (learning rate ``a = exp(log_lrs[k])``, ``n = piece_steps[k]`` steps) maps
    ``s -> s* + e (s - s*)`` with ``x = a P h``, ``e = (1 - x)^(2n)``, ``s* = a P / (B (2 - x))``;
    so ``ds'/ds = e`` and ``ds'/dlog a = (1 - e) ds*/dlog a + (s - s*) de/dlog a`` with
    ``ds*/dlog a = 2 s* / (2 - x)`` and ``de/dlog a = -2 n x e / (1 - x)``. The backward pass
    carries ``dL/ds`` from ``0.5 h`` through the ``e`` of later pieces.
    """
    h = np.asarray(h, dtype=np.float64)
    precond = preconditioner(h, power)
    lrs = np.exp(np.asarray(log_lrs, dtype=np.float64))
    s = np.full(h.size, s0)
    saved = []
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for lr, n in zip(lrs, piece_steps, strict=True):
            step = lr * precond
            x = step * h
            one_minus_x = 1.0 - x
            e = np.exp(np.where(n == 0, 0.0, 2.0 * n * _log_abs_one_minus(x)))
            s_star = step / (batch_size * (2.0 - x))
            saved.append((s, x, one_minus_x, e, s_star, n))
            s = s_star + e * (s - s_star)
        weight = 0.5 * h
        loss = float(weight @ s)
        grad = np.zeros(len(saved))
        adjoint = weight
        for k in range(len(saved) - 1, -1, -1):
            s_in, x, one_minus_x, e, s_star, n = saved[k]
            # e / (1 - x) -> 0 where x = 1 (there e = 0 for n >= 1; n = 0 has no effect).
            e_over = np.divide(e, one_minus_x, out=np.zeros_like(e), where=one_minus_x != 0)
            d_e = -2.0 * n * x * e_over
            d_star = 2.0 * s_star / (2.0 - x)
            grad[k] = adjoint @ ((1.0 - e) * d_star + (s_in - s_star) * d_e)
            adjoint = adjoint * e
    return loss, grad


@dataclass(frozen=True)
class Schedule:
    """A piecewise-constant schedule: ``lrs[k]`` for ``piece_steps[k]`` steps; final loss."""

    lrs: np.ndarray
    piece_steps: np.ndarray
    loss: float

    @property
    def total_steps(self) -> int:
        """The steps of all pieces together."""
        return int(self.piece_steps.sum())


def _lr_ceiling(h: np.ndarray, power: float) -> float:
    """Largest stable constant learning rate: ``x = a P h < 2`` in every dimension."""
    return 2.0 / float(np.max(preconditioner(h, power) * h))


def optimal_schedule(
    total_steps: int,
    h: np.ndarray,
    batch_size: float,
    pieces: int = 20,
    power: float = 0.0,
    init_lrs: np.ndarray | float = 0.01,
    lr_min: float = 1e-12,
    s0: float = 1.0,
) -> Schedule:
    """The piecewise-constant schedule of ``total_steps`` steps in ``pieces`` equal pieces
    that minimises the final expected loss (L-BFGS-B on ``log L`` over ``log a_k``, exact
    gradients, bounded to ``[lr_min, stability limit)``). Never worse than ``init_lrs``.
    """
    h = np.asarray(h, dtype=np.float64)
    piece_steps = schedule_piece_steps(total_steps, pieces)
    upper = math.log(_lr_ceiling(h, power)) + math.log1p(-1e-9)
    start = np.clip(np.log(np.broadcast_to(init_lrs, (pieces,))), math.log(lr_min), upper)

    def objective(log_lrs):
        loss, grad = schedule_final_loss(log_lrs, piece_steps, h, batch_size, power, s0)
        return math.log(loss), grad / loss

    result = minimize(
        objective,
        start,
        jac=True,
        method="L-BFGS-B",
        bounds=[(math.log(lr_min), upper)] * pieces,
        options={"maxiter": 500},
    )
    candidates = [start, result.x]
    losses = [schedule_final_loss(c, piece_steps, h, batch_size, power, s0)[0] for c in candidates]
    best = int(np.argmin(losses))
    return Schedule(np.exp(candidates[best]), piece_steps, losses[best])


@dataclass(frozen=True)
class ScheduleResult:
    """Fewest steps with an optimised schedule: the schedule reaches the target at
    ``steps``; at ``steps_lower`` the optimiser found none that does.
    """

    steps: int
    steps_lower: int
    schedule: Schedule


def fewest_steps_with_schedule(
    h: np.ndarray,
    batch_size: float,
    target: float,
    constant: Optimum,
    pieces: int = 20,
    power: float = 0.0,
    rel_tol: float = 1e-3,
    s0: float = 1.0,
) -> ScheduleResult | None:
    """Bisection over the total number of steps for the fewest at which an optimised
    schedule reaches ``target``, to a bracket width ``max(1, rel_tol * steps)``.

    The bracket holds by construction: the upper end starts at the constant-rate answer
    ``constant`` with the schedule initialised to that constant rate (the optimiser never
    returns worse), and 0 steps are above the target. ``None`` if ``constant`` is unreachable.
    """
    if constant.lr is None or math.isinf(constant.steps):
        return None
    h = np.asarray(h, dtype=np.float64)
    lo, hi = 0, int(constant.steps)
    best = optimal_schedule(hi, h, batch_size, pieces, power, constant.lr, s0=s0)
    while hi - lo > max(1, int(rel_tol * hi)):
        mid = (lo + hi) // 2
        # Pieces are fractions of the run, so the schedule found for hi steps is a good start.
        candidate = optimal_schedule(mid, h, batch_size, pieces, power, best.lrs, s0=s0)
        if candidate.loss <= target:
            hi, best = mid, candidate
        else:
            lo = mid
    return ScheduleResult(hi, lo, best)


# --------------------------------------------------------------------------- Monte Carlo


def simulate_nqm(  # noqa: PLR0913, PLR0917 (a check taking the closed forms' settings)
    lr: float,
    batch_size: float,
    h: np.ndarray,
    steps: int,
    runs: int,
    momentum: float = 0.0,
    power: float = 0.0,
    ema_decay: float | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Monte-Carlo run of the actual stochastic updates: ``runs`` independent runs from
    ``x_0 ~ N(0, I)`` with Gaussian gradient noise of variance ``h / B``; heavy-ball momentum,
    preconditioner ``h^-p`` and an EMA of the iterates as in the module docstring.

    Returns the mean loss over runs after each step ``0..steps`` and its standard error,
    both shape ``(steps + 1,)``.
    """
    rng = np.random.default_rng(seed)
    h = np.asarray(h, dtype=np.float64)
    step = lr * preconditioner(h, power)
    noise_std = np.sqrt(nqm_noise_variance(h, batch_size))
    theta = rng.standard_normal((runs, h.size))
    velocity = np.zeros_like(theta)
    average = theta.copy()
    weight = 0.5 * h
    losses = np.empty((steps + 1, runs))
    losses[0] = (theta * theta) @ weight
    for t in range(1, steps + 1):
        gradient = h * theta + noise_std * rng.standard_normal(theta.shape)
        velocity = momentum * velocity - step * gradient
        theta = theta + velocity
        if ema_decay is None:
            losses[t] = (theta * theta) @ weight
        else:
            average = ema_decay * average + (1.0 - ema_decay) * theta
            losses[t] = (average * average) @ weight
    return losses.mean(axis=1), losses.std(axis=1, ddof=1) / math.sqrt(runs)
