"""Tests of the noisy quadratic model (``analysis/nqm.py``) and the ``hessov nqm`` stage.

They check the closed forms against the recursions they solve (the 3x3 second-moment system
included, and repeated squaring for long horizons), against Monte-Carlo runs of the actual
stochastic updates, the steps-to-target bisection against a linear scan, and the seed
notebook's claims (Zhang et al. 2019, "Which Algorithmic Choices Matter at Which Batch
Sizes?"): linear scaling of the optimal SGD learning rate and of the steps at small batch
sizes, saturation at large ones, and a critical batch size that momentum and preconditioning
raise. K = 1000 (the paper's allowed reduction) keeps the sweeps fast.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import numpy as np
import pytest
from omegaconf import OmegaConf

from hessov.analysis.nqm import (
    Optimizer,
    Optimum,
    critical_batch_size,
    ema_second_moment,
    expected_loss,
    fewest_steps_with_schedule,
    momentum_second_moment,
    momentum_transition_matrix,
    nqm_curvatures,
    nqm_noise_variance,
    optimal_hyperparameters,
    optimal_schedule,
    preconditioner,
    schedule_final_loss,
    schedule_piece_steps,
    sgd_second_moment,
    simulate_nqm,
    steps_to_target,
    sweep_batch_sizes,
)
from hessov.config import CONFIG_DIR
from hessov.errors import ConfigError
from hessov.stages.nqm import NQMConfig, load_nqm_config, run_nqm, validate_nqm_config

BATCH_SIZES = [2**k for k in range(2, 22)]
SGD, MOMENTUM, ADAM_LIKE = Optimizer(), Optimizer(momentum=True), Optimizer(power=0.5)


def _noise(lr, power, h, batch_size):
    """Injected noise ``q = (a P)^2 h / B`` per dimension."""
    return (lr * preconditioner(h, power)) ** 2 * nqm_noise_variance(h, batch_size)


def test_model_definitions():
    h = nqm_curvatures(4)
    np.testing.assert_allclose(h, [1, 1 / 2, 1 / 3, 1 / 4])
    np.testing.assert_allclose(nqm_noise_variance(h, 8), h / 8)
    np.testing.assert_allclose(preconditioner(h, 0.5), np.sqrt([1, 2, 3, 4]))
    with pytest.raises(ValueError, match="K"):
        nqm_curvatures(0)


@pytest.mark.parametrize("lr, power", [(0.3, 0.0), (1.0, 0.0), (1.95, 0.0), (0.05, 0.5)])
def test_sgd_closed_form_matches_the_recursion(lr, power):
    h, batch_size = nqm_curvatures(30), 8.0
    x = lr * preconditioner(h, power) * h
    s = np.ones_like(h)
    for t in range(1, 201):
        s = (1 - x) ** 2 * s + _noise(lr, power, h, batch_size)
        if t in (1, 7, 200):
            np.testing.assert_allclose(
                sgd_second_moment(t, lr, h, batch_size, power), s, rtol=1e-12
            )


# Underdamped, overdamped, b = 0 with x = 1 (nilpotent), critical damping to the last bit,
# negative real roots (x > (1 + sqrt b)^2), preconditioned.
MOMENTUM_CASES = [
    (0.5, 0.9, 0.0),
    (0.1, 0.99, 0.0),
    (1.0, 0.0, 0.0),
    ((1 - math.sqrt(0.5)) ** 2, 0.5, 0.0),
    (3.0, 0.9, 0.0),
    (1.9, 0.3, 0.0),
    (0.02, 0.9, 0.5),
]


@pytest.mark.parametrize("lr, b, power", MOMENTUM_CASES)
def test_momentum_closed_form_matches_the_3x3_system(lr, b, power):
    h, batch_size = nqm_curvatures(40), 16.0
    transition = momentum_transition_matrix(lr, b, h, power)
    noise = _noise(lr, power, h, batch_size)
    state = np.zeros((h.size, 3))
    state[:, 0] = 1.0
    for t in range(1, 301):
        state = np.einsum("kij,kj->ki", transition, state) + noise[:, None]
        if t in (1, 2, 3, 50, 300):
            np.testing.assert_allclose(
                momentum_second_moment(t, lr, b, h, batch_size, power), state[:, 0], rtol=1e-11
            )


@pytest.mark.parametrize("t", [10**6, 12_345_679, 10**7])
def test_momentum_is_stable_for_long_horizons(t):
    """Against repeated squaring of the 4x4 affine map (3x3 moments plus the constant)."""
    h, batch_size, lr, b = nqm_curvatures(1000)[::50], 64.0, 2e-4, 0.999
    affine = np.zeros((h.size, 4, 4))
    affine[:, :3, :3] = momentum_transition_matrix(lr, b, h)
    affine[:, :3, 3] = _noise(lr, 0.0, h, batch_size)[:, None]
    affine[:, 3, 3] = 1.0
    state = np.linalg.matrix_power(affine, t) @ np.array([1.0, 0.0, 0.0, 1.0])
    np.testing.assert_allclose(
        momentum_second_moment(t, lr, b, h, batch_size), state[:, 0], rtol=1e-7
    )


@pytest.mark.parametrize("lr, decay", [(0.5, 0.9), (1.5, 0.3), (1.0, 0.5), (0.02, 0.98)])
def test_ema_closed_form_matches_the_recursion(lr, decay):
    h, batch_size, g = nqm_curvatures(30), 8.0, decay
    x, q = lr * h, _noise(lr, 0.0, h, batch_size)
    s, cross, avg = np.ones_like(h), np.ones_like(h), np.ones_like(h)
    for t in range(1, 201):
        s, cross, avg = (
            (1 - x) ** 2 * s + q,
            (1 - x) * ((1 - g) * (1 - x) * s + g * cross) + (1 - g) * q,
            (1 - g) ** 2 * ((1 - x) ** 2 * s + q) + 2 * g * (1 - g) * (1 - x) * cross + g * g * avg,
        )
        if t in (1, 5, 200):
            np.testing.assert_allclose(
                ema_second_moment(t, lr, decay, h, batch_size), avg, rtol=1e-11
            )


MC_CASES = {
    "sgd": dict(lr=0.5, batch_size=4),
    "momentum": dict(lr=0.1, batch_size=4, momentum=0.9),
    "precond": dict(lr=0.2, batch_size=8, power=0.5),
    "ema": dict(lr=0.8, batch_size=2, ema_decay=0.9),
}


@pytest.mark.parametrize("case", MC_CASES)
def test_exact_dynamics_agree_with_monte_carlo(case):
    """Mean loss of 4000 simulated runs within 4.5 standard errors of the exact E[L]."""
    kwargs = MC_CASES[case]
    h, steps = nqm_curvatures(20), 150
    mean, stderr = simulate_nqm(h=h, steps=steps, runs=4000, seed=1, **kwargs)
    optimizer = Optimizer(kwargs.get("power", 0.0), "momentum" in kwargs, kwargs.get("ema_decay"))
    exact = expected_loss(
        optimizer, kwargs["lr"], kwargs["batch_size"], h, range(steps + 1),
        kwargs.get("momentum", 0.0),
    )  # fmt: skip
    z = np.abs(mean - exact) / stderr
    assert z[0] < 4.5 and np.max(z[[1, 5, 20, 60, 150]]) < 4.5, z[[0, 1, 5, 20, 60, 150]]


@pytest.mark.parametrize(
    "optimizer, lr, momentum",
    [
        (SGD, 0.3, 0.0),
        (ADAM_LIKE, 0.05, 0.0),
        (MOMENTUM, 0.05, 0.9),
        (Optimizer(ema_decay=0.9), 0.3, 0.0),
    ],
)
def test_steps_to_target_is_the_first_crossing(optimizer, lr, momentum):
    h, batch_size, target = nqm_curvatures(50), 256.0, 0.05
    steps = steps_to_target(optimizer, lr, batch_size, h, target, momentum)
    losses = expected_loss(optimizer, lr, batch_size, h, range(steps + 1), momentum)
    assert losses[steps] <= target < losses[steps - 1]
    assert int(np.argmax(losses <= target)) == steps  # linear scan: no earlier crossing


def test_unreachable_targets_are_infinite_and_reached_ones_exact():
    h = nqm_curvatures(100)
    stationary_too_high = steps_to_target(SGD, 1.0, 4, h, 0.01)
    unstable = steps_to_target(SGD, 2.5, 10**6, h, 0.01)
    beyond_max_steps = steps_to_target(SGD, 1e-6, 10**6, h, 0.01, max_steps=1000)
    assert math.isinf(stationary_too_high) and math.isinf(unstable)
    assert math.isinf(beyond_max_steps)
    assert steps_to_target(SGD, 0.1, 4, h, target=100.0) == 0
    assert steps_to_target(MOMENTUM, 1.0, 4, h, 0.01, momentum=1.0) == math.inf


@pytest.fixture(scope="module")
def sweeps():
    """Fewest steps per batch size, 2^2 .. 2^21, K = 1000, target 0.01."""
    h = nqm_curvatures(1000)
    sgd = sweep_batch_sizes(SGD, h, BATCH_SIZES)
    return {
        "sgd": sgd,
        "precond": sweep_batch_sizes(ADAM_LIKE, h, BATCH_SIZES),
        "momentum": sweep_batch_sizes(MOMENTUM, h, BATCH_SIZES, related=sgd),
    }


def _at(optima: list[Optimum], batch_size: int) -> Optimum:
    return optima[BATCH_SIZES.index(batch_size)]


@pytest.mark.parametrize("small", [4, 8])
def test_small_batch_sgd_scales_linearly(sweeps, small):
    """16x the batch: 16x the optimal learning rate and 1/16 of the steps, within 10%
    (at K = 1000 the linear regime ends near B = 128; the critical batch size is 512).
    """
    low, high = _at(sweeps["sgd"], small), _at(sweeps["sgd"], 16 * small)
    assert high.lr / low.lr == pytest.approx(16, rel=0.1)
    assert low.steps / high.steps == pytest.approx(16, rel=0.1)


def test_steps_saturate_at_large_batch_sizes(sweeps):
    for name, optima in sweeps.items():
        assert _at(optima, 2**20).steps / _at(optima, 2**21).steps < 1.03, name
        assert _at(optima, 2**17).steps / _at(optima, 2**21).steps < 1.15, name


def test_steps_never_rise_with_batch_size_and_momentum_never_loses(sweeps):
    for name, optima in sweeps.items():
        steps = [o.steps for o in optima]
        assert all(a >= b for a, b in zip(steps, steps[1:], strict=False)), name
    for with_momentum, plain in zip(sweeps["momentum"], sweeps["sgd"], strict=True):
        assert with_momentum.steps <= plain.steps


def test_momentum_and_preconditioning_raise_the_critical_batch_size(sweeps):
    critical = {
        name: critical_batch_size(BATCH_SIZES, [o.steps for o in optima])
        for name, optima in sweeps.items()
    }
    assert None not in critical.values(), critical
    assert critical["momentum"] > critical["sgd"], critical
    assert critical["precond"] > critical["sgd"], critical


def test_critical_batch_size_definition():
    batch_sizes = [1, 2, 4, 8, 16, 32]
    assert critical_batch_size(batch_sizes, [800, 400, 200, 150, 140, 140]) == 4
    assert critical_batch_size(batch_sizes, [math.inf, 400, 200, 100, 50, 25]) is None
    assert critical_batch_size(batch_sizes, [math.inf, 400, 300, 100, 90, 89]) == 2
    assert critical_batch_size(batch_sizes, [800, 400, 200, 150, 140, 140], speedup=1.3) == 8


def test_schedule_gradient_is_exact():
    h = nqm_curvatures(200)
    pieces = schedule_piece_steps(53, 5)
    assert pieces.sum() == 53 and pieces.max() - pieces.min() <= 1
    log_lrs = np.log([0.5, 1.0, 0.3, 0.1, 1.9])
    for power in (0.0, 0.5):
        _, grad = schedule_final_loss(log_lrs, pieces, h, 64.0, power)
        eps, numeric = 1e-6, []
        for k in range(5):
            step = eps * np.eye(5)[k]
            up = schedule_final_loss(log_lrs + step, pieces, h, 64.0, power)[0]
            down = schedule_final_loss(log_lrs - step, pieces, h, 64.0, power)[0]
            numeric.append((up - down) / (2 * eps))
        np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-9 * np.max(np.abs(numeric)))
    constant = schedule_final_loss(np.full(5, math.log(0.3)), pieces, h, 64.0)[0]
    assert constant == pytest.approx(expected_loss(SGD, 0.3, 64.0, h, [53])[0], rel=1e-12)


def test_optimal_schedule_beats_the_best_constant_rate_and_decays():
    h, batch_size, target = nqm_curvatures(300), 16, 0.01
    constant = optimal_hyperparameters(SGD, h, batch_size, target)
    found = fewest_steps_with_schedule(h, batch_size, target, constant, pieces=10)
    assert found.steps_lower < found.steps < constant.steps
    assert found.steps - found.steps_lower <= max(1, 1e-3 * found.steps)
    assert found.schedule.loss <= target and found.schedule.total_steps == found.steps
    recomputed = schedule_final_loss(
        np.log(found.schedule.lrs), found.schedule.piece_steps, h, batch_size
    )[0]
    assert recomputed == pytest.approx(found.schedule.loss, rel=1e-12)
    assert found.schedule.lrs[-1] < found.schedule.lrs[0] / 10  # anneals at small batch
    at_constant = optimal_schedule(int(constant.steps), h, batch_size, 10, init_lrs=constant.lr)
    assert at_constant.loss <= expected_loss(SGD, constant.lr, batch_size, h, [constant.steps])[0]


def test_trainable_nqm_problem_uses_the_same_definitions():
    """The pipeline's ``nqm`` problem: Hessian diag(h) and per-example noise variance h."""
    import torch

    from hessov.config import load_run_config
    from hessov.problems import build_problem

    problem = build_problem(load_run_config(["problem=nqm", "nqm_dim=20"]))
    h = nqm_curvatures(20)
    np.testing.assert_allclose(torch.diagonal(problem.exact_hessian).numpy(), h, rtol=1e-6)
    points = problem.train.inputs.double().numpy()
    per_example_noise = (h * points).var(axis=0)  # gradient h (x - c) varies through c
    np.testing.assert_allclose(per_example_noise, nqm_noise_variance(h, 1), rtol=0.06)


