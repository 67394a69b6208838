"""The one error type of the converters: a refusal with a message saying what to do."""


class ConversionError(RuntimeError):
    """A conversion was refused or failed; the message names the file/tensor and the fix."""
