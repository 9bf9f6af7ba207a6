"""Problem plug-ins: a user's own model and data, ``problem=FILE.py:FACTORY`` or
``problem=PACKAGE.MODULE:FACTORY`` (README.md, "Your own model").

The contract is ``FACTORY(seed: int) -> hessov.Problem``. A plug-in is handled at two moments:

- **When a run is configured** (:func:`resolve`, from :func:`hessov.config.load_run_config`):
  the location is checked and made canonical (a file's path absolute, from the current
  directory), and the source file (the file itself, or the module's ``__file__``) is hashed.
  The run's ``config.yaml`` records ``problem`` (the canonical location), ``problem_file``
  and ``problem_sha256``.
- **Whenever the problem is built** (:func:`load_factory` and :func:`checked_problem`, from
  :func:`hessov.problems.build_problem`, which every stage and worker calls): the source
  file is hashed again and refused if it changed, imported, the factory's signature checked
  before it is called with the seed, and what it returns validated.

Every refusal is a :class:`~hessov.errors.ConfigError` ``"problem: ..."`` naming the file or
module and what is wrong, so the command exits 2 before any work starts.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from hessov.errors import ConfigError
from hessov.fileio import config_error

#: Separates the file or module from the factory's name.
SEPARATOR = ":"
CONTRACT = "FACTORY(seed: int) -> hessov.Problem"
_NAME = re.compile(r"^[A-Za-z_]\w*$")
_MODULE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
#: File plug-ins imported in this process: (path, sha256) -> module.
_IMPORTED: dict[tuple[str, str], ModuleType] = {}


@dataclass(frozen=True)
class Location:
    """Where a plug-in's factory lives.

    Attributes:
        kind: ``"file"`` or ``"module"``.
        target: the file's absolute path, or the dotted module name.
        factory: the factory's name in that file or module.
    """

    kind: str
    target: str
    factory: str

    @property
    def problem(self) -> str:
        """The canonical ``problem`` value: ``TARGET:FACTORY``."""
        return f"{self.target}{SEPARATOR}{self.factory}"

    @property
    def what(self) -> str:
        """The file or module, for messages."""
        return self.target if self.kind == "file" else f"module {self.target}"


def _refuse(message: str, source: str | None = None) -> ConfigError:
    return config_error("problem", message, source)


def parse(problem: str, source: str | None = None) -> Location:
    """The :class:`Location` of ``problem``; a file's path is made absolute (from the
    current directory).

    Args:
        problem: ``path/to/file.py:FACTORY`` or ``package.module:FACTORY``.
        source: where the value came from, for error messages.

    Raises:
        ConfigError: the value is neither form.
    """
    target, sep, factory = problem.rpartition(SEPARATOR)
    if not sep:
        raise _refuse(f"{problem!r} names no factory; write {problem}:FACTORY", source)
    if not _NAME.match(factory):
        raise _refuse(f"{factory!r} after ':' in {problem!r} is not a Python name", source)
    if target.endswith(".py") or "/" in target:
        return Location("file", str(Path(target).expanduser().resolve()), factory)
    if _MODULE.match(target):
        return Location("module", target, factory)
    raise _refuse(
        f"{problem!r} is neither path/to/file.py:FACTORY nor package.module:FACTORY", source
    )


def source_file(location: Location, source: str | None = None) -> Path:
    """The file whose hash a run records: the plug-in file, or the module's ``__file__``.

    Raises:
        ConfigError: a missing file, or a module that cannot be found.
    """
    if location.kind == "file":
        path = Path(location.target)
        if not path.is_file():
            raise _refuse(f"no file {path}", source)
        return path
    try:
        spec = importlib.util.find_spec(location.target)
    except Exception as err:  # noqa: BLE001 (a parent package's own import failure)
        message = f"cannot import {location.what}: {type(err).__name__}: {err}"
        raise _refuse(message, source) from err
    if spec is None:
        raise _refuse(f"no {location.what} (is its package on PYTHONPATH, or installed?)", source)
    if not spec.origin or not Path(spec.origin).is_file():
        raise _refuse(f"{location.what} has no source file to record", source)
    return Path(spec.origin).resolve()


def sha256(path: Path) -> str:
    """The hex sha256 of the file at ``path``."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def resolve(problem: str, source: str | None = None) -> tuple[str, str, str]:
    """What a run records of a plug-in when it is configured.

    Args:
        problem: the ``problem`` value as given.
        source: where it came from, for error messages.

    Returns:
        ``(problem, problem_file, problem_sha256)``: the canonical location (a file's path
        absolute), the absolute path of its source file, and that file's sha256.
    """
    location = parse(problem, source)
    path = source_file(location, source)
    return location.problem, str(path), sha256(path)


