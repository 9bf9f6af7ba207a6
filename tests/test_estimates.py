"""The trace, diagonal and density stages end to end on mnist_mini (preset=tiny, D = 7,030).

The session's tiny run computed all three for every step and split through `hessov run`'s
stage graph (conftest.ESTIMATES); here the train split at step 300 is compared with the
exact values of its dense float64 Hessian. Tolerances come from the estimates' own spread
(tests/test_estimator_math.py says why): the trace within 4 standard errors, the diagonal
with ``||error|| <= 2 ||ci95||`` over all of D and per layer. The density's distance to the
exact eigenvalues is bounded by what the sketch's eigenvalues alone miss (the bulk's runs
must recover most of it: measured 6.8x here) and by twice its measured value at this run's
settings, 1.8e-3: the probes are the same bits on every machine, and rounding moves the
Lanczos nodes by ~1e-6 of the spectrum's width, far below that margin.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import pytest
import torch

from hessov.config import load_run_config
from hessov.errors import ConfigError, MissingInputError
from hessov.jobs import run_job
from hessov.rundir import RunDir
from hessov.skerch_ext.hutchinson import Z95
from hessov.skerch_ext.slq import wasserstein1
from oracles import dense_hessian

WHERE = (300, "train")


@pytest.fixture(scope="module")
def exact(tiny_run):
    """The dense float64 Hessian's eigenvalues ``(D,)`` and diagonal ``(D,)``."""
    dense = dense_hessian(tiny_run, *WHERE)
    return torch.linalg.eigvalsh(dense), dense.diagonal().clone()


def test_trace_is_within_its_interval_of_the_exact_trace(tiny_run, summary_of, exact):
    fields = summary_of(tiny_run)["trace"]["300"]["train"]
    exact_trace = float(exact[0].sum())
    assert abs(fields["value"] - exact_trace) <= 4 * fields["ci95"] / Z95
    assert fields["hvps"] == 320 and fields["basis_width"] == 30
    # The sketch's basis carries most of the trace, exactly.
    assert fields["sketched_trace"] > 0.6 * exact_trace


def test_diagonal_matches_the_exact_diagonal_per_layer(tiny_run, exact):
    run = RunDir(tiny_run)
    with h5py.File(run.estimate(*WHERE, "diagonal")) as handle:
        estimate = torch.from_numpy(handle["diagonal"][:])
        ci95 = torch.from_numpy(handle["ci95"][:])
        layers = json.loads(handle.attrs["layers"])
    exact_diagonal = exact[1]
    assert (estimate - exact_diagonal).norm() <= 2 * ci95.norm()
    start = 0
    for name, layer in layers.items():
        rows = slice(start, start + layer["size"])
        error = (estimate[rows] - exact_diagonal[rows]).norm()
        assert error <= 2 * ci95[rows].norm(), name
        start += layer["size"]
    assert start == len(exact_diagonal) and len(layers) == 12  # six Linear layers
    assert run.estimate_figure(*WHERE, "diagonal").stat().st_size > 10_000


def test_density_is_close_to_the_exact_spectrum_and_keeps_the_sketch(tiny_run, exact):
    run = RunDir(tiny_run)
    values = exact[0]
    dim = len(values)
    uniform = torch.full((dim,), 1 / dim, dtype=torch.float64)
    with (
        h5py.File(run.estimate(*WHERE, "density")) as density,
        h5py.File(run.eigen(*WHERE)) as eigen,
    ):
        nodes = torch.from_numpy(density["nodes"][:])
        weights = torch.from_numpy(density["weights"][:])
        outliers = density["outliers"][:]
        assert (outliers == eigen["eigenvalues"][:]).all()  # the sketch's, exactly
        assert float(density["density"][:].max()) > 0
    assert abs(float(weights.sum()) - 1) <= 1e-12
    sketch_only = torch.cat([torch.from_numpy(outliers), torch.zeros(dim - len(outliers))])
    distance = wasserstein1(nodes, weights, values, uniform)
    without_bulk = wasserstein1(sketch_only.double(), uniform, values, uniform)
    assert distance < without_bulk / 4, (distance, without_bulk)
    assert distance < 3.5e-3
    # The bulk's nodes are Rayleigh quotients of H: inside its spectrum.
    bulk = nodes[len(outliers) :]
    span = float(values.max() - values.min())
    assert values.min() - 1e-6 * span <= bulk.min() and bulk.max() <= values.max() + 1e-6 * span


def test_summary_and_report_name_every_estimate(tiny_run, summary_of):
    summary = summary_of(tiny_run)
    for step in ("100", "300"):
        for split in ("train", "test"):
            assert {"value", "ci95", "hvps"} <= set(summary["trace"][step][split])
            density = summary["density"][step][split]
            assert (density["runs"], density["lanczos_steps"]) == (5, 80)
            assert 0 < density["hvps"] <= 400 and Path(density["file"]).is_file()
            assert set(summary["diagonal"][step][split]["layers"]) >= {"1.weight", "11.bias"}
    report = (Path(tiny_run) / "analysis/report.md").read_text()
    assert "## Trace, diagonal and spectral density" in report
    assert "| 300 train |" in report


def test_a_rerun_computes_only_missing_tasks_and_refuses_other_settings(tiny_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(tiny_run, run)
    where = RunDir(run)
    tasks = sorted(where.estimate_task(*WHERE, "trace", 0).parent.glob("task_*.h5"))
    assert len(tasks) == 5  # 320 probes of 64
    before = {path: path.stat().st_mtime_ns for path in tasks}
    with h5py.File(where.estimate(*WHERE, "trace")) as handle:
        value = float(handle.attrs["value"])
    tasks[2].unlink()
    where.estimate(*WHERE, "trace").unlink()
    run_job(["trace", str(run), "step=300", "split=train"])  # in process: the config's threads
    after = {path: path.stat().st_mtime_ns for path in tasks}
    assert [path for path in tasks if after[path] != before[path]] == [tasks[2]]
    with h5py.File(where.estimate(*WHERE, "trace")) as handle:
        # Bitwise by construction: the same probes' products on the same machine, kernel
        # path and block width.
        assert float(handle.attrs["value"]) == value
    # 300 probes make five tasks too: their files hold 320 probes' samples, not mixed in.
    other = ["step=300", "split=train", "phase=finish", "trace_probes=300"]
    with pytest.raises(
        ConfigError, match="trace_probes: .*trace_probes=320 probes_per_task=64"
    ) as err:
        run_job(["trace", str(run), *other])
    assert f"remove {tasks[0].parent}" in str(err.value)


def test_bad_estimate_input_is_refused_naming_the_key(tiny_trained, tmp_path):
    with pytest.raises(ConfigError, match="estimates: unknown estimate 'hutchinson'"):
        load_run_config(["problem=mnist_mini", "estimates=[hutchinson]"])
    with pytest.raises(ConfigError, match="estimates: trace and diagonal reuse the two-pass"):
        load_run_config(["problem=mnist_mini", "recovery=single_pass", "estimates=[trace]"])
    with pytest.raises(ConfigError, match="density_steps: must be >= 2"):
        load_run_config(["problem=mnist_mini", "density_steps=1"])
    run = tmp_path / "run"
    shutil.copytree(tiny_trained, run)
    run_job(["layout", str(run)])
    with pytest.raises(MissingInputError, match="hessov solve"):
        run_job(["trace", str(run), "step=300", "split=train"])
    with pytest.raises(ConfigError, match="phase: one of probes, finish"):
        run_job(["density", str(run), "phase=all_of_it"])
