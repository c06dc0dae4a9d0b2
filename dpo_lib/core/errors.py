"""Errors a user can fix: a class of their own, so that a command-line tool prints them as one
line (:mod:`dpo_lib.core.cli`) and any other exception, a bug, keeps its traceback.

Each also derives from the built-in exception it refines (``ConfigError`` is a ``ValueError``,
``MissingFileError`` a ``FileNotFoundError``, ...), so that code catching those still works.
"""
from __future__ import annotations


class UserError(Exception):
    """A mistake in what the user asked for (a config value, a path, a data file, a machine
    without what the config needs), with a message that says how to fix it."""


class ConfigError(UserError, ValueError):
    """A config file, profile, key or value that is not allowed."""


class UnknownKeyError(ConfigError, KeyError):
    """A config key the schema does not have."""

    def __str__(self):  # KeyError's own str() quotes its message
        return str(self.args[0]) if self.args else ""


class DataError(UserError, ValueError):
    """A data source that gives no usable pairs, or is read in a way it does not allow."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named (a run, an adapter, a model, a data file) is not there."""


class RunFolderError(UserError, FileExistsError):
    """A run's ``output_dir`` holds another run's files."""


class MissingPackageError(UserError, ModuleNotFoundError):
    """A package the chosen settings need is not installed."""


class DeviceError(UserError, RuntimeError):
    """The config needs hardware (a CUDA GPU) or software this machine does not have."""
