"""Errors a user can cause: they are reported as one line and a non-zero exit code."""


class UserError(Exception):
    """A problem with the user's input (config, file, argument); printed as one line by the CLI."""

    exit_code = 1


class ConfigError(UserError):
    """An unknown config key, a wrong type or an out-of-range value."""

    exit_code = 2


class CheckpointError(UserError):
    """A model or checkpoint folder that is missing, incomplete or corrupt."""

    exit_code = 1
