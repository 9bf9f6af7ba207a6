"""Tests for hessov.optim: our optimizers and schedules against steps computed by hand.

Eve, ScaledAdam, Lookahead and every schedule are checked against closed-form arithmetic on
tensors of 1 to 3 elements (float64, so the references are exact to rounding). Every
optimizer name builds from a config and takes a step; every optimizer (also wrapped in
Lookahead) and every schedule resumes from a saved state dict with bit-identical steps; bad
names and values raise errors naming the configuration key.
"""

from __future__ import annotations

import io
import math

import pytest
import torch

from hessov.config import OptimizerConfig, ScheduleConfig
from hessov.optim import (
    OPTIMIZER_NAMES,
    SCHEDULE_NAMES,
    Eve,
    Lookahead,
    ScaledAdam,
    StepDecay,
    build_optimizer,
    build_schedule,
)
from hessov.optim.scaled_adam import SCALE_UPDATE_PERIOD


def _param(values) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.tensor(values, dtype=torch.float64))


def _step(optimizer: torch.optim.Optimizer, param: torch.Tensor, grad) -> None:
    param.grad = torch.tensor(grad, dtype=torch.float64).reshape(param.shape)
    optimizer.step()


def _adam_directions(grads: list[list[float]], beta1: float, beta2: float, eps: float):
    """Per step and element, Adam's m_hat / (sqrt(v_hat) + eps) (Kingma & Ba 2015, Alg. 1)."""
    first = [0.0] * len(grads[0])
    second = [0.0] * len(grads[0])
    directions = []
    for step, grad in enumerate(grads, start=1):
        first = [beta1 * m + (1 - beta1) * g for m, g in zip(first, grad, strict=True)]
        second = [beta2 * v + (1 - beta2) * g * g for v, g in zip(second, grad, strict=True)]
        directions.append(
            [
                (m / (1 - beta1**step)) / (math.sqrt(v / (1 - beta2**step)) + eps)
                for m, v in zip(first, second, strict=True)
            ]
        )
    return directions


