"""A block of H (``params=``), the GGN (``curvature``), the most negative eigenpairs
(``which``) and the variants that put several of them in one run (``per_layer=true``,
``curvature=both``, ``which=both``), end to end on mnist_mini (preset=tiny, step 300, train).

One local run through the one stage graph: the block of the last two layers
(``params=[9.*,11.*]``, D = 630, so that every exhaustive check is cheap) with
``per_layer=true curvature=both which=both``, four rounds of k = 60: the run's own sketch of
the block's Hessian, its ``ggn`` and ``smallest`` variants and one variant per layer
(``layer_9``, ``layer_11``), each checked against the exact eigendecomposition of its own
operator.

What must hold, and why the tolerances:

* the block run's exact eigenvalues (of the operator its stages used) are those of the
  full Hessian's submatrix ``H[S, S]``: both dense float64 from the same products, so within
  ``1e-10 ||H||`` (``n u ||H||`` is ~1e-13 here);
* every finite error bound holds against the exact eigenvalues (exact inequality: the
  exact values' own error is ~1e-13, far below the smallest bound); the GGN's exact spectrum
  is positive semi-definite, and its sketched eigenvalues with a finite bound at least
  ``-bound``;
* the five most negative eigenvalues within 1% (measured 0.1% to 0.3%; the seeds fix the
  draw, rounding moves them by ~1e-6 relative); the shift is at least ``||H||_2``;
* the trace within 4 standard errors of the exact block's (tests/test_estimator_math.py);
* a layer's top Ritz value (a lower bound of its block's top eigenvalue) is at most the
  run's top Ritz value plus its bound: Cauchy interlacing puts a sub-block's top eigenvalue
  below the block's.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import last_line, run_hessov
from hessov.config import load_run_config, saved_run_config
from hessov.errors import ConfigError
from hessov.hessian import hessian_at_step
from hessov.launch.graph import plan_run
from hessov.launch.status import describe_status, run_status
from hessov.rundir import RunDir
from hessov.skerch_ext.operator import dense_matrix
from hessov.variants import variants_of

ONE_SKETCH = ["problem=mnist_mini", "preset=tiny", "HESSIAN_SPLITS=[train]", "HESSIAN_STEPS=[300]"]
BLOCK = [
    "params=[9.*,11.*]",
    "per_layer=true",
    "curvature=both",
    "which=both",
    "rounds=4",
    "k=60",
    "MEAS_PER_JOB=20",
    "EXHAUSTIVE=true",
    "estimates=[trace]",
]
LAYERS = {"9": 420, "11": 210}


@pytest.fixture(scope="module")
def block_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("block")
    return Path(last_line(run_hessov("run", *ONE_SKETCH, *BLOCK, f"OUTPUT_DIR={out}").stdout))


def _exact(run: Path) -> np.ndarray:
    with h5py.File(run / "exhaustive/step_300_train.h5") as handle:
        return handle["exact_eigenvalues"][:]


def _eigen(run: Path) -> tuple[np.ndarray, np.ndarray]:
    with h5py.File(run / "eigen/step_300_train.h5") as handle:
        return handle["eigenvalues"][:], handle["error_bounds"][:]


def test_a_block_is_the_submatrix_of_the_full_hessian(block_run, summary_of):
    summary = summary_of(block_run)
    assert summary["layout"]["D"] == 400 + 20 + 200 + 10
    cfg = saved_run_config(RunDir(block_run))
    cfg.dtype, cfg.params = "float64", []
    full = hessian_at_step(RunDir(block_run), cfg, 300, "train", check_deterministic=False)
    dense = dense_matrix(full.matmat, full.dim, block_size=512, dtype=torch.float64, device="cpu")
    rows = torch.arange(6400, 7030)  # 9.weight, 9.bias, 11.weight, 11.bias: the last 630 rows
    expected = torch.linalg.eigvalsh(dense[rows][:, rows]).numpy()
    exact = np.sort(_exact(block_run))
    assert np.abs(exact - expected).max() <= 1e-10 * np.abs(expected).max()
    checked = summary["exhaustive"]["300"]["train"]
    assert checked["bounds_checked"] >= 1 and checked["bounds_violated"] == 0
    trace = checked["estimates"]["trace"]
    assert trace["standard_errors"] <= 4 and summary["trace"]["300"]["train"]["hvps"] == 640


def test_the_ggn_variant_is_positive_semidefinite(block_run, summary_of):
    ggn = summary_of(block_run)["variants"]["ggn"]
    assert ggn["solve"]["300"]["train"]["curvature"] == "ggn"
    checked = ggn["exhaustive"]["300"]["train"]
    assert checked["bounds_checked"] >= 1 and checked["bounds_violated"] == 0
    exact = _exact(block_run / "variants/ggn")
    assert exact.min() >= -1e-10 * exact.max()
    values, bounds = _eigen(block_run / "variants/ggn")
    bounded = np.isfinite(bounds)
    assert (values[bounded] >= -bounds[bounded]).all()
    assert (block_run / "variants/ggn/params.h5").is_symlink()


def test_the_smallest_variant_finds_the_most_negative_eigenpairs(block_run, summary_of):
    smallest = summary_of(block_run)["variants"]["smallest"]
    solved, checked = smallest["solve"]["300"]["train"], smallest["exhaustive"]["300"]["train"]
    assert (
        solved["which"] == "smallest"
        and solved["shift"] == smallest["shift"]["300"]["train"]["shift"]
    )
    values, truth = solved["eigenvalues"], checked["exact_eigenvalues"]
    assert values == sorted(values) and truth == sorted(truth) and truth[0] < 0
    assert solved["shift"] >= np.abs(_exact(block_run / "variants/smallest")).max()  # ||H||_2
    assert checked["bounds_checked"] >= 1 and checked["bounds_violated"] == 0
    assert max(checked["eigenvalue_rel_err"][:5]) <= 0.01
    report = (block_run / "analysis/report.md").read_text()
    assert "### GGN against the Hessian" in report and "### Most negative" in report


def test_per_layer_sketches_every_layers_block(block_run, summary_of, tmp_path):
    cfg = load_run_config([*ONE_SKETCH, *BLOCK, f"OUTPUT_DIR={tmp_path}"])
    plan = plan_run(cfg).as_lines()  # what `hessov plan` prints
    assert "  layer_9: variant " in plan and "  layer_11: report " in plan
    variants = summary_of(block_run)["variants"]
    assert set(variants) == {f"layer_{module}" for module in LAYERS} | {"ggn", "smallest"}
    whole, whole_bounds = _eigen(block_run)
    assert np.isfinite(whole_bounds[0])
    for module, dim in LAYERS.items():
        assert variants[f"layer_{module}"]["layout"]["D"] == dim
        assert variants[f"layer_{module}"]["exhaustive"]["300"]["train"]["bounds_violated"] == 0
        layer, _ = _eigen(block_run / f"variants/layer_{module}")
        assert layer[0] <= whole[0] + whole_bounds[0], module
    report = (block_run / "analysis/report.md").read_text()
    assert "### Per layer, step 300 train" in report and "| block | 630 |" in report
    assert report.index("| 9 | 420 |") < report.index("| 11 | 210 |")  # D's order
    figure = block_run / "analysis/figures/variants_layers_step_300_train.png"
    assert figure.stat().st_size > 10_000
    status = describe_status(run_status(RunDir(block_run)))  # what `hessov status` prints
    assert "  variant layer_11:" in status and "not solved" not in status


def test_the_variants_a_config_asks_for():
    layout = [
        {"name": f"{module}.{kind}", "shape": [2], "offset": 0}
        for module in ("9", "10", "11")
        for kind in ("weight", "bias")
    ]
    cfg = load_run_config(["problem=mnist_mini", "per_layer=true", "which=both"])
    names = [variant.name for variant in variants_of(cfg, layout)]
    assert names == ["layer_9", "layer_10", "layer_11", "smallest"]  # D's order
    cfg = load_run_config(["problem=mnist_mini", "per_layer=true", "params=[9.*,11.*]"])
    assert [variant.name for variant in variants_of(cfg, layout)] == ["layer_9", "layer_11"]
    cfg = load_run_config(["problem=mnist_mini", "per_layer=true", "params=[11.*]"])
    assert variants_of(cfg, layout) == []  # one layer: the run's own sketch is its block
    cfg = load_run_config(["problem=mnist_mini", "curvature=both"])
    (ggn,) = variants_of(cfg, layout)
    assert (ggn.name, ggn.settings, ggn.key) == ("ggn", {"curvature": "ggn"}, "curvature")


def test_settings_that_cannot_work_are_refused():
    with pytest.raises(ConfigError, match="target_rel_err: with which=smallest"):
        load_run_config(["problem=mnist_mini", "which=both", "target_rel_err=0.01"])
    with pytest.raises(ConfigError, match="which: must be one of"):
        load_run_config(["problem=mnist_mini", "which=middle"])
