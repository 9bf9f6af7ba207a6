"""The paper's three cluster experiments (``config/clusters/*_paper.yaml``) plan cleanly: on
synthetic files in the real formats and sizes, every job fits its stage's Slurm memory, and
the configs hold the paper's settings (``../README.md``, "The paper's cluster experiments").
"""

import json

import pytest

from bench.paper_configs import PAPER_MINUTES, write_synthetic_datasets
from conftest import REPO, run_hessov
from hessov.config import load_run_config

#: Per config, the paper's D, k, s, measurements per task, Hessian points, batch size and
#: learning rate.
PAPER = {
    "cifar10_3c3d_paper": (895_210, 1000, 2000, 400, 500, 128, 0.0226105),
    "cifar100_allcnnc_paper": (1_387_108, 1000, 2000, 340, 1000, 256, 0.1657913),
    "imagenet_resnet18_paper": (11_689_512, 1500, 3000, 100, 5000, 150, 0.1),
}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    return write_synthetic_datasets(tmp_path_factory.mktemp("paper-data"))


@pytest.mark.parametrize("name", PAPER_MINUTES)
def test_a_paper_config_has_the_papers_settings_and_plans_within_its_memory(name, datasets):
    path = REPO / "config" / "clusters" / f"{name}.yaml"
    dim, k, s, per_task, points, batch, lr = PAPER[name]
    cfg = load_run_config([f"OBS_DATASETS={datasets}"], config_file=path)
    assert (cfg.k, cfg.s, cfg.MEAS_PER_JOB, cfg.NUM_HESSIAN_DATAPOINTS) == (k, s, per_task, points)
    assert (cfg.BATCH_SIZE, cfg.optimizer.lr, cfg.recovery) == (batch, lr, "single_pass")
    assert cfg.RECORD_STEPS == [0, 2000, 4000, 6000, 8000]
    settings = [str(path), f"OBS_DATASETS={datasets}", "backend=slurm", "--json"]
    plan = json.loads(run_hessov("plan", *settings).stdout)
    assert (plan["dim"], plan["k"], plan["s"]) == (dim, k, s)
    assert plan["tasks"] == -(-s // per_task) and len(plan["sketches"]) == 10
    for job in plan["jobs"]:
        stage = getattr(cfg.slurm.stages, job["stage"])
        budget_gb = stage.mem_gb or cfg.slurm.mem_gb
        assert 0 < job["memory_bytes"] <= budget_gb * 2**30, (job["name"], budget_gb)
