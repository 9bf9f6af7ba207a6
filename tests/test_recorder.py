"""A user's own training loop (hessov.Recorder) and checkpoints saved by any training code
(`hessov import`) make runs that `hessov run RUN` completes: layout, measurements, solve,
exhaustive check and analysis, with the BatchNorm statistics of each recorded step.

The user's model (:data:`MODEL`) is the plug-in test's MLP with a BatchNorm layer, trained in
plain PyTorch with Adam; its Hessian at a recorded step decays fast enough (features scaled
0.3^i) that two-pass with k=70 resolves the top eigenvalues (measured: 1e-6 relative
against the exact ones of the exhaustive check; asserted 1e-3).
"""

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from test_plugins import MODEL as PLUGIN_MODEL

import hessov
from conftest import execute_notebook, last_line, run_hessov
from hessov.config import load_run_config
from hessov.errors import ConfigError
from hessov.problems import build_problem
from slurm_cluster import slurm_cluster

#: The plug-in test's problem with a BatchNorm layer, and a variant with a frozen layer.
MODEL = (
    PLUGIN_MODEL.replace(
        "nn.Sequential(nn.Linear(16, 12, bias=False), nn.Tanh(), nn.Linear(12, 3))",
        "nn.Sequential(\n        nn.Linear(16, 12, bias=False), nn.BatchNorm1d(12), nn.Tanh(), "
        "nn.Linear(12, 3)\n    )",
    )
    + '''

def make_frozen_problem(seed: int) -> hessov.Problem:
    """The same, with the first layer frozen (a "pretrained" one, not in D)."""
    problem = make_problem(seed)
    problem.model[0].weight.requires_grad_(False)
    return problem
'''
)
SETTINGS = ["k=70", "NUM_HESSIAN_DATAPOINTS=84", "HESSIAN_SPLITS=[train]", "EXHAUSTIVE=true"]


@pytest.fixture
def user_file(tmp_path) -> Path:
    path = tmp_path / "my_model.py"
    path.write_text(MODEL)
    return path


def train_in_plain_pytorch(problem, steps: int, on_step) -> None:
    """Full-batch Adam, as a user's loop would; ``on_step(step, model, optimizer)`` first."""
    model, (inputs, targets) = problem.model, (problem.train.inputs, problem.train.targets)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for step in range(steps + 1):
        on_step(step, model, optimizer)
        optimizer.zero_grad()
        problem.loss(model(inputs), targets).backward()
        optimizer.step()


def assert_top_eigenvalues_match_the_exact_ones(run: Path, step: int):
    result = json.loads(run_hessov("summary", str(run)).stdout)["exhaustive"][str(step)]["train"]
    errors = np.array(result["eigenvalue_rel_err"][:5])
    assert errors.max() < 1e-3, errors


def test_a_recorded_loop_goes_through_the_pipeline(user_file, tmp_path):
    run_dir = tmp_path / "run"
    with hessov.Recorder(
        run_dir, f"{user_file}:make_problem", [0, 40], snapshot_steps=[20], overrides=SETTINGS
    ) as recorder:
        problem = recorder.problem  # the factory's model and data, seeded as every job's
        recorded = {}

        def on_step(step, model, optimizer):
            recorder.step(step, model, optimizer)
            if step == 40:
                recorded["params"] = torch.cat([p.detach().flatten() for p in model.parameters()])
                recorded["mean"] = model[1].running_mean.clone()

        train_in_plain_pytorch(problem, 40, on_step)
    with h5py.File(run_dir / "params.h5") as handle:
        assert handle["steps"][:].tolist() == [0, 40]
        assert np.array_equal(handle["data"][:, 1], recorded["params"].numpy())
        layout = json.loads(handle.attrs["buffer_layout"])
        running_mean = next(b for b in layout if b["name"] == "1.running_mean")
        start = running_mean["offset"]
        stored = handle["buffers"][start : start + 12, 1]
        assert np.array_equal(stored, recorded["mean"].double().numpy())
    assert (run_dir / "snapshots" / "step_20.pt").is_file()
    assert last_line(run_hessov("run", str(run_dir)).stdout) == str(run_dir)
    assert (run_dir / "eigen" / "step_40_train.h5").is_file()
    assert (run_dir / "analysis" / "report.md").is_file()
    assert_top_eigenvalues_match_the_exact_ones(run_dir, 40)


def test_checkpoints_of_any_training_code_are_imported(user_file, tmp_path):
    problem = build_problem(load_run_config([f"problem={user_file}:make_problem"]))
    checkpoints = {}

    def on_step(step, model, optimizer):
        if step in (0, 30):
            checkpoints[step] = tmp_path / f"ckpt_{step}.pt"
            torch.save({"model": model.state_dict(), "epoch": step}, checkpoints[step])

    train_in_plain_pytorch(problem, 30, on_step)
    run_dir = tmp_path / "imported"
    args = [f"{path}@{step}" for step, path in checkpoints.items()]
    # Flags and KEY=VALUE settings in any order, as on every command.
    run_hessov(
        "import",
        str(run_dir),
        args[0],
        "--problem",
        f"{user_file}:make_problem",
        args[1],
        *SETTINGS,
    )
    run_hessov("run", str(run_dir))
    assert_top_eigenvalues_match_the_exact_ones(run_dir, 30)
    with h5py.File(run_dir / "params.h5") as handle:
        state = torch.load(checkpoints[30], weights_only=True)["model"]
        weight = state["0.weight"].flatten().numpy()
        assert np.array_equal(handle["data"][: weight.size, 1], weight)


