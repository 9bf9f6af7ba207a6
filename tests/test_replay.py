"""Replay stage: spectral filters on the gradient, checked on the noisy quadratic model.

The ``nqm`` problem's Hessian is exactly ``diag(1, 1/2, ..., 1/K)`` at every point, so the
top eigenvectors are the first coordinate axes and every filter has a closed form (README,
"Spectral-filter replays"): per coordinate ``x_i - m_i <- (1 - eta s_i h_i)(x_i - m_i)`` with
``m`` the mean of the training points and ``s_i`` the filter's scale of direction ``i``.
"""

import dataclasses
import json
import re
import shutil

import numpy as np
import pytest
import torch

from hessov import summary
from hessov.analysis.replay_figures import ReplayCurves
from hessov.analysis.replay_findings import seed_groups, sharpening_under_v1, snapshot_findings
from hessov.analysis.replay_groups import (
    RANKING_RULE,
    ahead,
    first_to_target,
    group_statistics,
    ranking,
    verdict,
)
from hessov.analysis.replay_report import report_section
from hessov.cli import main
from hessov.config import (
    load_run_config,
    read_config,
    replay_from_overrides,
    replay_jobs,
)
from hessov.errors import ConfigError
from hessov.launch.graph import plan_run
from hessov.optim.spectral_filter import (
    FilteredOptimizer,
    SpectralFilter,
    dynamic_scaling,
    flat_scaling_v1,
    flat_scaling_v2,
    global_scaling,
    warmup_scaling,
)
from hessov.problems import build_problem
from hessov.rundir import RunDir
from hessov.runlog import read_events
from hessov.stages.replay import run_replay
from hessov.stages.train import train

K = 20  # nqm dimensions: curvatures 1, 1/2, ..., 1/20
SNAPSHOT = 4
CONFIG = f"""
problem: nqm
nqm_dim: {K}
dtype: float64
BATCH_SIZE: 0
MAX_STEPS: 12
EVAL_EVERY: 4
RECORD_STEPS: [0, 12]
SNAPSHOT_STEPS: [{SNAPSHOT}]
NUM_HESSIAN_DATAPOINTS: 100
optimizer: {{name: SGD, lr: 1.0}}
replays:
  - {{mode: none, MAX_STEPS: 8, eig_freq: 4, neigs: 3, TARGET_TRAIN_LOSS: 10.0}}
  - {{mode: flat_scaling_v2, scaling: 3, nfilter: 5, eig_freq: 100, neigs: 6, MAX_STEPS: 8,
      TARGET_TRAIN_LOSS: 10.0}}
"""


def trained_from(tmp_path_factory, name: str, config_text: str):
    """Train the run of ``config_text`` in a fresh directory; returns it and its config."""
    directory = tmp_path_factory.mktemp(name)
    config = directory / f"{name}.yaml"
    config.write_text(config_text)
    run = train(load_run_config([f"OUTPUT_DIR={directory / 'runs'}"], config))
    return run, read_config(run.config)


@pytest.fixture(scope="module")
def nqm_run(tmp_path_factory):
    """A trained nqm run (full-batch GD, lr 1, float64) with a snapshot at step 4."""
    return trained_from(tmp_path_factory, "replay", CONFIG)


def replay(run: RunDir, cfg, **settings) -> tuple[dict, np.ndarray]:
    """Run an ad-hoc replay; its summary and final parameters ``(K,)``."""
    args = [f"{key}={value}" for key, value in {"eig_tol": 1e-12, **settings}.items()]
    result = run_replay(run, cfg, replay_from_overrides(cfg, args))
    final = torch.load(run.replay_final(result["name"]), weights_only=True)["x"]
    return result, final.numpy()


