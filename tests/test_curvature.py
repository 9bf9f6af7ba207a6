"""``curvature``: the layout fixes it, and the GGN is refused where it is not defined (its
products: tests/test_operator.py; a GGN sketch end to end: tests/test_variants.py).
"""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from hessov.batching import ModelLoss
from hessov.config import load_run_config
from hessov.errors import ConfigError
from hessov.hessian import curvature_operator
from hessov.jobs import run_job


def test_the_layout_fixes_the_curvature(tiny_trained, tmp_path):
    with pytest.raises(ConfigError, match="curvature: must be one of"):
        load_run_config(["problem=mnist_mini", "curvature=fisher"])
    run = tmp_path / "run"
    shutil.copytree(tiny_trained, run)
    run_job(["layout", str(run), "curvature=ggn"])
    with pytest.raises(ConfigError, match="curvature=ggn"):
        run_job(["layout", str(run), "curvature=hessian"])


def test_the_ggn_of_a_loss_of_the_model_is_refused_naming_the_key():
    model = nn.Sequential(nn.Linear(3, 2))
    loss = ModelLoss(lambda m, x, y: nn.functional.cross_entropy(m(x), y))
    data = (torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ConfigError, match="curvature: the GGN needs the loss"):
        curvature_operator("ggn", model, loss, data, 0)
