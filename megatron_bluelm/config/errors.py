"""The one error type every config / input check raises, so users see a single clear failure class."""


class ConfigError(ValueError):
    """A setting, file or input is invalid. The message names the field, file or line at fault."""