def snapshot_and_minimum(run: RunDir, cfg) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Parameters at the snapshot, the minimiser ``m`` (mean of the train points) and the
    curvatures ``h`` the model holds (``sqrt(h)`` is stored in float32, so not exactly 1/i).
    """
    state = torch.load(run.snapshot(SNAPSHOT), weights_only=True)["model"]
    problem = build_problem(cfg)
    minimum = problem.train.inputs.double().mean(dim=0).numpy()
    return state["x"].numpy(), minimum, state["sqrt_curvatures"].double().numpy() ** 2


def test_filter_formulas_on_an_orthonormal_basis():
    generator = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(30, 5, generator=generator, dtype=torch.float64))
    grad = torch.randn(30, generator=generator, dtype=torch.float64)
    inside = basis @ (basis.T @ grad)
    assert torch.allclose(global_scaling(grad, 2.0), 2 * grad)
    v1 = flat_scaling_v1(grad, basis, 2.0)
    assert torch.allclose(basis.T @ v1, torch.zeros(5, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(v1, 2 * (grad - inside))
    v2 = flat_scaling_v2(grad, basis, 3.0)
    assert torch.allclose(basis.T @ v2, basis.T @ grad)
    assert torch.allclose(v2 - inside, 3 * (grad - inside))
    # eta = 0.5, alpha = 2: 2/(alpha eta) = 2, so only the eigenvalues 5 and 3 are frozen.
    eigenvalues = torch.tensor([5.0, 3.0, 1.9, 1.0, 0.5], dtype=torch.float64)
    dynamic = dynamic_scaling(grad, basis, eigenvalues, 2.0, 0.5)
    assert torch.allclose(dynamic, flat_scaling_v1(grad, basis[:, :2], 2.0))
    assert [warmup_scaling(3.0, t, 4) for t in (0, 1, 3, 10)] == [1.5, 2.0, 3.0, 3.0]
    assert warmup_scaling(3.0, 0, 0) == 3.0


@pytest.mark.parametrize("mode, scaling", [("flat_scaling_v1", 2.0), ("global_scaling", 2.0)])
def test_momentum_buffer_is_the_momentum_of_the_filtered_gradients(mode, scaling):
    """SGD momentum sees F(g): b_t = mu b_{t-1} + F(g_t); the buffer itself is never scaled
    (the fork multiplied it in place, so the scale compounded).
    """
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3).double()
    params = list(model.parameters())
    dim = sum(p.numel() for p in params)
    basis, _ = torch.linalg.qr(torch.randn(dim, 4, dtype=torch.float64))
    spectral_filter = SpectralFilter(mode, scaling)
    spectral_filter.set_eigenbasis(torch.tensor([4.0, 3.0, 2.0, 1.0]), basis)
    sgd = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    stepper = FilteredOptimizer(sgd, params, spectral_filter)
    expected_buffer = torch.zeros(dim, dtype=torch.float64)
    for step in range(4):
        inputs = torch.randn(8, 6, dtype=torch.float64)
        stepper.zero_grad()
        model(inputs).pow(2).mean().backward()
        grad = torch.cat([p.grad.reshape(-1) for p in params])
        filtered = spectral_filter.apply(grad, step, 0.1)[0]
        before = torch.cat([p.detach().reshape(-1) for p in params])
        stats = stepper.step(step)
        expected_buffer = 0.9 * expected_buffer + filtered if step else filtered.clone()
        buffer = torch.cat([sgd.state[p]["momentum_buffer"].reshape(-1) for p in params])
        after = torch.cat([p.detach().reshape(-1) for p in params])
        assert torch.allclose(buffer, expected_buffer, rtol=1e-12, atol=1e-14)
        assert torch.allclose(after, before - 0.1 * expected_buffer, rtol=1e-12, atol=1e-14)
        assert stats.grad_norm == pytest.approx(float(grad.norm()))
        assert stats.filtered_norm == pytest.approx(float(filtered.norm()))


def test_flat_scaling_v1_is_stable_iff_alpha_eta_lambda_n_plus_1_below_two(nqm_run):
    """N = 5, eta = 1, lambda_6 = 1/6: alpha = 10 gives 1.67 < 2 (converges), alpha = 14
    gives 2.33 > 2 (diverges); the frozen top-5 coordinates never move.
    """
    run, cfg = nqm_run
    x0, minimum, _ = snapshot_and_minimum(run, cfg)
    common = dict(mode="flat_scaling_v1", nfilter=5, eig_freq=1000, neigs=6, MAX_STEPS=40)
    stable, x_stable = replay(run, cfg, scaling=10, **common)
    unstable, x_unstable = replay(run, cfg, scaling=14, **common)
    start = np.abs(x0 - minimum)[5:]
    assert np.abs(x_stable - minimum)[5:].max() < 1e-3 * start.max()
    assert np.abs(x_unstable - minimum)[5] > 1e3 * start[0]
    assert unstable["final_train_loss"] > 1e3 * stable["final_train_loss"]
    np.testing.assert_allclose(x_stable[:5], x0[:5], rtol=0, atol=1e-10)
    np.testing.assert_allclose(x_unstable[:5], x0[:5], rtol=0, atol=1e-6)
    assert stable["max_sharpness"] == pytest.approx(1.0, rel=1e-10)


def test_flat_scaling_v2_matches_the_closed_form_per_direction(nqm_run):
    run, cfg = nqm_run
    x0, minimum, h = snapshot_and_minimum(run, cfg)
    steps, alpha = 10, 3.0
    _, final = replay(
        run,
        cfg,
        mode="flat_scaling_v2",
        scaling=alpha,
        nfilter=5,
        eig_freq=1000,
        neigs=6,
        MAX_STEPS=steps,
        name="v2_closed_form",
    )
    scale = np.where(np.arange(K) < 5, 1.0, alpha)
    expected = minimum + (1 - scale * h) ** steps * (x0 - minimum)
    np.testing.assert_allclose(final, expected, rtol=1e-9, atol=1e-12)


def test_global_scaling_equals_plain_gradient_descent_at_alpha_eta(nqm_run):
    run, cfg = nqm_run
    scaled, x_scaled = replay(
        run, cfg, mode="global_scaling", scaling=1.5, eig_freq=0, MAX_STEPS=10
    )
    plain, x_plain = replay(
        run, cfg, mode="none", eig_freq=0, MAX_STEPS=10, **{"optimizer.lr": 1.5}
    )
    np.testing.assert_allclose(x_scaled, x_plain, rtol=1e-12)
    losses = [
        [e["train_loss"] for e in read_events(run.replay_log(name), "step")]
        for name in (scaled["name"], plain["name"])
    ]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-12)
    assert plain["continued_optimizer_state"] is False and plain["lr"] == 1.5
    assert plain["name"] == "none_lr1.5"


def test_none_continues_the_baseline_exactly(nqm_run):
    """The baseline replay takes the steps the train stage took after the snapshot, bit for
    bit, although it computes eigenvalues in between.
    """
    run, cfg = nqm_run
    result = run_replay(run, cfg, cfg.replays[0])
    trained = {e["step"]: e["loss"] for e in read_events(run.log, "batch") if e["stage"] == "train"}
    replayed = [e for e in read_events(run.replay_log("none"), "step") if "grad_norm" in e]
    assert [e["step"] for e in replayed] == list(range(8))
    assert [e["train_loss"] for e in replayed] == [trained[SNAPSHOT + s] for s in range(8)]
    eigen = read_events(run.replay_log("none"), "eigen")
    assert [e["step"] for e in eigen] == [0, 4, 8]
    np.testing.assert_allclose(eigen[0]["eigenvalues"], [1, 1 / 2, 1 / 3], rtol=1e-6)
    assert result["steps"] == 8 and result["mode"] == "none"


def test_dynamic_freezes_directions_above_two_over_alpha_eta_with_warmup(nqm_run):
    """With eta = 0.9, alpha = 3, warmup 2: step 0 runs at alpha 2 (2/(alpha eta) = 1.11, nothing
    frozen), later steps at alpha 3 (0.74: lambda_1 = 1 frozen, lambda_2 = 0.5 not).
    """
    run, cfg = nqm_run
    x0, minimum, h = snapshot_and_minimum(run, cfg)
    result, final = replay(
        run,
        cfg,
        mode="dynamic",
        scaling=3,
        nfilter=4,
        warmup=2,
        eig_freq=1000,
        neigs=5,
        MAX_STEPS=6,
        **{"optimizer.lr": 0.9},
    )
    steps = read_events(run.replay_log(result["name"]), "step")[:6]
    assert [e["frozen"] for e in steps] == [0, 1, 1, 1, 1, 1]
    assert [e["scaling"] for e in steps] == [2.0, 3.0, 3.0, 3.0, 3.0, 3.0]
    factors = np.stack([1 - 0.9 * 2 * h] + [1 - 0.9 * 3 * h * (np.arange(K) > 0)] * 5)
    expected = minimum + factors.prod(axis=0) * (x0 - minimum)
    np.testing.assert_allclose(final, expected, rtol=1e-9, atol=1e-12)


def test_sketch_eigensolver_approximates_the_lanczos_eigenpairs(nqm_run):
    """The in-core two-pass sketch (k = 10 of D = 20 on the flat spectrum 1/i) is an
    approximation: its eigenvalues agree with Lanczos to a few percent, with an error estimate.
    """
    run, cfg = nqm_run
    common = dict(mode="flat_scaling_v1", scaling=4, nfilter=3, eig_freq=1000, neigs=4)
    replay(run, cfg, MAX_STEPS=2, name="v1_lanczos", **common)
    result, _ = replay(run, cfg, MAX_STEPS=2, eigensolver="sketch", **common)
    exact, sketched = (
        read_events(run.replay_log(name), "eigen")[0] for name in ("v1_lanczos", result["name"])
    )
    np.testing.assert_allclose(sketched["eigenvalues"], exact["eigenvalues"], rtol=0.05)
    assert 0 < sketched["relative_error"] < 1 and exact["relative_error"] is None
    assert result["hvps"] == 10 + 10 + cfg.NUM_A_POSTERIORI


@pytest.mark.parametrize(
    "arguments, key",
    [
        (["snapshot=7", "mode=none"], "snapshot"),
        ([f"snapshot={SNAPSHOT}", "mode=flat_scaling_v1", "nfilter=20", "scaling=2"], "nfilter"),
        (["mode=flat_scaling_v1", "nfilter=3", "eig_freq=0", "scaling=2"], "eig_freq"),
        (["mode=flat_scaling_v3", "nfilter=3"], "mode"),
        (["name=no_such_replay"], "name"),
        (["mode=none", "seeds=[0,-1]"], "seeds"),
        (["mode=none", "seeds=[2,0,2]"], "seeds"),
        (["mode=none", "seeds=[1]", "perturbation=-1e-5"], "perturbation"),
        (["mode=none", "seeds=[1]", "perturbation=nan"], "perturbation"),
        (["mode=none", "seeds=[1]", "perturbation=inf"], "perturbation"),
        (["mode=none", "seed=1"], "seed"),
        (["mode=none", "group=none"], "group"),
    ],
)
def test_bad_input_is_refused_before_any_step(nqm_run, capsys, arguments, key):
    run, _ = nqm_run
    before = set(run.replay_names())
    assert main(["replay", str(run.root), *arguments]) == 2
    error = capsys.readouterr().err
    assert f"error: {key}:" in error
    assert set(run.replay_names()) == before


def test_a_missing_snapshot_file_is_named(nqm_run, tmp_path, capsys):
    run, _ = nqm_run
    copy = RunDir(tmp_path / "copy")
    shutil.copytree(run.root, copy.root, ignore=shutil.ignore_patterns("replays", "summary"))
    copy.snapshot(SNAPSHOT).unlink()
    assert main(["replay", str(copy.root), "name=none"]) == 2
    assert "error: snapshot: no snapshot of step 4" in capsys.readouterr().err
    assert not copy.replay("none").exists()


def test_configured_replays_are_validated_and_named(tmp_path):
    base = CONFIG.split("replays:")[0]
    good = tmp_path / "good.yaml"
    good.write_text(
        base + "replays:\n  - {mode: none}\n  - {mode: flat_scaling_v1, scaling: 2, nfilter: 10}\n"
        "  - {mode: global_scaling, scaling: 1.5}\n  - {mode: dynamic, scaling: 2, nfilter: 8, "
        "warmup: 50}\n"
    )
    cfg = load_run_config([], good)
    assert [r.name for r in cfg.replays] == [
        "none",
        "v1_a2_n10",
        "global_a1.5",
        "dynamic_a2_n8_w50",
    ]
    assert all(r.snapshot == SNAPSHOT for r in cfg.replays)
    for body, key in [
        ("  - {mode: none}\n  - {mode: flat_scaling_v2, scaling: 2}\n", "replays[1].nfilter"),
        ("  - {mode: none}\n  - {mode: none}\n", "replays[1].name"),
        ("  - {mode: none, snapshot: 3}\n", "replays[0].snapshot"),
        ("  - {mode: dynamic, nfilter: 3, eig_freq: -1}\n", "replays[0].eig_freq"),
        ("  - {mode: none, scaling: 2}\n", "replays[0].scaling"),
        ("  - {mode: none, seeds: [0, -1]}\n", "replays[0].seeds"),
        ("  - {mode: none}\n  - {mode: none, name: b, seeds: [1, 2, 1]}\n", "replays[1].seeds"),
        ("  - {mode: none, seeds: [1], perturbation: -1.0e-5}\n", "replays[0].perturbation"),
        ("  - {mode: none, seeds: [1], perturbation: .inf}\n", "replays[0].perturbation"),
        ("  - {mode: none, seed: 3}\n", "replays[0].seed"),
        ("  - {mode: none, seeds: [1]}\n  - {mode: none, name: none.seed1}\n", "replays[1].name"),
    ]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(base + "replays:\n" + body)
        with pytest.raises(ConfigError, match="^" + re.escape(key) + ":"):
            load_run_config([], bad)


def test_cli_runs_a_configured_replay_once_and_compare_reports(nqm_run, capsys):
    run, cfg = nqm_run
    name = cfg.replays[1].name
    assert main(["replay", str(run.root), "--list"]) == 0
    assert capsys.readouterr().out.split() == ["none", "v2_a3_n5"]
    assert main(["replay", str(run.root), f"name={name}"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(run.replay(name))
    log_size = run.replay_log(name).stat().st_size
    # Again: skipped, nothing rewritten; the same name with other settings: refused.
    assert main(["replay", str(run.root), f"name={name}"]) == 0
    assert run.replay_log(name).stat().st_size == log_size
    other = ["mode=flat_scaling_v2", "scaling=2", "nfilter=5", "neigs=6", f"name={name}"]
    assert main(["replay", str(run.root), *other]) == 2
    assert "error: name:" in capsys.readouterr().err
    run_replay(run, cfg, cfg.replays[0])  # the baseline, if no other test ran it

    assert main(["compare", str(run.root)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(run.replays)
    recorded = summary.load(run)["replay"]
    for entry in (recorded["none"], recorded[name]):
        assert {
            "mode",
            "scaling",
            "nfilter",
            "steps",
            "final_train_loss",
            "steps_to_target",
            "max_sharpness",
        } <= set(entry)
    # v2 runs the flat directions at 3x: it reaches the target before the baseline.
    assert recorded[name]["steps_to_target"] < (recorded["none"]["steps_to_target"] or 99)
    report = run.replay_report.read_text()
    first = summary.load(run)["replay_compare"][str(SNAPSHOT)]["first_to_target"]
    assert f"First to the loss target 10.0: `{first}`" in report
    assert (run.replay_figures / f"loss_snapshot_{SNAPSHOT}.png").stat().st_size > 1000
    assert (run.replay_figures / f"sharpness_flow_{name}.png").is_file()
    assert json.loads(run.replay_summary(name).read_text())["mode"] == "flat_scaling_v2"


SEEDED_CONFIG = CONFIG.split("replays:")[0] + (
    "replays:\n"
    "  - {mode: none, MAX_STEPS: 8, eig_freq: 4, neigs: 3, TARGET_TRAIN_LOSS: 10.0,"
    " seeds: [0, 1, 2]}\n"
    "  - {mode: flat_scaling_v2, scaling: 3, nfilter: 5, eig_freq: 100, neigs: 6, MAX_STEPS: 8,"
    " TARGET_TRAIN_LOSS: 10.0, seeds: [0, 1, 2], perturbation: 1.0e-3}\n"
)
SEEDED_JOBS = [f"{group}.seed{seed}" for group in ("none", "v2_a3_n5") for seed in (0, 1, 2)]


@pytest.fixture(scope="module")
def seeded_run(tmp_path_factory):
    """The nqm run of :func:`nqm_run`, with both replays configured over seeds 0, 1, 2."""
    return trained_from(tmp_path_factory, "seeded", SEEDED_CONFIG)


def starting_points(run: RunDir, cfg, names: list[str], lr: float) -> list[np.ndarray]:
    """Where one-step ``mode=none`` replays at rate ``lr`` started: on the nqm a GD step is
    ``x1 = m + (1 - lr h)(x0 - m)``, so ``x0 = m + (x1 - m) / (1 - lr h)``.
    """
    _, minimum, h = snapshot_and_minimum(run, cfg)
    finals = [torch.load(run.replay_final(name), weights_only=True)["x"].numpy() for name in names]
    return [minimum + (final - minimum) / (1 - lr * h) for final in finals]


def test_seeds_start_from_distinct_points_perturbed_by_the_stated_size(nqm_run, capsys):
    run, cfg = nqm_run
    one_step = ["mode=none", "eig_freq=0", "MAX_STEPS=1", "optimizer.lr=0.5", "name=start"]
    assert main(["replay", str(run.root), *one_step, "seeds=[0,1,2]"]) == 0
    names = ["start.seed0", "start.seed1", "start.seed2"]
    assert capsys.readouterr().out.split() == [str(run.replay(name)) for name in names]
    x0 = snapshot_and_minimum(run, cfg)[0]
    starts = starting_points(run, cfg, names, 0.5)
    np.testing.assert_allclose(starts[0], x0, rtol=1e-12)
    for seed, start, name in zip((1, 2), starts[1:], names[1:], strict=True):
        noise = torch.randn(K, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        # p <- p (1 + perturbation z): the relative change of each parameter is 1e-3 z.
        np.testing.assert_allclose((start - x0) / x0, 1e-3 * noise.numpy(), rtol=0, atol=1e-9)
        relative = np.linalg.norm(start - x0) / np.linalg.norm(x0)
        assert 0.3e-3 < relative < 3e-3
        recorded = json.loads(run.replay_summary(name).read_text())
        assert recorded["relative_perturbation"] == pytest.approx(relative, rel=1e-6)
        assert (recorded["group"], recorded["seed"], recorded["perturbation"]) == (
            "start",
            seed,
            1e-3,
        )
    assert np.abs(starts[1] - starts[2]).min() > 0


def test_seed_0_is_the_unperturbed_replay_bit_for_bit(nqm_run):
    run, cfg = nqm_run
    common = ["mode=flat_scaling_v1", "scaling=2", "nfilter=3", "eig_freq=3", "neigs=4"]
    plain = replay_from_overrides(cfg, [*common, "MAX_STEPS=6", "name=plain"])
    seeded = replay_from_overrides(cfg, [*common, "MAX_STEPS=6", "name=seeded", "seeds=[0]"])
    (job,) = replay_jobs([seeded])
    assert (job.name, job.group, job.seed, job.seeds) == ("seeded.seed0", "seeded", 0, [])
    results = [run_replay(run, cfg, one) for one in (plain, job)]
    finals = [torch.load(run.replay_final(one.name), weights_only=True) for one in (plain, job)]
    assert torch.equal(finals[0]["x"], finals[1]["x"])
    assert results[0]["final_train_loss"] == results[1]["final_train_loss"]
    assert results[1]["relative_perturbation"] == 0.0

    def logged(name: str) -> list[dict]:
        """Every step, evaluation and eigenvalue record, without its time."""
        events = read_events(run.replay_log(name))
        return [
            {key: value for key, value in event.items() if key != "time"}
            for event in events
            if event["event"] in ("step", "eval", "eigen")
        ]

    assert logged(plain.name) == logged(job.name)


def test_every_launcher_expands_the_seeds_alike(seeded_run, capsys):
    """``--list``, ``hessov plan`` and the Slurm job graph run one job per (replay, seed)."""
    run, cfg = seeded_run
    assert main(["replay", str(run.root), "--list"]) == 0
    assert capsys.readouterr().out.split() == SEEDED_JOBS
    assert [job.name for job in replay_jobs(cfg.replays)] == SEEDED_JOBS
    cfg = dataclasses.replace(cfg, RUN_DIR=str(run.root))
    plan = plan_run(cfg)  # every launcher runs this graph
    assert plan.as_dict()["replays"] == SEEDED_JOBS
    replay_argvs = [job.elements()[0][1] for job in plan.jobs if job.stage == "replay"]
    assert replay_argvs == [["replay", str(run.root), f"name={name}"] for name in SEEDED_JOBS]


def test_compare_reports_median_and_spread_over_seeds(seeded_run, capsys):
    run, _ = seeded_run
    for group in ("none", "v2_a3_n5"):  # name=GROUP runs every seed of the group in turn
        assert main(["replay", str(run.root), f"name={group}"]) == 0
    assert capsys.readouterr().out.split() == [str(run.replay(name)) for name in SEEDED_JOBS]
    assert main(["compare", str(run.root)]) == 0
    recorded = summary.load(run)
    groups = recorded["replay_compare"][str(SNAPSHOT)]["groups"]
    assert sorted(groups) == ["none", "v2_a3_n5"]
    for name, stats in groups.items():
        seeds = [recorded["replay"][f"{name}.seed{seed}"] for seed in (0, 1, 2)]
        steps = np.array([s["steps_to_target"] for s in seeds], dtype=np.float64)
        loss = np.array([s["final_train_loss"] for s in seeds])
        assert stats["seeds"] == [0, 1, 2]
        assert stats["steps_to_target"] == [s["steps_to_target"] for s in seeds]
        assert stats["seeds_reaching_target"] == 3
        assert stats["steps_to_target_median"] == np.median(steps)
        assert (stats["steps_to_target_min"], stats["steps_to_target_max"]) == (
            steps.min(),
            steps.max(),
        )
        assert stats["final_train_loss_median"] == np.median(loss)
        assert stats["final_train_loss_min"] == loss.min()
        assert stats["final_train_loss_max"] == loss.max()
    # Perturbed by 1e-3, the seeds of v2 end apart; v2 is ahead of the baseline in every seed.
    assert len(set(groups["v2_a3_n5"]["final_train_loss"])) == 3
    findings = recorded["replay_compare"][str(SNAPSHOT)]
    assert findings["first_to_target"] == "v2_a3_n5"
    assert findings["ahead_of"] == {"none": [], "v2_a3_n5": ["none"]}
    report = run.replay_report.read_text()
    assert "First to the loss target 10.0: `v2_a3_n5`" in report
    assert "ahead of every other group in every seed" in report
    assert RANKING_RULE in report
    assert (run.replay_figures / "sharpness_flow_v2_a3_n5.png").stat().st_size > 1000


def steps_of(*steps_to_target) -> dict:
    """A group's statistics from its seeds' steps to the target (None: never reached)."""
    return group_statistics(
        [{"steps_to_target": s, "final_train_loss": 1.0} for s in steps_to_target]
    )


def test_a_group_is_ahead_only_if_its_slowest_seed_beats_the_others_fastest():
    separated = {"fast": steps_of(10, 12, 11), "slow": steps_of(13, 15, 14)}
    assert ahead(separated["fast"], separated["slow"])
    assert not ahead(separated["slow"], separated["fast"])
    assert verdict(separated["slow"], separated["fast"]) == "behind"
    assert ranking(separated) == {"fast": ["slow"], "slow": []}
    assert first_to_target(separated) == "fast"
    # Faster by median (11 against 13), but seed 1 of "fast" (14) is slower than 12.
    overlapping = {"fast": steps_of(10, 14, 11), "slow": steps_of(13, 15, 12)}
    assert verdict(overlapping["fast"], overlapping["slow"]) == "not resolved across seeds"
    assert ranking(overlapping) == {"fast": [], "slow": []}
    assert first_to_target(overlapping) is None
    # A seed that never reaches the target is infinitely slow.
    partly = steps_of(5, None, 6)
    assert partly["steps_to_target_median"] == 6 and partly["seeds_reaching_target"] == 2
    assert (partly["steps_to_target_min"], partly["steps_to_target_max"]) == (5, 6)
    assert verdict(partly, steps_of(50, 60, 70)) == "not resolved across seeds"
    assert verdict(steps_of(50, 60, 70), steps_of(None, None)) == "ahead"
    assert steps_of(5, None, None)["steps_to_target_median"] is None


def synthetic_curve(group: str, seed: int, mode: str, steps: int, **fields) -> ReplayCurves:
    """A finished replay of snapshot 4 at lr 0.5 and alpha 2, loss target 1.0."""
    eigenvalues = fields.pop("eigenvalues", np.zeros((0, 0)))
    return ReplayCurves(
        name=f"{group}.seed{seed}",
        group=group,
        seed=seed,
        mode=mode,
        scaling=2.0,
        nfilter=fields.pop("nfilter", 0),
        snapshot=4,
        lr=0.5,
        steps=np.arange(3),
        train_loss=np.ones(3),
        eigen_steps=np.arange(len(eigenvalues)) * 10,
        eigenvalues=eigenvalues,
        summary={"target_train_loss": 1.0, "steps_to_target": steps, "final_train_loss": 0.5},
    )


def test_findings_and_report_of_overlapping_groups_and_v1_sharpening():
    """From logged curves alone: seeds grouped in order, an unresolved first place, and
    flat_scaling_v1's eigenvalue N+1 crossing 2/(alpha eta) = 2 and 2/eta = 4.
    """
    v1_eigen = np.array([[5.0, 4.0, 1.0], [6.0, 5.0, 5.0]])
    curves = [
        synthetic_curve("v1", 1, "flat_scaling_v1", 12, nfilter=2, eigenvalues=v1_eigen),
        synthetic_curve("none", 0, "none", 10),
        synthetic_curve("v1", 0, "flat_scaling_v1", 15, nfilter=2, eigenvalues=v1_eigen),
        synthetic_curve("none", 1, "none", 20),
    ]
    assert {g: [c.seed for c in m] for g, m in seed_groups(curves).items()} == {
        "v1": [0, 1],
        "none": [0, 1],
    }
    v1 = sharpening_under_v1(curves[0])
    assert v1["frozen_went_up"] and v1["top_N_mean_ratio"] == pytest.approx(11 / 9)
    assert (v1["scaled_mss"], v1["mss"]) == (2.0, 4.0)
    assert v1["lambda_N_plus_1_reached_scaled_mss_at"] == 10
    assert v1["lambda_N_plus_1_reached_mss_at"] == 10
    findings = snapshot_findings(curves)
    assert (findings["first_to_target"], findings["first_by_median"]) == (None, "v1")
    assert findings["flat_scaling_v1_groups"]["v1"]["lambda_N_plus_1_reached_mss"] == 2
    text = "\n".join(report_section(4, curves, findings, {"loss curves": "figures/a.png"}))
    assert "First to the loss target 1.0: not resolved across seeds." in text
    assert "Fastest by median: `v1` (flat_scaling_v1, alpha=2, N=2) after 13.5 (12-15)" in text
    assert "went up in every seed of 1 of 1 v1 groups (v1)" in text
    assert "| v1.seed1 | 1 | flat_scaling_v1 | 2 | 2 |" in text
    assert text.endswith("- loss curves: `figures/a.png`\n")


def test_seeded_and_unseeded_replays_of_one_name_are_refused(nqm_run, capsys):
    """Refused before any step: no directory of the refused replay appears."""
    run, _ = nqm_run
    short = ["mode=none", "eig_freq=0", "MAX_STEPS=2"]
    assert main(["replay", str(run.root), *short, "name=mixed"]) == 0
    assert main(["replay", str(run.root), *short, "name=mixed", "seeds=[0,1]"]) == 2
    assert "error: seeds: replay 'mixed'" in capsys.readouterr().err
    assert main(["replay", str(run.root), *short, "name=other", "seeds=[1]"]) == 0
    assert main(["replay", str(run.root), *short, "name=other"]) == 2
    assert "error: name: 'other' is the group of the seeded replays other.seed1" in (
        capsys.readouterr().err
    )
    # other.seed1 exists with the default perturbation: a new seed 0 must not start either.
    changed = [*short, "name=other", "seeds=[0,1]", "perturbation=1e-4"]
    assert main(["replay", str(run.root), *changed]) == 2
    assert "error: name: replay 'other.seed1'" in capsys.readouterr().err
    assert sorted(n for n in run.replay_names() if n.startswith(("mixed", "other"))) == [
        "mixed",
        "other.seed1",
    ]


def test_a_replay_recorded_before_seeds_existed_still_counts_as_finished(nqm_run, capsys):
    """A ``replay.yaml`` without the keys added since (seeds, perturbation, seed, group)
    matches the same settings today: the replay is not run again, nor refused.
    """
    run, _ = nqm_run
    short = ["mode=none", "eig_freq=0", "MAX_STEPS=2", "name=older"]
    assert main(["replay", str(run.root), *short]) == 0
    settings = run.replay_config("older")
    new_keys = ("seeds:", "perturbation:", "seed:", "group:")
    lines = settings.read_text().splitlines()
    settings.write_text("\n".join(line for line in lines if not line.startswith(new_keys)))
    assert "perturbation" not in settings.read_text()
    log_size = run.replay_log("older").stat().st_size
    assert main(["replay", str(run.root), *short]) == 0
    assert run.replay_log("older").stat().st_size == log_size
