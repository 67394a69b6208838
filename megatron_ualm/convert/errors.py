"""The one error type of the converters: a refusal with a message saying what to do."""
from megatron_ualm.errors import UserError


class ConversionError(UserError, RuntimeError):
    """A conversion was refused or failed; the message names the file/tensor and the fix."""
