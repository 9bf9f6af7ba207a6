"""Unit tests of what a run's files say is done (``pipeline/launch/status.py``).

``hessov status`` and the stage graph of ``hessov resume`` trust only the run directory, so
a wrong reading there re-measures finished work or skips missing work. Until now this was
checked only through slow CLI runs; here run directories are built by hand in ``tmp_path``:
a sketch spec laid out with :func:`hessov.stages.layout.complete_layout` (no training
needed), some blocks written through the store API, and empty files standing for the
basis, eigenpairs, exhaustive checks and analyses. Then :func:`run_status`,
:func:`missing_work` and :func:`describe_status` must report exactly that state.
"""

import shutil

import numpy as np
import pytest

from hessov import summary
from hessov.launch.status import describe_status, missing_work, run_status
from hessov.rundir import RunDir
from hessov.runlog import read_events
from hessov.skerch_ext.storage import SketchLayout
from hessov.sketchspec import SketchSpec, load_spec
from hessov.stages.layout import complete_layout

DIM = 12


def make_spec(recovery: str, steps: list[int], splits: list[str]) -> SketchSpec:
    """A tiny spec: blocks of 2 and array tasks of 4 measurements.

    Single pass has k=3, s=6 (blocks 0-1, 2-3, 4-5; tasks 0-3, 4-5); two-pass has k=5 and
    no inner sketch (blocks 0-1, 2-3, 4; tasks 0-3, 4), in two rounds.
    """
    if recovery == "two_pass":
        layout = SketchLayout(DIM, 5, 0, 2, "float64", "gaussian", 0)
    else:
        layout = SketchLayout(DIM, 3, 6, 2, "float64", "gaussian", 0)
    return SketchSpec(layout, recovery, 0, steps, splits, meas_per_job=4)


def measure(run: RunDir, spec: SketchSpec, step: int, split: str, round_name: str, blocks):
    """Write blocks ``blocks`` of one round with random values, flagged measured."""
    store = spec.store(run, step, split, round_name)
    layout = store.layout
    rng = np.random.default_rng(step)
    for block_id in blocks:
        block = layout.blocks[block_id]
        inner = rng.standard_normal((layout.num_inner, len(block))) if layout.num_inner else None
        n_outer = max(0, min(block.stop, layout.num_outer) - block.start)
        outer = rng.standard_normal((layout.dim, n_outer)) if n_outer else None
        store.write_block(block_id, inner, outer)


