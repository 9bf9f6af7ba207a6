"""Logging for every stage: coloured terminal output and a JSON-lines event log per run.

The terminal gets human-readable lines through coloredlogs. The run's ``log.jsonl``
gets one JSON object per event (``{"time", "stage", "event", ...fields}``): the config,
globals such as ``num_params``, parameter names/shapes/offsets, Hessian subset indices,
record steps, training batches and evaluation rounds. Appending one line per event keeps
the file readable while a job is still running and safe to share between stages.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import coloredlogs

LOGGER_NAME = "hessov"


def setup_terminal_logging(level: str = "INFO") -> logging.Logger:
    """Coloured terminal logging on stderr (stdout is kept for results like run paths)."""
    logger = logging.getLogger(LOGGER_NAME)
    coloredlogs.install(
        level=level,
        logger=logger,
        fmt="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=None,
    )
    logger.propagate = False
    return logger


def get_logger() -> logging.Logger:
    """The pipeline's logger, as :func:`setup_terminal_logging` configured it."""
    return logging.getLogger(LOGGER_NAME)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


class EventLog:
    """Append-only JSON-lines log of one run, written by one stage.

    The file is opened at the first event, in append mode with line buffering: each event
    is one ``write`` of one complete line, so concurrent stages appending to the same log
    never interleave within a line, and a killed job leaves every finished line readable.
    Use it as a context manager, which closes the file however the stage ends::

        with EventLog(run.log, "measure") as events:
            events.write("start", step=step)

    For a single event, :func:`log_event` opens, writes and closes in one call.
    """

    def __init__(self, path: Path, stage: str):
        self.path = Path(path)
        self.stage = stage
        self._handle = None

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def write(self, event: str, **fields: Any) -> None:
        """Append one event ``{"time", "stage", "event", **fields}`` as one line."""
        if self._handle is None:
            self._handle = open(self.path, "a", buffering=1)
        record = {"time": round(time.time(), 3), "stage": self.stage, "event": event, **fields}
        self._handle.write(json.dumps(record, default=_jsonable) + "\n")

    def close(self) -> None:
        """Close the file (a later :meth:`write` opens it again)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def log_event(path: Path, stage: str, event: str, **fields: Any) -> None:
    """Append one event to the log at ``path`` and close it (see :class:`EventLog`)."""
    with EventLog(path, stage) as events:
        events.write(event, **fields)


def read_events(path: Path, event: str | None = None) -> list[dict]:
    """All records of a run's log, optionally only those of one event type."""
    records = []
    with open(path) as handle:
        for line in handle:
            if line.strip():
                record = json.loads(line)
                if event is None or record["event"] == event:
                    records.append(record)
    return records
