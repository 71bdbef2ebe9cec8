"""The one exception lorakit raises for bad input: it names the file, module or key and says what to do.
Warnings go through warn(), which points them at the user's line, not at lorakit's internals."""

import os
import sys
import warnings


class LoraError(ValueError):
    """A lorakit operation was refused; the model is left as it was."""


def warn(message: str):
    """warnings.warn, attributed to the first caller outside lorakit (lorakit.load, .read and the CLI
    reach the same warning through different depths of calls)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep  # the lorakit package
    level, frame = 1, sys._getframe(0)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(here):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)