def _assert_values(param: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(param.detach(), torch.tensor(expected, dtype=torch.float64))


# ----------------------------------------------------------------------------- Eve


def test_eve_decays_while_rms_above_target():
    lr, beta1, beta2, eps, weight_decay = 0.01, 0.9, 0.99, 1e-8, 1e-3
    param = _param([3.0, 4.0])  # rms 3.54 > target_rms 0.1: decay is on
    optimizer = Eve([param], lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay)
    grads = [[1.0, 2.0], [-0.5, 1.0]]
    directions = _adam_directions(grads, beta1, beta2, eps)

    _step(optimizer, param, grads[0])
    # Decay is a fixed fraction per step, not multiplied by lr.
    after_one = [
        p * (1 - weight_decay) - lr * d for p, d in zip([3.0, 4.0], directions[0], strict=True)
    ]
    _assert_values(param, after_one)

    _step(optimizer, param, grads[1])
    after_two = [
        p * (1 - weight_decay) - lr * d for p, d in zip(after_one, directions[1], strict=True)
    ]
    _assert_values(param, after_two)


def test_eve_no_decay_below_target_rms():
    lr, eps = 0.01, 1e-8
    param = _param([0.01, -0.02])  # rms 0.016 < 0.1: plain Adam
    optimizer = Eve([param], lr=lr, betas=(0.9, 0.99), eps=eps, weight_decay=0.05)
    _step(optimizer, param, [1.0, -3.0])
    # First Adam step: m_hat / sqrt(v_hat) = g / |g|.
    _assert_values(param, [0.01 - lr * 1.0 / (1.0 + eps), -0.02 + lr * 3.0 / (3.0 + eps)])


def test_eve_decay_switches_off_when_rms_reaches_target():
    # lr = 0 and zero gradients isolate the decay: only the norm test decides.
    param = _param([0.1001, 0.1001])  # rms 0.1001, just above target 0.1
    optimizer = Eve([param], lr=0.0, weight_decay=0.01, target_rms=0.1)
    _step(optimizer, param, [0.0, 0.0])
    _assert_values(param, [0.1001 * 0.99, 0.1001 * 0.99])  # 0.099099: now below target
    _step(optimizer, param, [0.0, 0.0])
    _assert_values(param, [0.1001 * 0.99, 0.1001 * 0.99])


def test_eve_never_decays_scalars():
    param = _param(5.0)
    optimizer = Eve([param], lr=0.0, weight_decay=0.01)
    _step(optimizer, param, 1.0)
    assert param.item() == 5.0


# ----------------------------------------------------------------------------- ScaledAdam


def test_scaled_adam_step_is_scaled_by_parameter_rms():
    lr, beta1, beta2, eps = 0.01, 0.9, 0.99, 1e-8
    initial = [3.0, 4.0]
    rms = math.sqrt((9.0 + 16.0) / 2)
    param = _param(initial)
    optimizer = ScaledAdam([param], lr=lr, betas=(beta1, beta2), eps=eps)
    # Norms 2.24 then 1.12: the second is below 2 x median, so nothing is clipped.
    grads = [[1.0, 2.0], [-0.5, 1.0]]
    directions = _adam_directions(grads, beta1, beta2, eps)

    _step(optimizer, param, grads[0])
    after_one = [p - lr * rms * d for p, d in zip(initial, directions[0], strict=True)]
    _assert_values(param, after_one)

    # param_rms is held until the periodic refresh, so step two still uses the initial rms.
    _step(optimizer, param, grads[1])
    _assert_values(param, [p - lr * rms * d for p, d in zip(after_one, directions[1], strict=True)])


def test_scaled_adam_rms_is_clamped_at_param_min_rms():
    lr, eps, min_rms = 0.1, 1e-8, 1e-5
    param = _param([0.0, 0.0])
    optimizer = ScaledAdam([param], lr=lr, eps=eps, param_min_rms=min_rms)
    _step(optimizer, param, [1.0, -1.0])
    step = lr * min_rms * 1.0 / (1.0 + eps)
    _assert_values(param, [-step, step])


def test_scaled_adam_scalar_gets_plain_adam_with_scaled_lr():
    lr, scalar_lr_scale, eps = 0.1, 0.1, 1e-8
    param = _param(50.0)  # no rms scaling: the step does not grow with the value
    optimizer = ScaledAdam([param], lr=lr, scalar_lr_scale=scalar_lr_scale, eps=eps)
    _step(optimizer, param, -2.0)
    assert param.item() == pytest.approx(50.0 + lr * scalar_lr_scale * 2.0 / (2.0 + eps), abs=1e-14)


def test_scaled_adam_clips_at_clipping_scale_times_median_norm():
    lr, beta1, beta2, eps = 0.01, 0.9, 0.99, 1e-8
    param = _param([1.0, 1.0])  # rms 1
    optimizer = ScaledAdam([param], lr=lr, betas=(beta1, beta2), eps=eps, clipping_scale=2.0)
    # Total norms 1, 1, 10: median of [1, 1, 10] is 1, so the third is clipped to norm 2.
    grads = [[0.6, 0.8], [0.6, 0.8], [6.0, 8.0]]
    for grad in grads:
        _step(optimizer, param, grad)

    clipped = [[0.6, 0.8], [0.6, 0.8], [1.2, 1.6]]
    expected = [
        1.0 - lr * sum(d[i] for d in _adam_directions(clipped, beta1, beta2, eps)) for i in range(2)
    ]
    unclipped = [
        1.0 - lr * sum(d[i] for d in _adam_directions(grads, beta1, beta2, eps)) for i in range(2)
    ]
    # The check has power: without clipping the result would be visibly different.
    assert abs(expected[1] - unclipped[1]) > 1e-4
    _assert_values(param, expected)
    assert optimizer.state[param]["grad_norms_seen"] == 3


def test_scaled_adam_learns_log_scale_every_period():
    # betas = (0, 0) make each Adam direction g / (|g| + eps) and the scale's second moment
    # the mean square of the last P scale gradients, so the whole run is closed form.
    # Clipping is off here; it is tested separately.
    lr, scalar_lr_scale, eps = 0.01, 0.1, 1e-8
    param = _param([1.5, 2.0])  # rms 1.77, inside [param_min_rms, param_max_rms]
    optimizer = ScaledAdam(
        [param],
        lr=lr,
        betas=(0.0, 0.0),
        eps=eps,
        scalar_lr_scale=scalar_lr_scale,
        clipping_scale=0.0,
    )
    assert SCALE_UPDATE_PERIOD == 4
    grad = [1.0, 1.0]
    direction = 1.0 / (1.0 + eps)
    rms_0 = math.sqrt((1.5**2 + 2.0**2) / 2)

    values = [1.5, 2.0]
    scale_grads = []
    for _ in range(3):
        scale_grads.append(sum(values))  # sum(p * g) with g = 1
        values = [v - lr * rms_0 * direction for v in values]
        _step(optimizer, param, grad)
    _assert_values(param, values)  # three steps, all with the initial rms

    scale_grads.append(sum(values))
    scale_lr = lr * scalar_lr_scale * SCALE_UPDATE_PERIOD
    mean_square = sum(s * s for s in scale_grads) / 4
    log_scale_step = -scale_lr * (sum(scale_grads) / 4) / (math.sqrt(mean_square) + eps)
    values = [v * math.exp(log_scale_step) for v in values]
    rms_4 = math.sqrt(sum(v * v for v in values) / 2)
    values = [v - lr * rms_4 * direction for v in values]
    _step(optimizer, param, grad)
    _assert_values(param, values)
    assert optimizer.state[param]["param_rms"].item() == pytest.approx(rms_4, rel=1e-12)

    _step(optimizer, param, grad)  # between refreshes the new rms is held
    _assert_values(param, [v - lr * rms_4 * direction for v in values])


@pytest.mark.parametrize(
    ("initial", "direction"), [([1e-7, -1e-7], 1.0), ([5.0, -5.0], -1.0)], ids=["grow", "shrink"]
)
def test_scaled_adam_rms_limits_force_the_scale(initial, direction):
    # Zero gradients: the Adam steps are zero and the learned direction would be zero too, so
    # any change comes from the rms limits (1e-5 and 3.0).
    lr, scalar_lr_scale = 0.01, 0.1
    param = _param(initial)
    optimizer = ScaledAdam([param], lr=lr, scalar_lr_scale=scalar_lr_scale)
    for _ in range(SCALE_UPDATE_PERIOD):
        _step(optimizer, param, [0.0, 0.0])
    factor = math.exp(direction * lr * scalar_lr_scale * SCALE_UPDATE_PERIOD)
    _assert_values(param, [v * factor for v in initial])


# ----------------------------------------------------------------------------- Lookahead


def test_lookahead_syncs_slow_weights_every_k_steps():
    param = _param([1.0, 2.0])
    optimizer = Lookahead(torch.optim.SGD([param], lr=0.1), k=2, alpha=0.5)
    grad = [1.0, -1.0]  # each fast SGD step moves by (-0.1, +0.1)

    _step(optimizer, param, grad)
    _assert_values(param, [0.9, 2.1])
    _step(optimizer, param, grad)  # fast (0.8, 2.2); slow (1, 2) + 0.5 (fast - slow)
    _assert_values(param, [0.9, 2.1])
    _step(optimizer, param, grad)
    _assert_values(param, [0.8, 2.2])
    _step(optimizer, param, grad)  # fast (0.7, 2.3); slow (0.9, 2.1) + 0.5 (fast - slow)
    _assert_values(param, [0.8, 2.2])
    _assert_values(optimizer.state[param]["slow_param"], [0.8, 2.2])


def test_lookahead_shares_param_groups_with_scheduler():
    param = _param([1.0])
    optimizer = Lookahead(torch.optim.SGD([param], lr=0.1), k=100, alpha=0.5)
    schedule = StepDecay(optimizer, gamma=0.5, step_size=1)
    _step(optimizer, param, [1.0])
    schedule.step()
    assert optimizer.inner_optimizer.param_groups[0]["lr"] == 0.05
    _step(optimizer, param, [1.0])
    _assert_values(param, [1.0 - 0.1 - 0.05])


# ----------------------------------------------------------------------------- build_optimizer

_EXPECTED_CLASSES = {
    "SGD": torch.optim.SGD,
    "Adam": torch.optim.Adam,
    "AdamW": torch.optim.AdamW,
    "RMSprop": torch.optim.RMSprop,
    "Adagrad": torch.optim.Adagrad,
    "NAdam": torch.optim.NAdam,
    "RAdam": torch.optim.RAdam,
    "Eve": Eve,
    "ScaledAdam": ScaledAdam,
}


def test_optimizer_names_are_the_documented_ones():
    assert set(OPTIMIZER_NAMES) == set(_EXPECTED_CLASSES)


def _make_params(seed: int = 0) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(2, 3, generator=generator)),
        torch.nn.Parameter(torch.randn(3, generator=generator)),
        torch.nn.Parameter(torch.randn((), generator=generator)),  # ScaledAdam's scalar path
    ]


