"""The one exception lorakit raises for bad input: it names the file, module or key and says what to do.
Warnings go through warn(), which points them at the user's line, not at lorakit's internals; the notices other
libraries print about lorakit's own use of them (nothing the user did) are dropped by silence_known_notices()."""

import logging
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


# (logger, a piece of the one message dropped from it): what importing diffusers/transformers the way lorakit does
# prints on a machine without torchvision, or with a torchao that diffusers' loader does not know
NOTICES = (("transformers.utils.import_utils", "requires torchvision (not installed); falling back to"),
           ("diffusers.quantizers.torchao.torchao_quantizer", "Unable to import `torchao` Tensor objects"))
# torchao's CUDA kernels a CPU-only torch cannot load, and torch's Enum notice as torchao registers its types
QUIET_LOGGERS = ("torchao", "torch.utils._pytree")


class _Drop(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def silence_known_notices():
    """Drop exactly the NOTICES messages (every other record of those loggers stays) and quiet torchao's logs below
    errors; once torchao is installed, transformers imports it with every model. For lorakit's commands and loaders."""
    for name, text in NOTICES:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) and f.text == text for f in logger.filters):
            logger.addFilter(_Drop(text))
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
