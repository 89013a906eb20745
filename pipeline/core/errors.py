"""The exceptions that mean "the user, or the machine, gave us something wrong", and their one-line messages.

The CLI prints every user-facing exception as one line and exits 2: a PipelineError (a bad recipe, model or
input), an OSError (a full disk, a folder that cannot be written: `user_message` names the file and, through
`during`, the step), a MemoryError. Anything else is a bug and keeps its traceback (under --debug) so it can
be reported; tests/test_error_contract.py holds the code to that.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator


class PipelineError(Exception):
    """A user-facing error: bad recipe, bad model, bad calibration data."""


# What the environment, not our code, gets wrong. Each is turned into one line by `user_message`.
USER_FACING = (PipelineError, OSError, MemoryError)


def one_line(error: BaseException | str, limit: int = 300) -> str:
    """An exception's text (a library's, often several lines) as one line of at most `limit` characters."""
    text = " ".join(str(error).split())
    return text[:limit] + ("..." if len(text) > limit else "")


def few(items: list[str], limit: int = 6, sep: str = ", ") -> str:
    """The first `limit` of `items`, joined by `sep`, and how many there are when that is not all of them: the one
    way a message cuts a list."""
    return sep.join(items[:limit]) + (f" ... ({len(items)} in all)" if len(items) > limit else "")


@contextlib.contextmanager
def during(what: str) -> Iterator[None]:
    """Name the work an OSError or MemoryError happened in (`step 02 quantize`); the innermost name wins."""
    try:
        yield
    except (OSError, MemoryError) as e:
        if getattr(e, "during", None) is None:
            e.during = what  # type: ignore[union-attr]
        raise


def user_message(error: BaseException) -> str | None:
    """The one line a user sees for a user-facing exception; None for a bug."""
    if isinstance(error, PipelineError):
        return one_line(error, 2000)
    where = getattr(error, "during", None)
    prefix = f"{where}: " if where else ""
    if isinstance(error, OSError):
        files = " -> ".join(str(f) for f in (error.filename, error.filename2) if f is not None)
        reason = error.strerror or one_line(error) or type(error).__name__
        return one_line(f"{prefix}{files + ': ' if files else ''}{reason}", 2000)
    if isinstance(error, MemoryError):
        return f"{prefix}out of memory" + (f" ({one_line(error)})" if str(error) else "")
    return None
