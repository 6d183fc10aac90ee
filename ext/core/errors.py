"""Errors that reach the user as one line."""


class ConfigError(ValueError):
    """A bad setting or input: the message names the key and how to fix it."""


class DataError(ValueError):
    """A bad data record or source, found while reading it."""


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` as one line.

    A DataLoader worker's exception is re-raised in the main process with the
    worker's traceback folded into the message; the original message is its
    last line.
    """
    text = str(exc).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1].strip()
        text = last.removeprefix(f"{type(exc).__module__}.{type(exc).__qualname__}: ")
    return " ".join(text.split())