def _set_grads(params: list[torch.Tensor], step: int) -> None:
    # Depends on the parameters, so a resumed run only matches if the state was restored.
    for index, param in enumerate(params):
        param.grad = torch.sin(param.detach() * (step + 1) + index)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
@pytest.mark.parametrize("lookahead_k", [0, 3])
def test_build_optimizer_builds_and_steps(name, lookahead_k):
    cfg = OptimizerConfig(name=name, lr=0.01, momentum=0.9, lookahead_k=lookahead_k)
    params = _make_params()
    before = [p.detach().clone() for p in params]
    optimizer = build_optimizer(params, cfg)

    inner = optimizer
    if lookahead_k:
        assert isinstance(optimizer, Lookahead)
        assert optimizer.k == 3
        inner = optimizer.inner_optimizer
    assert type(inner) is _EXPECTED_CLASSES[name]
    assert inner.param_groups[0]["lr"] == 0.01

    _set_grads(params, 0)
    optimizer.step()
    assert not torch.equal(params[0].detach(), before[0])


def test_build_optimizer_passes_the_fields_each_accepts():
    sgd = build_optimizer(
        _make_params(), OptimizerConfig(name="SGD", momentum=0.9, nesterov=True, dampening=0.0)
    )
    assert sgd.param_groups[0]["momentum"] == 0.9 and sgd.param_groups[0]["nesterov"] is True
    rmsprop = build_optimizer(_make_params(), OptimizerConfig(name="RMSprop", alpha=0.9))
    assert rmsprop.param_groups[0]["alpha"] == 0.9
    adam = build_optimizer(_make_params(), OptimizerConfig(name="Adam", betas=[0.8, 0.95]))
    assert adam.param_groups[0]["betas"] == (0.8, 0.95)
    eve = build_optimizer(
        _make_params(), OptimizerConfig(name="Eve", target_rms=0.2, weight_decay=1e-3)
    )
    assert eve.param_groups[0]["target_rms"] == 0.2
    assert eve.param_groups[0]["weight_decay"] == 1e-3
    scaled_adam = build_optimizer(
        _make_params(),
        OptimizerConfig(name="ScaledAdam", scalar_lr_scale=0.2, clipping_scale=3.0),
    )
    assert scaled_adam.param_groups[0]["scalar_lr_scale"] == 0.2
    assert scaled_adam.clipping_scale == 3.0


