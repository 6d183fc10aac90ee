"""Errors that reach the user as one line."""


class ConfigError(ValueError):
    """A bad setting or input: the message names the key and how to fix it."""


class DataError(ValueError):
    """A bad data record or source, found while reading it."""