def check_unchanged(location: Location, recorded_file: str, recorded_sha256: str) -> str:
    """Refuse a plug-in whose source file changed since the run was configured.

    Args:
        location: the run's plug-in.
        recorded_file: ``problem_file`` of the run's config ("" = not recorded).
        recorded_sha256: ``problem_sha256`` of the run's config ("" = not recorded).

    Returns:
        The source file's sha256 now.
    """
    path = source_file(location)
    now = sha256(path)
    if recorded_sha256 and now != recorded_sha256:
        moved = f" (recorded as {recorded_file})" if recorded_file not in ("", str(path)) else ""
        raise _refuse(
            f"{path}{moved} changed since the run was configured: sha256 {recorded_sha256} "
            f"then, {now} now; restore it or start a new run"
        )
    return now


def _import(location: Location, digest: str) -> ModuleType:
    """Import the plug-in's file or module (once per file content in this process)."""
    try:
        if location.kind == "module":
            return importlib.import_module(location.target)
        key = (location.target, digest)
        if key not in _IMPORTED:
            path = Path(location.target)
            tag = hashlib.sha1(location.target.encode()).hexdigest()[:10]  # noqa: S324 (a name)
            name = f"hessov_plugin_{re.sub(r'[^0-9A-Za-z_]', '_', path.stem)}_{tag}"
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # dataclasses and pickle look classes up by module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[name]
                raise
            _IMPORTED[key] = module
        return _IMPORTED[key]
    except Exception as err:  # noqa: BLE001 (the user's code: any failure is reported)
        raise _refuse(f"cannot import {location.what}: {type(err).__name__}: {err}") from err


def load_factory(problem: str, recorded_file: str = "", recorded_sha256: str = "") -> Callable:
    """The factory of plug-in ``problem``, its file unchanged, importable, and callable as
    ``FACTORY(seed)``.

    Args:
        problem: the run's ``problem``.
        recorded_file: the run's ``problem_file``.
        recorded_sha256: the run's ``problem_sha256`` ("" = no check).

    Raises:
        ConfigError: a changed or missing file, an import failure, a missing factory, or a
            factory that cannot be called with the seed alone.
    """
    location = parse(problem)
    module = _import(location, check_unchanged(location, recorded_file, recorded_sha256))
    factory = getattr(module, location.factory, None)
    if factory is None:
        defined = sorted(
            name
            for name, value in vars(module).items()
            if inspect.isfunction(value) and value.__module__ == module.__name__
        )
        raise _refuse(
            f"{location.what} defines no {location.factory!r}"
            + (f"; its functions: {', '.join(defined)}" if defined else "")
        )
    if not callable(factory):
        raise _refuse(f"{location.problem} is a {type(factory).__name__}, not a function")
    check_signature(factory, location.problem)
    return factory


def check_signature(factory: Callable, where: str) -> None:
    """Refuse a factory that cannot be called as ``factory(seed)`` (one positional argument).

    Args:
        factory: the plug-in's factory.
        where: its location, for the message.
    """
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # not introspectable (a builtin): the call will tell
        return
    try:
        signature.bind(0)
    except TypeError as err:
        raise _refuse(
            f"{where} must take exactly one positional argument, the seed ({CONTRACT}); "
            f"its signature is {signature}: {err}"
        ) from None


def call_factory(factory: Callable, seed: int, problem: str) -> object:
    """``factory(seed)``; whatever it raises becomes a :class:`ConfigError` naming the
    plug-in (a refusal of ``hessov.Problem`` itself, e.g. NaN data, keeps its words).
    """
    try:
        return factory(seed)
    except ConfigError as err:
        raise _refuse(f"{problem}: {str(err).removeprefix('problem: ')}") from None
    except Exception as err:  # noqa: BLE001 (any error of the user's code, reported as such)
        raise _refuse(f"{problem} raised {type(err).__name__}: {err}") from None


def checked_problem(result: object, problem: str) -> object:
    """Validate what the factory of ``problem`` returned and name it after the plug-in.

    Args:
        result: the factory's return value.
        problem: the run's ``problem`` (the factory's location).

    Returns:
        ``result``, a :class:`hessov.Problem` whose ``name`` is ``problem``.

    Raises:
        ConfigError: not a Problem, a model that is not an ``nn.Module`` (or has no
            parameters), a loss that is not callable, or a negative ``num_classes``.
    """
    from torch import nn

    from hessov.problems import Problem

    if not isinstance(result, Problem):
        raise _refuse(
            f"{problem} returned a {type(result).__name__}, not a hessov.Problem "
            "(hessov.Problem(model=..., loss=..., train=(inputs, targets), "
            "test=(inputs, targets), num_classes=...))"
        )
    if not isinstance(result.model, nn.Module):
        kind = type(result.model).__name__
        raise _refuse(f"{problem} returned a Problem whose model is a {kind}, not an nn.Module")
    if not any(True for _ in result.model.parameters()):
        raise _refuse(f"{problem} returned a Problem whose model has no parameters")
    if not callable(result.loss):
        kind = type(result.loss).__name__
        raise _refuse(f"{problem} returned a Problem whose loss (a {kind}) is not callable")
    if not isinstance(result.num_classes, int) or result.num_classes < 0:
        raise _refuse(
            f"{problem} returned num_classes={result.num_classes!r}; give the number of "
            "classes, or 0 for unlabelled data"
        )
    result.name = problem
    result.data_note = result.data_note or f"the data of {problem}"
    return result
