"""Unit tests of the shared file rules (``pipeline/fileio.py``) and the event log
(``pipeline/runlog.py``).

Every stage relies on these for safety when jobs share a run directory: a write is atomic
(the file appears whole, or the old one stays and no temporary file is left), a lock held
by one process refuses a non-blocking second holder and is released when its holder dies,
a configuration error has the one format ``KEY: what is wrong (in SOURCE)``, and the event
log is closed however a stage ends. Until now these were exercised only through slow CLI
runs. The lock is tested from a second process (``sys.executable -c``), since ``flock``
belongs to an open file description and a process must not be its own witness.
"""

import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from omegaconf import MISSING

from hessov.errors import ConfigError
from hessov.fileio import (
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    exclusive_lock,
    merge_config,
)
from hessov.runlog import EventLog, log_event, read_events

REPO = Path(__file__).resolve().parent.parent


# -- atomic writes ----------------------------------------------------------------------------


def test_atomic_write_shows_the_file_only_once_written(tmp_path):
    target = tmp_path / "new" / "dir" / "result.txt"
    with atomic_write(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".result.txt.")
        tmp.write_text("complete")
        assert not target.exists()
    assert target.read_text() == "complete"
    assert [p.name for p in target.parent.iterdir()] == ["result.txt"]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_atomic_write_failure_leaves_the_target_and_no_temporary(tmp_path, error):
    target = tmp_path / "result.txt"
    target.write_text("old")
    with pytest.raises(error), atomic_write(target) as tmp:
        tmp.write_text("half")
        raise error("killed mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["result.txt"]


def test_atomic_write_failure_creates_nothing(tmp_path):
    target = tmp_path / "result.txt"
    with pytest.raises(ValueError), atomic_write(target) as tmp:
        tmp.write_text("half")
        raise ValueError("bad value")
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_json_and_text(tmp_path):
    target = tmp_path / "summary.json"
    payload = {"b": [1, 2], "a": {"z": 1.5, "y": None}}
    atomic_write_json(target, payload)
    assert json.loads(target.read_text()) == payload
    assert target.read_text() == json.dumps(payload, indent=2, sort_keys=True)
    atomic_write_text(target, "replaced")
    assert target.read_text() == "replaced"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


# -- exclusive locks --------------------------------------------------------------------------

HOLDER = """
import sys
from hessov.fileio import exclusive_lock
with exclusive_lock(sys.argv[1]) as held:
    print("held" if held else "refused", flush=True)
    sys.stdin.readline()
"""

PROBE = """
import sys
from hessov.fileio import exclusive_lock
with exclusive_lock(sys.argv[1], blocking=False) as held:
    print(held)
"""


def probe_lock(path: Path) -> str:
    """Try a non-blocking lock on ``path`` from a fresh process.

    Returns:
        ``"True"`` if that process got the lock, ``"False"`` if another holds it.
    """
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout.strip()


def test_exclusive_lock_refuses_another_process_while_held(tmp_path):
    path = tmp_path / "locks" / "solve.lock"
    with exclusive_lock(path) as held:
        assert held is True
        assert path.is_file()
        assert probe_lock(path) == "False"
    assert probe_lock(path) == "True"
    assert path.is_file()  # never removed


def test_exclusive_lock_is_released_when_its_holder_is_killed(tmp_path):
    path = tmp_path / "part.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with exclusive_lock(path, blocking=False) as mine:
            assert mine is False
    finally:
        holder.kill()
        holder.wait(timeout=60)
        holder.stdin.close()
        holder.stdout.close()
    with exclusive_lock(path, blocking=False) as mine:
        assert mine is True


def test_non_blocking_lock_still_runs_the_block_without_the_lock(tmp_path):
    path = tmp_path / "x.lock"
    ran = []
    with exclusive_lock(path), exclusive_lock(path, blocking=False) as second:
        ran.append(second)
    assert ran == [False]


# -- merge_config -----------------------------------------------------------------------------


@dataclass
class Optimizer:
    lr: float = 0.1


@dataclass
class Schema:
    name: str = "default"
    steps: int = 1
    optimizer: Optimizer = field(default_factory=Optimizer)


@dataclass
class NeedsValue:
    seed: int = MISSING


def test_merge_config_layers_in_order():
    cfg = merge_config(
        Schema,
        {"steps": 2, "name": "file"},
        {"steps": 3, "optimizer": {"lr": 0.5}},
        source=["a.yaml", "the command line"],
    )
    assert isinstance(cfg, Schema) and isinstance(cfg.optimizer, Optimizer)
    assert (cfg.name, cfg.steps, cfg.optimizer.lr) == ("file", 3, 0.5)


def test_merge_config_adjust_sees_the_merged_config():
    def double_steps(merged):
        merged.steps = merged.steps * 2

    assert merge_config(Schema, {"steps": 4}, source="a.yaml", adjust=double_steps).steps == 8


@pytest.mark.parametrize(
    ("layers", "kwargs", "pattern"),
    [
        (({"nope": 1},), {"source": "x.yaml"}, r"nope: .*'nope'.* \(in x\.yaml\)"),
        (
            ({"steps": 2}, {"steps": "many"}),
            {"source": ["a.yaml", "the command line"]},
            r"steps: .*'many'.* \(in the command line\)",
        ),
        (
            ({"optimizer": {"lr": "fast"}},),
            {"source": "b.yaml"},
            r"optimizer\.lr: .*'fast'.* \(in b\.yaml\)",
        ),
        (
            ({"optimizer": {"lr": "fast"}},),
            {"source": "b.yaml", "key_prefix": "replays[0]."},
            r"replays\[0\]\.optimizer\.lr: .* \(in b\.yaml\)",
        ),
    ],
)
def test_merge_config_errors_name_the_key_and_the_source(layers, kwargs, pattern):
    with pytest.raises(ConfigError) as err:
        merge_config(Schema, *layers, **kwargs)
    message = str(err.value)
    assert "\n" not in message
    assert re.fullmatch(pattern, message), message


def test_merge_config_missing_value_names_every_source():
    with pytest.raises(ConfigError) as err:
        merge_config(NeedsValue, {}, {}, source=["a.yaml", "the command line"])
    message = str(err.value)
    assert message.startswith("seed: ") and "missing mandatory value" in message
    assert message.endswith("(in a.yaml, the command line)")


def test_merge_config_wants_one_source_per_layer():
    with pytest.raises(ValueError, match="2 layers but 3 sources"):
        merge_config(Schema, {}, {}, source=["a", "b", "c"])


# -- EventLog ---------------------------------------------------------------------------------


def test_event_log_closes_its_file_after_the_with_block(tmp_path):
    path = tmp_path / "log.jsonl"
    with EventLog(path, "measure") as events:
        events.write("start", step=3, columns=np.arange(3), where=tmp_path)
        handle = events._handle
        assert not handle.closed
        assert read_events(path)[0]["event"] == "start"  # line-buffered: readable at once
    assert handle.closed and events._handle is None
    (record,) = read_events(path)
    assert record["stage"] == "measure" and record["step"] == 3
    assert record["columns"] == [0, 1, 2] and record["where"] == str(tmp_path)
    assert isinstance(record["time"], float)


def test_event_log_closes_its_file_when_the_stage_fails(tmp_path):
    path = tmp_path / "log.jsonl"
    with pytest.raises(RuntimeError), EventLog(path, "solve") as events:
        events.write("start")
        handle = events._handle
        raise RuntimeError("solve failed")
    assert handle.closed
    assert [r["event"] for r in read_events(path)] == ["start"]


def test_event_log_appends_and_filters(tmp_path):
    path = tmp_path / "log.jsonl"
    log_event(path, "train", "config", lr=0.1)
    with EventLog(path, "measure") as events:
        events.write("block", index=0)
        events.close()
        events.write("block", index=1)  # a write after close opens the file again
    with open(path, "a") as raw:
        raw.write("\n")  # blank lines are skipped
    log_event(path, "solve", "done")
    assert [(r["stage"], r["event"]) for r in read_events(path)] == [
        ("train", "config"),
        ("measure", "block"),
        ("measure", "block"),
        ("solve", "done"),
    ]
    assert [r["index"] for r in read_events(path, "block")] == [0, 1]
    assert read_events(path, "config")[0]["lr"] == 0.1


def test_event_log_refuses_values_json_cannot_hold(tmp_path):
    with pytest.raises(TypeError, match="not JSON serialisable: object"):
        log_event(tmp_path / "log.jsonl", "train", "bad", value=object())
