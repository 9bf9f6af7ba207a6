"""Shared fixtures: running the real ``hessov`` command in a subprocess."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest

REPO = Path(__file__).resolve().parent.parent


def run_hessov(*args: str, check: bool = True, env: dict | None = None, timeout: float = 600):
    """Run ``hessov ARGS`` as a user would; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    result = subprocess.run(
        [sys.executable, "-m", "hessov.cli", *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"hessov {' '.join(args)} exited {result.returncode}\n{result.stderr[-4000:]}"
        )
    return result


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


@pytest.fixture(autouse=True)
def torch_threads():
    """Restore torch's thread count after every test: a stage run in the test's process sets
    the config's (mnist_mini: 1), and the next test in the same worker must not inherit it.
    """
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def hessov():
    return run_hessov


@pytest.fixture
def summary_of():
    def load(run_dir) -> dict:
        return json.loads(run_hessov("summary", str(run_dir)).stdout)

    return load


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> str:
    """One finished `hessov run problem=mnist_mini preset=tiny` (local backend) with
    :data:`ESTIMATES`, shared by every test that only reads it; tests that change a run work
    on a copy.
    """
    out = tmp_path_factory.mktemp("tiny-runs")
    args = ["problem=mnist_mini", "preset=tiny", *ESTIMATES]
    return last_line(run_hessov("run", *args, f"OUTPUT_DIR={out}").stdout)


#: Every estimate that reuses the sketch, at half the default probes (a few seconds for the
#: four sketches of preset=tiny); tests/test_estimates.py compares them with the exact ones.
ESTIMATES = [
    "estimates=[trace,diagonal,density]",
    "trace_probes=320",
    "diagonal_probes=320",
    "density_runs=5",
]


#: A target the third round meets at step 300 of preset=tiny, and at step 100 only the
#: solve after the fourth, the last (tests/test_rounds.py says why on every machine).
TARGET = ["target_rel_err=0.01", "target_eigenpairs=3", "max_rounds=4"]


@pytest.fixture(scope="session")
def adaptive_run(tmp_path_factory) -> str:
    """One finished local `hessov run problem=mnist_mini preset=tiny` of the train split with
    :data:`TARGET`, shared by the tests that read it or compare a launcher's run with it: its
    step 300 took three rounds, the eigenpairs of any three-round run of step 300.
    """
    out = tmp_path_factory.mktemp("adaptive")
    args = ["problem=mnist_mini", "preset=tiny", "HESSIAN_SPLITS=[train]", *TARGET]
    return last_line(run_hessov("run", *args, f"OUTPUT_DIR={out}").stdout)


def measured_parts(parts: Path) -> int:
    """Part files under ``parts`` whose first measurement is flagged measured (a part is
    written whole, then renamed, so its first flag stands for the part).
    """
    measured = 0
    for part in parts.glob("part_*.h5"):
        try:
            with h5py.File(part, "r") as handle:
                measured += int(handle["flags"][0] == 2)
        except OSError:  # renamed into place while we looked
            pass
    return measured


def kill_while_measuring(args: list[str], parts: Path, after: int, timeout: float = 120) -> int:
    """Start ``hessov ARGS`` (a measure command), ``kill -9`` it once ``after`` parts under
    ``parts`` are measured; returns how many were measured when it died.
    """
    process = subprocess.Popen(
        [sys.executable, "-m", "hessov.cli", *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.time() + timeout
    while time.time() < deadline and measured_parts(parts) < after:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return measured_parts(parts)


#: The step and split every sketch of :func:`tiny_trained` measures.
TINY_SKETCH = ["step=300", "split=train"]


def laid_out(trained: Path, target: Path, *layout: str) -> Path:
    """A copy of the run ``trained`` at ``target``, laid out with ``hessov layout ARGS``."""
    shutil.copytree(trained, target)
    run_hessov("layout", str(target), *layout)
    return target


def measured_and_solved(run: Path, two_pass: bool) -> Path:
    """Every task of ``TINY_SKETCH`` in this process's kernel path, then the solve (and the
    basis and second round for two-pass), one after another: the tests' reference.
    """
    run_hessov("measure", str(run), *TINY_SKETCH)
    if two_pass:
        run_hessov("basis", str(run), *TINY_SKETCH)
        run_hessov("measure", str(run), *TINY_SKETCH, "round=second")
    run_hessov("solve", str(run), *TINY_SKETCH)
    return run


@pytest.fixture(scope="session")
def tiny_trained(tmp_path_factory) -> Path:
    """A trained `preset=tiny` run (train split, step 300 to sketch) with no layout yet; tests
    lay it out on a copy.
    """
    out = tmp_path_factory.mktemp("tiny-trained")
    args = ["problem=mnist_mini", "preset=tiny", "HESSIAN_SPLITS=[train]", "HESSIAN_STEPS=[300]"]
    return Path(last_line(run_hessov("train", *args, f"OUTPUT_DIR={out}").stdout))


def execute_notebook(name: str, env: dict[str, str]) -> None:
    """Run ``analysis/notebooks/NAME`` top to bottom in a fresh kernel, with ``env`` set in
    this process's environment for the kernel to inherit (and removed afterwards).
    """
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(REPO / "analysis" / "notebooks" / name, as_version=4)
    os.environ.update(env)
    try:
        NotebookClient(
            notebook,
            timeout=300,
            kernel_name="python3",
            resources={"metadata": {"path": str(REPO / "analysis" / "notebooks")}},
        ).execute()
    finally:
        for key in env:
            del os.environ[key]
