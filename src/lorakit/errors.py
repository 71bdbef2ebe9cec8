"""The one exception lorakit raises for bad input: it names the file, module or key and says what to do."""


class LoraError(ValueError):
    """A lorakit operation was refused; the model is left as it was."""
