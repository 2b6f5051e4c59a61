"""User-facing errors: the CLI turns every `UserError` into a clear message and exit code 2."""


class UserError(Exception):
    """Bad input from the user (recipe, model, data, paths): reported without a traceback."""


class ConfigError(UserError, ValueError):
    """A recipe field holds a value outside its allowed set or range."""


class UnknownNameError(UserError, KeyError):
    """A name looked up in a registry (architecture, format, solver, preset, source) is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class DataError(UserError):
    """A calibration or evaluation source is missing or too short."""
