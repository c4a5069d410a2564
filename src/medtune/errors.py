"""Errors a user can act on. The CLI prints their message and exits with code 2, no traceback."""


class MedtuneError(Exception):
    """Base for errors caused by input the user controls (config, files, model directories)."""


class ConfigError(MedtuneError):
    """The run config is invalid: the message names the key path and what to do."""


class DataError(MedtuneError):
    """An input data file cannot be read at all (missing, empty, wrong format)."""


class ModelError(MedtuneError):
    """A model directory is missing, corrupt, unsupported or unsafe to load."""


class RunDirError(MedtuneError):
    """A stage's input directory is missing or was produced by an incompatible run."""
