"""Exception types raised by stabiliscope.

`ConfigError` marks bad user input (an option, a file, a model mapping). The CLI
turns it into exit status 2 with a one-line message; library callers can catch
it as a `ValueError`.
"""


class StabiliscopeError(Exception):
    """Base class for errors raised by stabiliscope."""


class ConfigError(StabiliscopeError, ValueError):
    """An invalid option, file or argument supplied by the user."""


class DataError(ConfigError):
    """A data path that is missing, empty or too short for one training sequence."""


class DiscoveryError(ConfigError):
    """A model whose transformer blocks or parameter roles could not be mapped."""
