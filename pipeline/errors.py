"""Errors a user can act on. The CLI prints them as one line and exits with status 2.

Every message names the offending config key or file, and what to do about it.
"""


class HessovError(Exception):
    """Base class: bad input detected before (or instead of) doing any work."""


class ConfigError(HessovError, ValueError):
    """A configuration value is unknown, mistyped or impossible; the message names the key."""


class RunExistsError(HessovError):
    """The run directory already holds results that this call would overwrite."""


class DatasetNotFoundError(HessovError, FileNotFoundError):
    """A dataset's files are not where they were looked for."""


class MissingInputError(HessovError, FileNotFoundError):
    """A file another stage should have produced is missing or incomplete."""


class UnsafeFileError(HessovError):
    """A file holds pickled objects that are not plain data; it is refused, never executed."""