def touch(path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()


def trained_run(tmp_path) -> RunDir:
    """A run directory whose train stage has recorded its summary (and nothing else)."""
    run = RunDir(tmp_path / "run")
    summary.record(run, "train", {"steps": 10})
    return run


@pytest.fixture
def single_pass(tmp_path) -> tuple[RunDir, SketchSpec]:
    run = trained_run(tmp_path)
    spec = complete_layout(run, make_spec("single_pass", [0, 10], ["train"]))
    return run, spec


def test_complete_layout_creates_the_storage_once(tmp_path):
    run = trained_run(tmp_path)
    spec = complete_layout(run, make_spec("single_pass", [0, 10], ["train", "test"]))
    assert load_spec(run).layout == spec.layout
    assert run.summary("layout").is_file()
    assert run.monolithic("train").is_file() and run.monolithic("test").is_file()
    assert len(list(run.measurement_parts(10, "test").glob("part_*.h5"))) == 3
    complete_layout(run, load_spec(run))
    created = [event["created_parts"] for event in read_events(run.log, "layout")]
    assert created == [12, 0]  # 2 steps x 2 splits x 3 parts, then nothing


def test_status_without_train_summary_or_layout(tmp_path):
    run = RunDir(tmp_path / "empty")
    status = run_status(run)
    assert status == {
        "run": str(run.root),
        "train": False,
        "layout": False,
        "sketches": [],
        "variants": {},
    }
    assert missing_work(status) == ["train: not finished (everything after it is missing)"]
    assert describe_status(status) == (
        f"run {run.root}\n  train:  not finished\n  layout: not created"
    )


def test_status_with_training_but_no_layout(tmp_path):
    status = run_status(trained_run(tmp_path))
    assert status["train"] and not status["layout"] and status["sketches"] == []
    assert missing_work(status) == ["layout: not created (every measurement and solve is missing)"]
    assert "  train:  done\n  layout: not created" in describe_status(status)


def test_fresh_layout_misses_every_index_and_task(single_pass):
    run, _ = single_pass
    status = run_status(run)
    assert status["train"] and status["layout"]
    assert [(item.step, item.split) for item in status["sketches"]] == [(0, "train"), (10, "train")]
    for item in status["sketches"]:
        assert list(item.rounds) == ["first"]
        first = item.rounds["first"]
        assert first.total == 6 and first.missing == [0, 1, 2, 3, 4, 5]
        assert first.tasks_missing == [0, 1] and not first.done
        assert not (item.solved or any(item.bases_written.values()) or item.exhaustive_done)
        assert not item.analysed


def test_partly_measured_run(single_pass):
    run, spec = single_pass
    measure(run, spec, 0, "train", "first", [0, 1])
    measure(run, spec, 10, "train", "first", [2])
    status = run_status(run)
    step0, step10 = status["sketches"]
    assert step0.rounds["first"].missing == [4, 5]
    assert step0.rounds["first"].tasks_missing == [1]
    assert step10.rounds["first"].missing == [0, 1, 2, 3]
    assert step10.rounds["first"].tasks_missing == [0]
    assert missing_work(status) == [
        "step 0 train: first round missing indices 4-5 (array tasks [1])",
        "step 0 train: not solved",
        "step 10 train: first round missing indices 0-3 (array tasks [0])",
        "step 10 train: not solved",
    ]
    text = describe_status(status)
    assert (
        "  step 0 train: first round 4/6 measured (missing indices 4-5; array tasks [1]); "
        "not solved"
    ) in text.splitlines()
    assert (
        "  step 10 train: first round 2/6 measured (missing indices 0-3; array tasks [0]); "
        "not solved"
    ) in text.splitlines()


def test_a_deleted_part_or_store_counts_as_missing(single_pass):
    run, spec = single_pass
    measure(run, spec, 0, "train", "first", [0, 1, 2])
    spec.store(run, 0, "train").part_path(1).unlink()
    shutil.rmtree(run.measurement_parts(10, "train"))
    step0, step10 = run_status(run)["sketches"]
    assert step0.rounds["first"].missing == [2, 3]
    assert step0.rounds["first"].tasks_missing == [0]
    assert step10.rounds["first"].missing == [0, 1, 2, 3, 4, 5]
    assert step10.rounds["first"].tasks_missing == [0, 1]


def test_solved_analysed_and_exhaustive_follow_the_files(single_pass):
    run, spec = single_pass
    for step in spec.steps:
        measure(run, spec, step, "train", "first", range(3))
    touch(run.eigen(0, "train"))
    touch(run.analysis_step(0, "train"))
    touch(run.exhaustive(10, "train"))
    status = run_status(run)
    step0, step10 = status["sketches"]
    assert step0.rounds["first"].done and step10.rounds["first"].done
    assert (step0.solved, step0.analysed, step0.exhaustive_done) == (True, True, False)
    assert (step10.solved, step10.analysed, step10.exhaustive_done) == (False, False, True)
    assert missing_work(status) == ["step 10 train: not solved"]
    assert missing_work(status, exhaustive=True) == [
        "step 0 train: exhaustive check missing",
        "step 10 train: not solved",
    ]
    lines = describe_status(status).splitlines()
    assert "  step 0 train: first round 6/6 measured; solved, analysed" in lines
    assert "  step 10 train: first round 6/6 measured; not solved" in lines

    touch(run.eigen(10, "train"))
    touch(run.exhaustive(0, "train"))
    status = run_status(run)
    assert missing_work(status) == [] and missing_work(status, exhaustive=True) == []
    assert "  step 10 train: first round 6/6 measured; solved, not analysed" in (
        describe_status(status).splitlines()
    )


def test_two_pass_rounds_and_basis(tmp_path):
    run = trained_run(tmp_path)
    spec = complete_layout(run, make_spec("two_pass", [5], ["train", "test"]))
    measure(run, spec, 5, "train", "first", range(3))
    measure(run, spec, 5, "train", "second", [2])
    touch(run.two_pass_basis(5, "train"))
    status = run_status(run)
    train, test = status["sketches"]
    assert (train.split, test.split) == ("train", "test")
    assert list(train.rounds) == ["first", "second"]
    assert train.rounds["first"].done and train.rounds["first"].total == 5
    assert train.rounds["second"].missing == [0, 1, 2, 3]
    assert train.rounds["second"].tasks_missing == [0]
    assert train.bases_written == {"second": True} and test.bases_written == {"second": False}
    assert test.rounds["first"].missing == [0, 1, 2, 3, 4]
    assert test.rounds["first"].tasks_missing == [0, 1]
    assert missing_work(status) == [
        "step 5 train: second round missing indices 0-3 (array tasks [0])",
        "step 5 train: not solved",
        "step 5 test: first round missing indices 0-4 (array tasks [0, 1])",
        "step 5 test: second round missing indices 0-4 (array tasks [0, 1])",
        "step 5 test: not solved",
    ]
    assert (
        "  step 5 train: first round 5/5 measured; second round 1/5 measured "
        "(missing indices 0-3; array tasks [0]); not solved"
    ) in describe_status(status).splitlines()
