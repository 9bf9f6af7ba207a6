"""``params=PATTERN``: every Hessian stage works on the block of the selected parameters.

The block run's exhaustive check holds the exact eigenvalues of the operator the stages
used; they must be those of the full Hessian's submatrix ``H[S, S]``, both dense float64 from
the same products, so they agree to float64 rounding of a 630 x 630 eigendecomposition
(``1e-10 ||H||`` leaves a margin of 10^4 over ``n u ||H||``).
"""

from __future__ import annotations

import h5py
import pytest
import torch

from conftest import last_line
from hessov.config import load_run_config, saved_run_config
from hessov.errors import ConfigError
from hessov.hessian import hessian_at_step
from hessov.paramblock import block_rows, restrict, selected
from hessov.rundir import RunDir
from hessov.skerch_ext.operator import dense_matrix

LAYOUT = [
    {"name": "fc1.weight", "shape": [4, 3], "offset": 0},
    {"name": "fc1.bias", "shape": [4], "offset": 12},
    {"name": "fc2.weight", "shape": [2, 4], "offset": 16},
]


def test_patterns_select_parameters_in_their_order_and_rows():
    assert [e["name"] for e in selected(LAYOUT, ["*.bias", "fc2.*"])] == [
        "fc1.bias",
        "fc2.weight",
    ]
    rows = block_rows(LAYOUT, ["fc1.bias", "fc2.weight"])
    assert rows == [range(12, 16), range(16, 24)]
    assert restrict(torch.arange(24), rows).tolist() == list(range(12, 24))
    assert block_rows(LAYOUT, []) == [range(0, 12), range(12, 16), range(16, 24)]
    with pytest.raises(ConfigError, match=r"params: \['conv\*'\] match no .*fc1.weight, fc1.bias"):
        selected(LAYOUT, ["fc1.*", "conv*"])


def test_a_block_run_sketches_the_block_of_the_full_hessian(tmp_path, hessov, summary_of):
    args = ["problem=mnist_mini", "preset=tiny", "HESSIAN_SPLITS=[train]", "HESSIAN_STEPS=[300]"]
    block = ["params=[9.*,11.*]", "EXHAUSTIVE=true", "estimates=[diagonal]"]
    run = last_line(hessov("run", *args, *block, f"OUTPUT_DIR={tmp_path}").stdout)
    summary = summary_of(run)
    assert summary["layout"]["D"] == 400 + 20 + 200 + 10
    layers = summary["diagonal"]["300"]["train"]["layers"]
    assert set(layers) == {"9.weight", "9.bias", "11.weight", "11.bias"}
    assert "300" in summary["analyze"]  # masks over the block's parameters
    cfg = saved_run_config(RunDir(run))
    cfg.dtype, cfg.params = "float64", []
    full = hessian_at_step(RunDir(run), cfg, 300, "train", check_deterministic=False)
    dense = dense_matrix(full.matmat, full.dim, block_size=512, dtype=torch.float64, device="cpu")
    rows = torch.arange(6400, 7030)  # 9.weight, 9.bias, 11.weight, 11.bias: the last 630 rows
    expected = torch.linalg.eigvalsh(dense[rows][:, rows])
    with h5py.File(f"{run}/exhaustive/step_300_train.h5") as handle:
        exact = torch.from_numpy(handle["exact_eigenvalues"][:]).sort().values
    scale = float(expected.abs().max())
    assert (exact - expected).abs().max() <= 1e-10 * scale


def test_a_pattern_that_matches_nothing_is_refused_before_anything_is_made(tmp_path, hessov):
    result = hessov(
        "run", "problem=mnist_mini", "params=conv*", f"OUTPUT_DIR={tmp_path}", check=False
    )
    assert result.returncode == 2
    assert "params: ['conv*'] match no trainable parameter" in result.stderr
    assert "1.weight, 1.bias" in result.stderr and not list(tmp_path.iterdir())
    with pytest.raises(ConfigError, match="params: a replay filters"):
        load_run_config(["problem=mnist_mini", "params=1.*", "replays=[{name: a, snapshot: 0}]"])
