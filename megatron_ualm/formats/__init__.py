"""Pure definitions of the UALM sequence format, shared by the data tools, the model,
the converters and inference. Nothing here imports torch.distributed or other parts of
megatron_ualm: this package is the contract every layer agrees on."""
from megatron_ualm.formats.vocab import SPECIAL_TOKENS, UnifiedVocab
from megatron_ualm.formats.delay import apply_delay, undo_delay

__all__ = ["SPECIAL_TOKENS", "UnifiedVocab", "apply_delay", "undo_delay"]
from megatron_ualm.formats.templates import (  # noqa: E402
    AudioRef, AudioSpan, Example, Message, Segment, TASKS, GENERATION_TASKS,
    build_segments, cfg_dropout, dump, layout,
)
__all__ += ["AudioRef", "AudioSpan", "Example", "Message", "Segment", "TASKS", "GENERATION_TASKS",
            "build_segments", "cfg_dropout", "dump", "layout"]