def test_build_optimizer_unknown_name_names_key_and_lists_valid():
    with pytest.raises(ValueError, match=r"optimizer\.name.*Bogus.*ScaledAdam"):
        build_optimizer(_make_params(), OptimizerConfig(name="Bogus"))


@pytest.mark.parametrize(
    ("cfg", "key"),
    [
        (OptimizerConfig(name="SGD", nesterov=True, momentum=0.0), "optimizer.nesterov"),
        (OptimizerConfig(name="Adam", betas=[0.9]), "optimizer.betas"),
        (OptimizerConfig(name="Adam", lookahead_k=-1), "optimizer.lookahead_k"),
        (OptimizerConfig(name="Adam", lookahead_k=2, lookahead_alpha=0.0), "lookahead_alpha"),
        (OptimizerConfig(name="Eve", lr=-1.0), "optimizer.name: Eve"),
    ],
)
def test_build_optimizer_bad_values_name_the_key(cfg, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        build_optimizer(_make_params(), cfg)


# ----------------------------------------------------------------------------- schedules


def _schedule_lrs(cfg: ScheduleConfig, steps: list[int], **kwargs) -> list[float]:
    """The lr of the optimizer after ``s`` scheduler steps, for each ``s`` in ``steps``."""
    optimizer = torch.optim.SGD([_param([0.0])], lr=0.1)
    schedule = build_schedule(optimizer, cfg, **kwargs)
    lrs = []
    for step in range(max(steps) + 1):
        if step in steps:
            lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()  # no gradient: a no-op, but keeps torch's call-order check quiet
        schedule.step()
    return lrs


_RUN = dict(max_steps=10, steps_per_epoch=5)


def test_schedule_constant():
    assert _schedule_lrs(ScheduleConfig(name="constant"), [0, 1, 9], **_RUN) == [0.1] * 3


def test_schedule_warmup_then_constant():
    lrs = _schedule_lrs(ScheduleConfig(name="warmup", warmup_steps=4), [0, 1, 3, 10], **_RUN)
    assert lrs == pytest.approx([0.1 * 1 / 4, 0.1 * 2 / 4, 0.1, 0.1], rel=1e-12)


def test_schedule_step_with_warmup():
    cfg = ScheduleConfig(name="step", gamma=0.5, step_size=3, warmup_steps=2)
    # After the 2 warmup steps the decay clock restarts: t = s - 2.
    lrs = _schedule_lrs(cfg, [0, 1, 2, 4, 5, 8], **_RUN)
    assert lrs == pytest.approx([0.05, 0.1, 0.1, 0.1, 0.05, 0.025], rel=1e-12)


def test_schedule_cosine_with_warmup():
    cfg = ScheduleConfig(name="cosine", min_lr=0.01, warmup_steps=2)
    lrs = _schedule_lrs(cfg, [0, 1, 2, 6, 8, 10, 12], **_RUN)
    # Decay over T = 10 - 2 = 8 steps: cos(pi * t / 8) at t = 0, 4, 6, 8 and after.
    cosine = [0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi * t / 8)) for t in (0, 4, 6)]
    assert lrs == pytest.approx([0.05, 0.1, *cosine, 0.01, 0.01], rel=1e-12)
    assert lrs[3] == pytest.approx(0.055, rel=1e-12)