def test_what_the_recorder_refuses(user_file, tmp_path):
    problem = f"{user_file}:make_problem"
    recorder = hessov.Recorder(tmp_path / "a", problem, [0, 10], overrides=SETTINGS)
    with pytest.raises(ConfigError, match="parameters or buffers differ"):
        recorder.step(0, torch.nn.Linear(16, 3))
    with pytest.raises(ConfigError, match=r"steps \[0, 10\] were never recorded"):
        recorder.finish()
    recorder.events.close()
    with pytest.raises(ConfigError, match="is not empty"):
        hessov.Recorder(tmp_path / "a", problem, [0], overrides=SETTINGS)
    refused = run_hessov(
        "import", str(tmp_path / "b"), "nosuch.pt@3", "--problem", problem, check=False
    )
    assert refused.returncode == 2 and "checkpoint: no file nosuch.pt" in refused.stderr
    assert not (tmp_path / "b").exists()


def test_the_own_model_notebook_runs(tmp_path):
    """analysis/notebooks/own_model.ipynb: a CNN with BatchNorm trained in plain PyTorch with
    the recorder, `hessov run`, then the analysis from Python (it asserts that the in-process
    sketch of the live model agrees with the pipeline's eigenvalues).
    """
    execute_notebook("own_model.ipynb", {"HESSOV_NOTEBOOK_WORK": str(tmp_path)})
    assert (tmp_path / "spectrum.png").is_file()
    assert (tmp_path / "run" / "eigen" / "step_200_train.h5").is_file()


def test_an_unfinished_record_is_refused_not_trained_over(user_file, tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="the user's loop failed"):
        with hessov.Recorder(
            run_dir, f"{user_file}:make_problem", [0, 5], overrides=SETTINGS
        ) as rec:
            rec.step(0, rec.problem.model)
            raise RuntimeError("the user's loop failed")
    before = (run_dir / "params.h5").read_bytes()
    refused = run_hessov("run", str(run_dir), check=False)
    assert refused.returncode == 2 and "never finished" in refused.stderr
    assert (run_dir / "params.h5").read_bytes() == before


def test_finish_keeps_metrics_and_a_snapshot_keeps_the_users_learning_rate(user_file, tmp_path):
    run_dir = tmp_path / "run"
    with hessov.Recorder(
        run_dir, f"{user_file}:make_problem", [0], [1], overrides=SETTINGS
    ) as recorder:
        model = recorder.problem.model
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        optimizer.param_groups[0]["lr"] = 0.05  # as a user's own decay would set it
        recorder.step(0, model, optimizer)
        recorder.step(1, model, optimizer)
        assert optimizer.param_groups[0]["lr"] == 0.05
        recorder.finish(final_test_accuracy=0.9)
    train = json.loads(run_hessov("summary", str(run_dir)).stdout)["train"]
    assert train["final_test_accuracy"] == 0.9 and train["recorded_steps"] == [0]
    snapshot = torch.load(run_dir / "snapshots" / "step_1.pt", weights_only=True)
    assert snapshot["optimizer_class"] == "SGD" and snapshot["schedule"] == {}


def test_frozen_parameters_are_recorded_with_their_values(user_file, tmp_path):
    from hessov.paramstore import ColumnStore, load_recorded_state

    problem = f"{user_file}:make_frozen_problem"
    with hessov.Recorder(tmp_path / "run", problem, [0], overrides=SETTINGS) as recorder:
        model = recorder.problem.model
        with torch.no_grad():
            model[0].weight.add_(1.0)  # the user's pretrained values
        recorder.step(0, model)
    fresh = build_problem(load_run_config([f"problem={problem}"])).model
    load_recorded_state(fresh, ColumnStore(tmp_path / "run" / "params.h5"), 0)
    assert torch.equal(fresh[0].weight, model[0].weight)
    assert not fresh[0].weight.requires_grad


def test_a_checkpoint_that_does_not_fit_leaves_nothing(user_file, tmp_path):
    other = tmp_path / "other.pt"
    torch.save(torch.nn.Linear(3, 3).state_dict(), other)
    problem = f"{user_file}:make_problem"
    refused = run_hessov(
        "import", str(tmp_path / "run"), f"{other}@0", "--problem", problem, *SETTINGS, check=False
    )
    assert refused.returncode == 2 and "does not fit" in refused.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slurm
def test_a_recorded_run_finishes_on_slurm_as_locally(slurm_cluster, user_file, tmp_path):
    """`hessov run RUN backend=slurm` on a Recorder's run: every job on the local cluster
    rebuilds the user's model from the factory, with the recorded BatchNorm statistics; the
    eigenvalues agree with the local run's within 1e-4 (other processes may round
    differently; both see the same float32 measurements' operator).
    """
    import shutil

    with hessov.Recorder(
        tmp_path / "local", f"{user_file}:make_problem", [20], overrides=SETTINGS[:-1]
    ) as recorder:
        train_in_plain_pytorch(recorder.problem, 20, lambda s, m, o: recorder.step(s, m, o))
    shutil.copytree(tmp_path / "local", tmp_path / "slurm")
    run_hessov("run", str(tmp_path / "local"))
    follow = ["slurm.poll_seconds=1", "slurm.wait_timeout_minutes=12", "--wait"]
    run_hessov("run", str(tmp_path / "slurm"), "backend=slurm", *follow)
    values = []
    for name in ("local", "slurm"):
        with h5py.File(tmp_path / name / "eigen" / "step_20_train.h5") as handle:
            values.append(handle["eigenvalues"][:10])
    assert np.allclose(values[0], values[1], rtol=1e-4, atol=0)
