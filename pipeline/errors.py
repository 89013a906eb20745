"""The one exception type that means "the user gave us something wrong".

The CLI prints a PipelineError as one line and exits non-zero; anything else
is a bug and keeps its traceback (under --debug) so it can be reported.
"""


class PipelineError(Exception):
    """A user-facing error: bad recipe, bad model, bad calibration data."""
