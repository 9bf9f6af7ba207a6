"""A real single-node Slurm cluster for tests: the ``slurm_cluster`` fixture and job helpers.

Use it from a test module (tests/ is on ``sys.path``)::

    import pytest
    from slurm_cluster import sbatch, wait_for_jobs
    from slurm_cluster import slurm_cluster  # noqa: F401

    pytestmark = pytest.mark.slurm  # every test here needs the cluster

    def test_something(slurm_cluster):
        job = sbatch(slurm_cluster, "--wrap", "true")
        assert wait_for_jobs(slurm_cluster, job)[job] == ("COMPLETED", "0:0")

(ruff reports each test's ``slurm_cluster`` parameter as F811, redefining the import; see
``# ruff: noqa: F811`` in tests/test_slurm_cluster.py.)

``slurm_cluster`` is session-scoped. It runs ``slurm/local-cluster.sh status`` and, if no
cluster answers, ``start`` (which installs the Debian packages on first use), and at the end
of the session stops a cluster that the tests started (never one started by hand, and never
while another test session is still using it). It yields the environment for
subprocesses (``os.environ`` plus ``SLURM_CONF``) and also sets ``SLURM_CONF`` in
``os.environ`` for the session, so in-process clients such as submitit find the cluster.

Without root, apt-get or dpkg the tests are skipped with a message saying how to enable them;
with ``CI=true`` they fail instead, so a CI job cannot pass by silently skipping them.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hessov.launch.slurm_client import TERMINAL_STATES  # the states the pipeline waits on too

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "slurm" / "local-cluster.sh"

# First use installs packages with apt (tens of seconds); a start with packages present
# takes a few seconds. The script bounds each of its own waits; these only cap the process.
START_TIMEOUT_S = 1200
STOP_TIMEOUT_S = 300
STATUS_TIMEOUT_S = 120


HOW_TO_ENABLE = (
    "To run the Slurm tests, run pytest as root on Debian (bookworm) with apt-get: the "
    "slurm_cluster fixture then installs slurmctld, slurmd, slurm-client, munge, slurmdbd and "
    "mariadb-server if missing and starts a local cluster with slurm/local-cluster.sh "
    "(or start it yourself: sudo bash slurm/local-cluster.sh start)."
)


def _unavailable_reason() -> str | None:
    """Why this machine cannot start the cluster, or None if it can."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "not running as root"
    missing = [tool for tool in ("bash", "apt-get", "dpkg") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not found (not a Debian system?)"
    return None


def _run_script(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ.copy(),
    )


def _slurm_conf_from(stdout: str) -> str:
    """The script's last stdout line is ``export SLURM_CONF=...``."""
    lines = stdout.strip().splitlines()
    prefix = "export SLURM_CONF="
    if not lines or not lines[-1].startswith(prefix):
        raise RuntimeError(f"no '{prefix}...' line in the output of {SCRIPT}:\n{stdout}")
    return lines[-1][len(prefix) :]


def _base() -> Path:
    return Path(os.environ.get("HESSOV_SLURM_BASE", "/tmp/hessov-slurm"))


def _lock(fd: int, mode: int, timeout: float) -> bool:
    """Take an flock lock, with a deadline (fcntl.flock itself would wait forever)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[dict[str, str]]:
    """A running local Slurm cluster; yields the environment for Slurm commands.

    Several test sessions may share the machine's cluster (e.g. two people running the suite
    in one checkout). Each holds a shared lock on ``$HESSOV_SLURM_BASE/users.lock`` while it
    uses the cluster; ``local-cluster.sh stop`` refuses to stop while any is held. At the end,
    a session stops the cluster only if a test session started it (the ``started-by-tests``
    marker; one started by hand is left alone) and no other session is still using it.
    """
    reason = _unavailable_reason()
    if reason is not None:
        message = f"Slurm cluster unavailable: {reason}. {HOW_TO_ENABLE}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message} (CI=true: the Slurm tests must run in CI)", pytrace=False)
        pytest.skip(message)

    base = _base()
    base.mkdir(parents=True, exist_ok=True)
    marker = base / "started-by-tests"
    fd = os.open(base / "users.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        # Waits while a stop is under way (it holds the lock exclusively).
        if not _lock(fd, fcntl.LOCK_SH, STOP_TIMEOUT_S):
            pytest.fail(f"{base / 'users.lock'} stayed locked for {STOP_TIMEOUT_S} s")
        status = _run_script(["status"], STATUS_TIMEOUT_S)
        if status.returncode == 0:
            conf = _slurm_conf_from(status.stdout)
        else:
            try:
                result = _run_script(["start"], START_TIMEOUT_S)
            except subprocess.TimeoutExpired as exc:
                pytest.fail(f"{SCRIPT} start did not finish in {START_TIMEOUT_S} s: {exc}")
            if result.returncode != 0:
                # The machine qualifies, so a failed start is an error, never a skip.
                pytest.fail(
                    f"{SCRIPT} start exited {result.returncode}\n"
                    f"{result.stderr[-6000:]}\n{result.stdout[-2000:]}",
                    pytrace=False,
                )
            marker.touch()
            conf = _slurm_conf_from(result.stdout)

        env = {**os.environ, "SLURM_CONF": conf}
        patch = pytest.MonkeyPatch()
        patch.setenv("SLURM_CONF", conf)
        try:
            yield env
        finally:
            patch.undo()
            # Exclusive only if no other session holds the lock; then stopping is safe.
            if marker.exists() and _lock(fd, fcntl.LOCK_EX, 0):
                stop = _run_script(["stop", "--force"], STOP_TIMEOUT_S)
                if stop.returncode != 0:
                    raise RuntimeError(f"{SCRIPT} stop exited {stop.returncode}\n{stop.stderr}")
    finally:
        os.close(fd)  # releases the lock


# ---------------------------------------------------------------------------------------------
# Helpers for tests that submit jobs


def slurm(env: dict[str, str], *args: str, timeout: float = 30) -> str:
    """Run a Slurm command (``sbatch``, ``sacct``, ...) and return its stdout."""
    result = subprocess.run(
        list(args), env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {result.returncode}: {result.stderr}")
    return result.stdout


def sbatch(env: dict[str, str], *args: str) -> str:
    """Submit a batch job (``sbatch --parsable ARGS``) and return its job id."""
    return slurm(env, "sbatch", "--parsable", *args).strip().split(";")[0]


def sacct_jobs(env: dict[str, str], job_id: str) -> dict[str, tuple[str, str]]:
    """``{job id: (state, exit code)}`` from sacct, array tasks as ``ID_TASK``.

    States like ``CANCELLED by 0`` are cut to their first word.
    """
    out = slurm(env, "sacct", "-j", job_id, "-X", "-n", "-P", "-o", "JobID,State,ExitCode")
    rows = {}
    for line in out.splitlines():
        if line.strip():
            jid, state, exit_code = line.split("|")
            rows[jid] = (state.split()[0] if state.strip() else "", exit_code)
    return rows


def wait_for_jobs(
    env: dict[str, str], job_id: str, count: int = 1, timeout: float = 60
) -> dict[str, tuple[str, str]]:
    """Poll sacct until ``count`` records of ``job_id`` (array tasks count one each) are in a
    terminal state; fail with the queue's state after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        rows = sacct_jobs(env, job_id)
        # An array whose tasks have not all started shows as ID_[a-b]: not expanded yet.
        expanded = all("[" not in jid for jid in rows)
        if len(rows) >= count and expanded and all(s in TERMINAL_STATES for s, _ in rows.values()):
            return rows
        if time.monotonic() > deadline:
            queue = subprocess.run(
                ["squeue", "-o", "%i %T %r"], env=env, capture_output=True, text=True, timeout=30
            ).stdout
            raise AssertionError(
                f"job {job_id} not finished after {timeout} s: sacct {rows}\nsqueue:\n{queue}"
            )
        time.sleep(0.3)
