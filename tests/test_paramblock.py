"""``params=PATTERN``: which parameters a pattern selects, their rows, and the refusal of
a pattern that selects nothing (a block run end to end: tests/test_variants.py).
"""

from __future__ import annotations

import pytest
import torch

from hessov.config import load_run_config
from hessov.errors import ConfigError
from hessov.launch.local import run_local
from hessov.paramblock import block_rows, restrict, selected

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


def test_a_pattern_that_matches_nothing_is_refused_before_anything_is_made(tmp_path):
    cfg = load_run_config(["problem=mnist_mini", "params=conv*", f"OUTPUT_DIR={tmp_path}"])
    match = r"params: \['conv\*'\] match no trainable parameter; the names: 1.weight, 1.bias"
    with pytest.raises(ConfigError, match=match):
        run_local(cfg)  # `hessov run`: it would make the run directory once planned
    assert not list(tmp_path.iterdir())
    with pytest.raises(ConfigError, match="params: a replay filters"):
        load_run_config(["problem=mnist_mini", "params=1.*", "replays=[{name: a, snapshot: 0}]"])
