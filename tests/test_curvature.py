"""``curvature=ggn``: every Hessian stage of a run multiplies with the generalised
Gauss-Newton matrix instead (the operator itself is checked against curvlinops in
tests/test_operator.py).

Tolerances: the GGN of cross-entropy is positive semi-definite, so every sketched eigenvalue
with a finite error bound must be at least ``-bound``; the trace within 4 standard errors of
the dense GGN's, as in tests/test_estimates.py (the dense matrix comes from the same
operator, whose products tests/test_operator.py checks against curvlinops').
"""

from __future__ import annotations

import h5py
import pytest
import torch
from torch import nn

from conftest import laid_out, last_line
from hessov.batching import ModelLoss
from hessov.config import load_run_config
from hessov.errors import ConfigError
from hessov.hessian import curvature_operator
from hessov.skerch_ext.hutchinson import Z95
from oracles import dense_hessian

ONE_SKETCH = [
    "problem=mnist_mini",
    "preset=tiny",
    "HESSIAN_SPLITS=[train]",
    "HESSIAN_STEPS=[300]",
    "curvature=ggn",
    "estimates=[trace]",
]


def test_a_ggn_run_is_positive_semidefinite_and_its_trace_is_the_ggns(tmp_path, hessov, summary_of):
    run = last_line(hessov("run", *ONE_SKETCH, f"OUTPUT_DIR={tmp_path}").stdout)
    summary = summary_of(run)
    assert summary["solve"]["300"]["train"]["curvature"] == "ggn"
    with h5py.File(f"{run}/eigen/step_300_train.h5") as handle:
        assert handle.attrs["curvature"] == "ggn"
        values = torch.from_numpy(handle["eigenvalues"][:]).double()
        bounds = torch.from_numpy(handle["error_bounds"][:]).double()
    bounded = torch.isfinite(bounds)
    assert bounded.sum() >= 3 and (values[bounded] >= -bounds[bounded]).all()
    dense = dense_hessian(run, 300, "train")  # the run's config says ggn: the dense GGN
    trace = summary["trace"]["300"]["train"]
    assert abs(trace["value"] - float(dense.trace())) <= 4 * trace["ci95"] / Z95


def test_the_layout_fixes_the_curvature(tiny_trained, tmp_path, hessov):
    with pytest.raises(ConfigError, match="curvature: must be one of"):
        load_run_config(["problem=mnist_mini", "curvature=fisher"])
    run = laid_out(tiny_trained, tmp_path / "run", "curvature=ggn")
    again = hessov("layout", str(run), "curvature=hessian", check=False)
    assert again.returncode == 2 and "curvature=ggn" in again.stderr


def test_the_ggn_of_a_loss_of_the_model_is_refused_naming_the_key():
    model = nn.Sequential(nn.Linear(3, 2))
    loss = ModelLoss(lambda m, x, y: nn.functional.cross_entropy(m(x), y))
    data = (torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ConfigError, match="curvature: the GGN needs the loss"):
        curvature_operator("ggn", model, loss, data, 0)