def test_schedule_eden():
    cfg = ScheduleConfig(name="eden", eden_batches=10.0, eden_epochs=2.0)
    lrs = _schedule_lrs(cfg, [0, 7, 250, 1000], max_steps=10, steps_per_epoch=5)

    def eden(batch: int, epoch: int, warmup: float) -> float:
        return 0.1 * ((batch**2 + 100) / 100) ** -0.25 * ((epoch**2 + 4) / 4) ** -0.25 * warmup

    expected = [
        0.1 * 0.5,  # b = 0, e = 0: only the warmup factor 0.5
        eden(7, 1, 0.5 + 0.5 * 7 / 500),
        eden(250, 50, 0.75),
        eden(1000, 200, 1.0),
    ]
    assert lrs == pytest.approx(expected, rel=1e-12)


def test_schedule_unknown_name_names_key():
    optimizer = torch.optim.SGD([_param([0.0])], lr=0.1)
    with pytest.raises(ValueError, match=r"schedule\.name.*linear.*eden"):
        build_schedule(optimizer, ScheduleConfig(name="linear"), **_RUN)
    assert set(SCHEDULE_NAMES) == {"constant", "step", "cosine", "warmup", "eden"}


@pytest.mark.parametrize(
    ("cfg", "key"),
    [
        (ScheduleConfig(name="warmup", warmup_steps=0), "schedule.warmup_steps"),
        (ScheduleConfig(name="constant", warmup_steps=5), "schedule.warmup_steps"),
        (ScheduleConfig(name="eden", warmup_steps=5), "schedule.warmup_steps"),
        (ScheduleConfig(name="cosine", warmup_steps=10), "schedule.name: cosine"),
        (ScheduleConfig(name="step", step_size=0), "schedule.name: step"),
    ],
)
def test_schedule_bad_values_name_the_key(cfg, key):
    optimizer = torch.optim.SGD([_param([0.0])], lr=0.1)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        build_schedule(optimizer, cfg, **_RUN)


