"""File writes, locks and configuration merges that every stage shares.

Stages talk only through files in the run directory, and several jobs may touch that
directory at once (Slurm array tasks, a resumed chain, a notebook reading results). Three
rules keep that safe, and this module is the one place that implements each:

- **Writes are atomic.** A file is written whole under a temporary name in its own
  directory (``.NAME.PID.tmp``) and renamed over ``NAME`` (:func:`atomic_write`). A rename
  within one file system is atomic, so a reader sees the old file or the new one, never
  half of one, and a job killed mid-write leaves at most a stray temporary file (removed
  when the write fails with an exception).
- **Shared files are locked.** :func:`exclusive_lock` takes an ``flock`` on a lock file.
  The kernel releases it when its holder dies, even by SIGKILL, so a crash never leaves a
  lock behind; the non-blocking form tells a worker that another live process is busy.
- **Configurations are merged with one error format.** :func:`merge_config` layers
  omegaconf configs over a structured schema and turns omegaconf's exceptions into
  :class:`~hessov.errors.ConfigError` as ``"KEY: what is wrong (in SOURCE)"``, the format
  of every configuration error hessov reports (:func:`config_error`).
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hessov.errors import ConfigError


@contextmanager
def atomic_write(path: Path) -> Iterator[Path]:
    """Write ``path`` atomically: yield a temporary path in the same directory, then rename.

    The parent directory is created. The caller writes the whole file to the yielded
    ``.NAME.PID.tmp`` path (with any library: h5py, torch.save, ...). On success it is
    ``os.replace``d onto ``path``; if the block raises, the temporary file is removed and
    ``path`` is left as it was.

    Args:
        path: The file to write.

    Yields:
        The temporary path to write to.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`atomic_write`).

    Args:
        path: The file to write.
        text: Its whole content.
    """
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: Path, payload: Any) -> None:
    """Write ``payload`` as JSON (indented by 2, keys sorted) to ``path`` atomically.

    Args:
        path: The file to write.
        payload: Anything ``json.dumps`` accepts.
    """
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True))


@contextmanager
def exclusive_lock(path: Path, blocking: bool = True) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on the lock file ``path`` for the ``with`` block.

    The lock file (and its parent directory) is created if missing and never removed. The
    kernel releases the lock when the holder's file is closed or the process dies.

    Args:
        path: The lock file.
        blocking: Wait for the lock (the default), or give up at once if another process
            holds it.

    Yields:
        True when the lock is held; False (only when ``blocking`` is False) when another
        process holds it, in which case the block runs without the lock.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def config_error(key: str, problem: str, source: str | None = None) -> ConfigError:
    """The :class:`ConfigError` for ``key``: ``"KEY: PROBLEM"``, plus ``" (in SOURCE)"``
    when the value's origin is known.

    Args:
        key: The offending key, dotted (``optimizer.lr``, ``replays[0].name``).
        problem: What is wrong with it.
        source: Where the value came from (a file, ``the command line``), if known.
    """
    return ConfigError(f"{key}: {problem}" + (f" (in {source})" if source else ""))


@contextmanager
def config_errors(source: str, key_prefix: str = "") -> Iterator[None]:
    """Turn omegaconf's exceptions raised in the block into :func:`config_error`.

    The key is ``key_prefix`` plus omegaconf's full key (``key_prefix`` without its trailing
    dot, or ``config``, when omegaconf names none); the problem is the first line of
    omegaconf's message (the rest repeats the key and the schema's type names).

    Args:
        source: Where the values being parsed or merged come from.
        key_prefix: Prepended to every key, e.g. ``replays[0].optimizer.``.

    Raises:
        ConfigError: instead of any ``OmegaConfBaseException``.
    """
    try:
        yield
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        key = f"{key_prefix}{key}" if key else (key_prefix.rstrip(".") or "config")
        message = str(getattr(err, "msg", None) or err).split("\n")[0]
        raise config_error(key, message, source) from None


def merge_config(
    schema: Any,
    *layers: Any,
    source: str | Sequence[str],
    key_prefix: str = "",
    adjust: Callable[[DictConfig], None] | None = None,
) -> Any:
    """Merge ``layers`` over ``schema`` (later layers win) and return the typed object.

    The layers are merged one at a time, so that an error names the layer it came from.

    Args:
        schema: A structured-config dataclass, an instance of one, or a ``DictConfig``.
        *layers: ``DictConfig`` or plain ``dict`` layers, applied in order.
        source: Where the layers come from, for error messages: one description for all,
            or one per layer (e.g. ``config/problems/mnist_mini.yaml``, ``the command line``).
        key_prefix: Prepended to the key of an error (see :func:`config_errors`).
        adjust: Called on the merged ``DictConfig`` before conversion (it may edit it).

    Returns:
        ``OmegaConf.to_object`` of the merge: an instance of the schema's dataclass.

    Raises:
        ConfigError: ``"KEY: what is wrong (in SOURCE)"`` for an unknown key, a value of the
            wrong type or a missing mandatory value.
    """
    sources = [source] * len(layers) if isinstance(source, str) else list(source)
    if len(sources) != len(layers):
        raise ValueError(f"{len(layers)} layers but {len(sources)} sources")
    everywhere = ", ".join(dict.fromkeys(sources)) or "the defaults"
    with config_errors(everywhere, key_prefix):
        merged = schema if isinstance(schema, DictConfig) else OmegaConf.structured(schema)
    for layer, origin in zip(layers, sources, strict=True):
        with config_errors(origin, key_prefix):
            merged = OmegaConf.merge(merged, layer)
    with config_errors(everywhere, key_prefix):
        if adjust is not None:
            adjust(merged)
        return OmegaConf.to_object(merged)
