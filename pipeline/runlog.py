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
    return logging.getLogger(LOGGER_NAME)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


class EventLog:
    """Append-only JSON-lines log of one run, written by one stage.

    The file is opened once, in append mode with line buffering: each event is one
    ``write`` of one complete line, so concurrent stages appending to the same log never
    interleave within a line, and a killed job leaves every finished line readable.
    """

    def __init__(self, path: Path, stage: str):
        self.path = Path(path)
        self.stage = stage
        self._handle = None

    def write(self, event: str, **fields: Any) -> None:
        if self._handle is None:
            self._handle = open(self.path, "a", buffering=1)
        record = {"time": round(time.time(), 3), "stage": self.stage, "event": event, **fields}
        self._handle.write(json.dumps(record, default=_jsonable) + "\n")

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


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
