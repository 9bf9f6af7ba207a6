"""Train stage end to end through the CLI: records, determinism, refusal, resume."""

import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch

from conftest import REPO, last_line

SMALL = [
    "problem=mnist_mini",
    "MAX_STEPS=60",
    "BATCH_SIZE=100",
    "EVAL_EVERY=20",
    "RECORD_STEPS=[0,30,60]",
    "SNAPSHOT_STEPS=[30]",
    "RECORD_GRADIENTS=true",
    "NUM_HESSIAN_DATAPOINTS=100",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from conftest import run_hessov

    out = tmp_path_factory.mktemp("runs")
    result = run_hessov("train", *SMALL, f"OUTPUT_DIR={out}")
    return out, result


def test_train_prints_run_dir_and_records_one_column_per_step(trained):
    _, result = trained
    run_dir = last_line(result.stdout)
    with h5py.File(f"{run_dir}/params.h5", "r") as handle:
        assert handle["data"].shape == (7030, 3)
        assert handle["data"].dtype == np.float32
        assert handle["steps"][:].tolist() == [0, 30, 60]
        assert handle["data"].compression == "gzip"
        layout = json.loads(handle.attrs["parameter_layout"])
        assert layout[0]["name"] == "1.weight" and layout[-1]["offset"] + 10 == 7030
        assert not np.array_equal(handle["data"][:, 0], handle["data"][:, 2])
    for split in ("train", "test"):
        with h5py.File(f"{run_dir}/grads_{split}.h5", "r") as handle:
            assert handle["data"].shape == (7030, 3)
            assert np.linalg.norm(handle["data"][:, 0]) > 0


def test_recorded_parameters_are_the_model_parameters_at_the_snapshot(trained):
    _, result = trained
    run_dir = last_line(result.stdout)
    snapshot = torch.load(f"{run_dir}/snapshots/step_30.pt", weights_only=True)
    flat = torch.cat([v.flatten() for k, v in snapshot["model"].items()])
    with h5py.File(f"{run_dir}/params.h5", "r") as handle:
        assert np.array_equal(handle["data"][:, 1], flat.numpy())
    assert snapshot["step"] == 30 and "optimizer" in snapshot and "schedule" in snapshot


def test_summary_has_the_train_fields(trained, summary_of):
    _, result = trained
    summary = summary_of(last_line(result.stdout))
    train = summary["train"]
    assert train["num_params"] == 7030
    assert train["recorded_steps"] == [0, 30, 60]
    assert 0 < train["final_train_loss"] < 2.3
    assert 0.1 < train["final_test_accuracy"] <= 1
    required_fields = {"wall_seconds", "steps_run", "stopped_by"}
    assert required_fields <= set(train)


def test_log_records_globals_subsets_and_batches(trained):
    _, result = trained
    run_dir = last_line(result.stdout)
    events = [json.loads(line) for line in open(f"{run_dir}/log.jsonl")]
    kinds = {e["event"] for e in events}
    assert {"config", "globals", "hessian_subsets", "batch", "eval", "record"} <= kinds
    subsets = next(e for e in events if e["event"] == "hessian_subsets")
    assert len(subsets["train"]) == 100 and subsets["train"] == sorted(subsets["train"])
    assert sum(e["event"] == "batch" for e in events) == 60


def test_same_seed_gives_bit_identical_parameters(trained, tmp_path, hessov):
    _, first = trained
    second = hessov("train", *SMALL, f"OUTPUT_DIR={tmp_path}")
    with (
        h5py.File(f"{last_line(first.stdout)}/params.h5") as a,
        h5py.File(f"{last_line(second.stdout)}/params.h5") as b,
    ):
        # Bitwise by construction: the same seed, data and kernel path, in one process each.
        assert np.array_equal(a["data"][:], b["data"][:])


def test_finished_run_is_never_overwritten(trained, hessov):
    _, result = trained
    run_dir = last_line(result.stdout)
    before = open(f"{run_dir}/params.h5", "rb").read()
    again = hessov("train", *SMALL, f"RUN_DIR={run_dir}", check=False)
    assert again.returncode == 2
    assert "never overwritten" in again.stderr
    assert open(f"{run_dir}/params.h5", "rb").read() == before


def test_bad_input_fails_before_work_with_the_key_named(tmp_path, hessov):
    result = hessov(
        "train",
        "problem=mnist_mini",
        "RECORD_STEPS=[0,99999]",
        f"OUTPUT_DIR={tmp_path}",
        check=False,
    )
    assert result.returncode == 2 and "RECORD_STEPS" in result.stderr
    assert not any(tmp_path.iterdir())
    result = hessov(
        "train",
        "problem=mnist_mini",
        "NUM_HESSIAN_DATAPOINTS=5000",
        f"OUTPUT_DIR={tmp_path}",
        check=False,
    )
    assert result.returncode == 2 and "NUM_HESSIAN_DATAPOINTS" in result.stderr
    result = hessov(
        "train",
        "problem=cifar10_3c3d",
        f"OUTPUT_DIR={tmp_path}",
        env={"OBS_DATASETS": str(tmp_path)},
        check=False,
    )
    assert result.returncode == 2 and "cifar-10-batches-py" in result.stderr


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, hessov):
    config = [
        "problem=mnist_mini",
        "MAX_STEPS=1500",
        "BATCH_SIZE=100",
        "EVAL_EVERY=100",
        "RECORD_STEPS=[0,700,1500]",
        "NUM_HESSIAN_DATAPOINTS=100",
    ]
    reference = last_line(hessov("train", *config, f"OUTPUT_DIR={tmp_path / 'a'}").stdout)
    run_dir = tmp_path / "b"
    process = subprocess.Popen(
        [sys.executable, "-m", "hessov.cli", "train", *config, f"RUN_DIR={run_dir}"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.time() + 300
    while time.time() < deadline:
        log = run_dir / "log.jsonl"
        if log.is_file() and any('"event": "batch", "step": 250,' in line for line in open(log)):
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (run_dir / "summary" / "train.json").exists(), "the run was not interrupted"
    refused = hessov("train", *config, f"RUN_DIR={run_dir}", check=False)
    assert refused.returncode == 2 and "resume=true" in refused.stderr
    hessov("train", *config, f"RUN_DIR={run_dir}", "resume=true")
    events = [json.loads(line) for line in open(run_dir / "log.jsonl")]
    resumed = [e for e in events if e["event"] == "resume"]
    assert resumed[0]["step"] >= 200  # from the rolling snapshot, not from scratch
    with h5py.File(f"{reference}/params.h5") as a, h5py.File(run_dir / "params.h5") as b:
        assert b["steps"][:].tolist() == [0, 700, 1500]
        # Bitwise by construction: the snapshot holds the parameters, optimizer state and
        # RNG states, and the resumed steps run on the same machine and kernel path.
        assert np.array_equal(a["data"][:], b["data"][:])


def test_full_batch_gd_in_chunks_equals_one_pass():
    from hessov.config import load_run_config
    from hessov.problems import build_problem
    from hessov.training import loss_and_gradient

    problem = build_problem(load_run_config(["problem=fc-tanh", "dtype=float64"]))
    model = problem.model.double()
    inputs, targets = problem.train.inputs[:600].double(), problem.train.targets[:600]
    grads = []
    for chunk in (0, 250):  # one pass, then chunks of 250, 250 and 100
        model.zero_grad()
        loss = loss_and_gradient(model, problem.loss, inputs, targets, chunk)
        grads.append((loss, torch.cat([p.grad.flatten() for p in model.parameters()])))
    assert torch.allclose(grads[0][0], grads[1][0], rtol=1e-12)
    assert torch.allclose(grads[0][1], grads[1][1], rtol=1e-10, atol=1e-14)


def test_training_stops_at_the_accuracy_goal(tmp_path, hessov, summary_of):
    run = last_line(
        hessov(
            "train",
            "problem=mnist_mini",
            "MAX_STEPS=2000",
            "EVAL_EVERY=50",
            "RECORD_STEPS=[0]",
            "SNAPSHOT_STEPS=[]",
            "TARGET_TEST_ACCURACY=0.8",
            f"OUTPUT_DIR={tmp_path}",
        ).stdout
    )
    train = summary_of(run)["train"]
    assert train["stopped_by"] == "TARGET_TEST_ACCURACY"
    assert train["final_test_accuracy"] >= 0.8 and train["steps_run"] < 2000
    assert train["steps_run"] % 50 == 0


def test_edge_of_stability_problem_on_a_cifar10_subset(tmp_path):
    import pickle

    from hessov.config import load_run_config
    from hessov.problems import build_problem

    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, (400, 3072)).astype(np.uint8),
            b"labels": list(rng.integers(0, 10, 400).tolist()),
        }
        with open(root / name, "wb") as handle:
            pickle.dump(batch, handle)
    cfg = load_run_config(["problem=cnn-relu", "data=cifar10-1k", f"OBS_DATASETS={tmp_path}"])
    problem = build_problem(cfg)
    assert len(problem.train) == 1000 and problem.num_params == 30_634
    flat = problem.train.inputs.flatten(1)
    assert torch.allclose(flat.mean(0), torch.zeros(3072), atol=1e-5)
    assert torch.allclose(flat.std(0), torch.ones(3072), atol=1e-4)
    assert problem.model(problem.train.inputs[:4]).shape == (4, 10)