def test_yaml_defaults_match_the_dataclass():
    assert OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "nqm.yaml")) == asdict(NQMConfig())


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["K=0"], "K"),
        (["target=-1"], "target"),
        (["algorithms=[sgd,adam]"], "algorithms"),
        (["p=1.5"], "p"),
        (["batch_sizes=[]"], "batch_sizes"),
        (["schedule_algorithms=[momentum]"], "schedule_algorithms"),
        (["no_such_key=1"], "no_such_key"),
        (["K=many"], "K"),
        (["K"], "KEY=VALUE"),
    ],
)
def test_bad_config_names_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_nqm_config(overrides)


def test_config_overrides_and_validation():
    cfg = load_nqm_config(["K=100", "algorithms=[sgd]", "batch_sizes=[4,8]", "p=0.25"])
    assert (cfg.K, cfg.algorithms, cfg.batch_sizes, cfg.p) == (100, ["sgd"], [4, 8], 0.25)
    cfg.ema_decay = 1.0
    with pytest.raises(ValueError, match="ema_decay"):
        validate_nqm_config(cfg)


def test_run_nqm_writes_json_and_figures(tmp_path):
    cfg = NQMConfig(
        K=100,
        batch_sizes=[4, 8, 16, 32, 64, 128, 256],
        p_values=[0.0, 0.5, 0.75],
        lr_points=14,
        momentum_points=5,
        refine_rounds=1,
        schedule_batch_sizes=[8, 1000],
        schedule_pieces=5,
        ema=True,
    )
    result = run_nqm(cfg, tmp_path, progress=False)
    assert json.loads((tmp_path / "nqm.json").read_text()) == json.loads(json.dumps(result))
    for name in ("sgd", "momentum", "precond", "sgd_ema", "precond_ema"):
        assert set(result[name]) == {str(b) for b in cfg.batch_sizes}
        entry = result[name]["8"]
        assert isinstance(entry["steps"], int) and entry["lr"] > 0
        assert ("momentum" in entry) == (name == "momentum")
    assert set(result["critical_batch_size"]) == {
        "sgd", "momentum", "precond", "sgd_ema", "precond_ema"
    }  # fmt: skip
    assert set(result["preconditioner_powers"]) == {"0", "0.5", "0.75"}
    assert result["preconditioner_powers"]["0"]["by_batch_size"] == result["sgd"]
    assert list(result["schedules"]["sgd"]) == ["8"]
    schedule = result["schedules"]["sgd"]["8"]
    assert schedule["steps"] <= schedule["constant_lr_steps"]
    for name in result["figures"]:
        assert (tmp_path / name).stat().st_size > 10_000
    assert "| sgd |" in (tmp_path / "critical_batch_size.md").read_text()