# ----------------------------------------------------------------------------- checkpointing


def _train(optimizer, schedule, params, first_step: int, num_steps: int) -> list[float]:
    lrs = []
    for step in range(first_step, first_step + num_steps):
        _set_grads(params, step)
        optimizer.step()
        schedule.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


def _resume_matches(
    optimizer_cfg: OptimizerConfig,
    schedule_cfg: ScheduleConfig,
    load_optimizer_first: bool = False,
    restore_optimizer: bool = True,
) -> bool:
    """Train 5 + 6 steps straight, and 5, save, rebuild, load, 6; are the results identical?"""
    run = dict(max_steps=20, steps_per_epoch=3)
    params = _make_params()
    optimizer = build_optimizer(params, optimizer_cfg)
    schedule = build_schedule(optimizer, schedule_cfg, **run)
    _train(optimizer, schedule, params, 0, 5)

    buffer = io.BytesIO()
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "params": [p.detach().clone() for p in params],
        },
        buffer,
    )
    straight_lrs = _train(optimizer, schedule, params, 5, 6)

    buffer.seek(0)
    snapshot = torch.load(buffer, weights_only=True)  # what a real checkpoint allows
    resumed_params = [torch.nn.Parameter(p) for p in snapshot["params"]]
    resumed_optimizer = build_optimizer(resumed_params, optimizer_cfg)
    if load_optimizer_first:
        resumed_optimizer.load_state_dict(snapshot["optimizer"])
    resumed_schedule = build_schedule(resumed_optimizer, schedule_cfg, **run)
    if restore_optimizer and not load_optimizer_first:
        resumed_optimizer.load_state_dict(snapshot["optimizer"])
    resumed_schedule.load_state_dict(snapshot["schedule"])
    resumed_lrs = _train(resumed_optimizer, resumed_schedule, resumed_params, 5, 6)

    return resumed_lrs == straight_lrs and all(
        torch.equal(a, b) for a, b in zip(params, resumed_params, strict=True)
    )


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
@pytest.mark.parametrize("lookahead_k", [0, 3])
def test_optimizer_state_dict_round_trip_is_bit_identical(name, lookahead_k):
    # 5 + 6 steps cross ScaledAdam's scale updates (steps 4 and 8) and Lookahead syncs
    # mid-cycle; the cosine schedule changes the lr at every step.
    optimizer_cfg = OptimizerConfig(name=name, lr=0.01, momentum=0.9, lookahead_k=lookahead_k)
    assert _resume_matches(optimizer_cfg, ScheduleConfig(name="cosine", warmup_steps=2))


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
@pytest.mark.parametrize("load_optimizer_first", [False, True])
def test_schedule_state_dict_round_trip_is_bit_identical(name, load_optimizer_first):
    warmup_steps = 0 if name in ("constant", "eden") else 3
    schedule_cfg = ScheduleConfig(name=name, step_size=4, warmup_steps=warmup_steps)
    assert _resume_matches(
        OptimizerConfig(name="Adam", lr=0.01), schedule_cfg, load_optimizer_first
    )


@pytest.mark.parametrize(
    "optimizer_cfg",
    [OptimizerConfig(name="ScaledAdam", lr=0.01), OptimizerConfig(name="SGD", lookahead_k=3)],
    ids=["ScaledAdam", "Lookahead"],
)
def test_resume_without_optimizer_state_is_detected(optimizer_cfg):
    # Guards the round-trip tests' power: losing the state must change the trajectory.
    assert not _resume_matches(
        optimizer_cfg, ScheduleConfig(name="constant"), restore_optimizer=False
    )