class Foreign:
    """An object a snapshot never holds: unpickling it could run any code."""


def test_a_snapshot_holding_a_foreign_object_is_refused(tmp_path, trained):
    from hessov.errors import UnsafeFileError
    from hessov.training import load_snapshot

    out, result = trained
    genuine = load_snapshot(f"{last_line(result.stdout)}/snapshots/step_30.pt")
    assert genuine["step"] == 30
    tampered = tmp_path / "step_30.pt"
    torch.save({**genuine, "extra": Foreign()}, tampered)
    with pytest.raises(UnsafeFileError, match=rf"{tampered}: refused to load"):
        load_snapshot(tampered)


def test_resume_picks_the_newest_snapshot_without_unpickling_any(tmp_path):
    from hessov.config import load_run_config, save_config
    from hessov.stages.train import prepare_run_dir

    cfg = load_run_config(["problem=mnist_mini", f"RUN_DIR={tmp_path}", "resume=true"])
    save_config(cfg, tmp_path / "config.yaml")
    snapshots = tmp_path / "snapshots"
    snapshots.mkdir()
    for name in ("step_30.pt", "latest.pt"):  # not loadable at all: never loaded here
        (snapshots / name).write_bytes(b"not a pickle")
    (snapshots / "latest.json").write_text(json.dumps({"step": 50}))
    assert prepare_run_dir(cfg)[1] == snapshots / "latest.pt"
    (snapshots / "latest.json").write_text(json.dumps({"step": 10}))
    assert prepare_run_dir(cfg)[1] == snapshots / "step_30.pt"
