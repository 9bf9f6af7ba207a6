"""Config loading: layering, dotlist overrides, and errors that name the key."""

import pytest

from hessov.config import load_run_config, read_config, save_config
from hessov.errors import ConfigError


def test_problem_defaults_and_overrides_layer_in_order():
    cfg = load_run_config(["problem=mnist_mini", "MAX_STEPS=300", "RECORD_STEPS=[0,100]"])
    assert cfg.BATCH_SIZE == 500  # from config/problems/mnist_mini.yaml
    assert cfg.optimizer.lr == 0.3  # from config/tuning.yaml
    assert cfg.MAX_STEPS == 300 and cfg.RECORD_STEPS == [0, 100]


def test_tuning_defaults_follow_the_chosen_optimizer():
    cfg = load_run_config(["problem=mnist_mini", "optimizer.name=Adam"])
    assert cfg.optimizer.name == "Adam" and cfg.optimizer.lr == 0.003
    explicit = load_run_config(["problem=mnist_mini", "optimizer.name=Adam", "optimizer.lr=0.01"])
    assert explicit.optimizer.lr == 0.01


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("NOT_A_KEY=1", "NOT_A_KEY"),
        ("MAX_STEPS=many", "MAX_STEPS"),
        ("optimizer.lr=-0.1", "optimizer.lr"),
        ("RECORD_STEPS=[0,99999]", "RECORD_STEPS"),
        ("SNAPSHOT_STEPS=[-1]", "SNAPSHOT_STEPS"),
        ("device=tpu", "device"),
        ("dtype=float16", "dtype"),
        ("optimizer.betas=[0.9,1.5]", "optimizer.betas"),
        ("EVAL_EVERY=0", "EVAL_EVERY"),
        ("OBS_DATASETS=/no/such/dir", "OBS_DATASETS"),
    ],
)
def test_bad_values_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_run_config(["problem=mnist_mini", override])
    assert key in str(err.value)


def test_unknown_or_missing_problem_lists_the_known_ones():
    with pytest.raises(ConfigError, match="mnist_mini"):
        load_run_config(["problem=imagenet_tiny"])
    with pytest.raises(ConfigError, match="problem"):
        load_run_config([])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_run_config(["problem"])


def test_saved_config_reads_back_identically(tmp_path):
    cfg = load_run_config(["problem=fc-tanh", "optimizer.momentum=0.9", "TARGET_TRAIN_LOSS=0.1"])
    save_config(cfg, tmp_path / "config.yaml")
    assert read_config(tmp_path / "config.yaml") == cfg
