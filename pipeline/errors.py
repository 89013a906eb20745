"""The one exception type that means "the user gave us something wrong".

The CLI prints a PipelineError as one line and exits non-zero; anything else
is a bug and keeps its traceback (under --debug) so it can be reported.
"""


class PipelineError(Exception):
    """A user-facing error: bad recipe, bad model, bad calibration data."""


def one_line(error: BaseException | str, limit: int = 300) -> str:
    """An exception's text (a library's, often several lines) as one line of at most `limit` characters."""
    text = " ".join(str(error).split())
    return text[:limit] + ("..." if len(text) > limit else "")


def few(items: list[str], limit: int = 6) -> str:
    """The first `limit` of `items`, comma-separated, and how many there are when that is not all of them."""
    return ", ".join(items[:limit]) + (f" ... ({len(items)} in all)" if len(items) > limit else "")
