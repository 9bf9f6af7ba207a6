"""Variants (``per_layer=true``, ``curvature=both``, ``which=both``): more sketches of the
same training, each a run directory of its own made by a job of the one stage graph.

One local run of mnist_mini (preset=tiny, step 300, train) with all three. What must hold:
every variant is solved in its own directory with its own D and settings; a layer's block
``H[S, S]`` has its top eigenvalue at most the whole Hessian's (Cauchy interlacing), so a
layer's Ritz value (a lower bound of its block's) is at most the whole sketch's top Ritz value
plus that value's error bound; the GGN's sketched eigenvalues with a finite bound are at least
``-bound`` (it is PSD); the report compares them. Exactness of each operator is tested where
it is cheap: tests/test_paramblock.py (a block), tests/test_curvature.py (the GGN),
tests/test_smallest.py (the shift).
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import last_line
from hessov.config import load_run_config
from hessov.errors import ConfigError

VARIANTS = [
    "problem=mnist_mini",
    "preset=tiny",
    "HESSIAN_SPLITS=[train]",
    "HESSIAN_STEPS=[300]",
    "per_layer=true",
    "curvature=both",
    "which=both",
]
LAYERS = {"1": 5140, "3": 420, "5": 420, "7": 420, "9": 420, "11": 210}


def _eigen(run: Path) -> tuple[np.ndarray, np.ndarray]:
    with h5py.File(run / "eigen/step_300_train.h5") as handle:
        return handle["eigenvalues"][:], handle["error_bounds"][:]


def test_variants_are_runs_of_their_own_in_the_one_graph(tmp_path, hessov, summary_of):
    plan = hessov("plan", *VARIANTS, f"OUTPUT_DIR={tmp_path / 'plan'}").stdout
    assert "  layer_1: variant " in plan and "after: train" in plan
    assert "  smallest: shift step=300 split=train" in plan
    run = Path(last_line(hessov("run", *VARIANTS, f"OUTPUT_DIR={tmp_path}").stdout))
    summary = summary_of(run)
    variants = summary["variants"]
    assert set(variants) == {f"layer_{m}" for m in LAYERS} | {"ggn", "smallest"}
    for module, dim in LAYERS.items():
        assert variants[f"layer_{module}"]["layout"]["D"] == dim
    assert variants["ggn"]["solve"]["300"]["train"]["curvature"] == "ggn"
    assert variants["smallest"]["solve"]["300"]["train"]["which"] == "smallest"
    assert (run / "variants/ggn/params.h5").is_symlink()

    whole, whole_bounds = _eigen(run)
    assert np.isfinite(whole_bounds[0])
    for module in LAYERS:
        layer, _ = _eigen(run / f"variants/layer_{module}")
        assert layer[0] <= whole[0] + whole_bounds[0], module
    ggn, ggn_bounds = _eigen(run / "variants/ggn")
    bounded = np.isfinite(ggn_bounds)
    assert bounded.any() and (ggn[bounded] >= -ggn_bounds[bounded]).all()
    smallest, _ = _eigen(run / "variants/smallest")
    assert (np.diff(smallest) >= 0).all() and smallest[0] < 0

    report = (run / "analysis/report.md").read_text()
    for heading in ("### Per layer", "### GGN against the Hessian", "### Most negative"):
        assert f"{heading}" in report
    assert (run / "analysis/figures/variants_layers_step_300_train.png").stat().st_size > 10_000
    status = hessov("status", str(run)).stdout
    assert "  variant layer_11:" in status and "not solved" not in status


def test_variant_settings_that_cannot_work_are_refused():
    with pytest.raises(ConfigError, match="per_layer: sketches every layer's block"):
        load_run_config(["problem=mnist_mini", "per_layer=true", "params=1.*"])
    with pytest.raises(ConfigError, match="target_rel_err: with which=smallest"):
        load_run_config(["problem=mnist_mini", "which=both", "target_rel_err=0.01"])
