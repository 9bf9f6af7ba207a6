"""Shared fixtures: running the real ``hessov`` command in a subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_hessov(*args: str, check: bool = True, env: dict | None = None, timeout: float = 600):
    """Run ``hessov ARGS`` as a user would; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
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
    """One finished `hessov run problem=mnist_mini preset=tiny` (local backend), shared by
    every test that only reads it; tests that change a run work on a copy."""
    out = tmp_path_factory.mktemp("tiny-runs")
    return last_line(
        run_hessov("run", "problem=mnist_mini", "preset=tiny", f"OUTPUT_DIR={out}").stdout
    )
