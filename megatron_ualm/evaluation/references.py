"""Evaluation examples -> generation prompts and the references to score the answers with.

A stored example's segments are cut before its last assistant message: the context (every
segment up to and including that message's ``<|assistant|>`` row) is the prompt, laid out by
``formats.templates.layout`` exactly as in training, so it equals the rows a request built
by ``inference.prompts`` would hold; the assistant message is the reference. The answer
modality is forced to the reference's (its first token: ``<|text|>``, ``<|audio|>`` or
``<|speech|>``), so greedy decoding answers in the form that is scored.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence


from megatron_ualm.formats import templates as T
from megatron_ualm.formats import vocab as V
from megatron_ualm.formats.vocab import UnifiedVocab
from megatron_ualm.inference.engine import Prompt

MODALITY_OF = {V.TEXT: "text", V.AUDIO: "audio", V.SPEECH: "speech"}


@dataclass
class Reference:
    """One example to answer: its prompt and what the answer is compared with.

    text: the reference answer's text (text answers), else None.
    caption: the user's text without the task instruction (audio answers; CLAP's text side).
    """
    document: int
    prompt: Prompt
    modality: str
    text: Optional[str] = None
    caption: Optional[str] = None


def split_last_answer(segments: Sequence[T.Segment]) -> Optional[int]:
    """Index of the first segment of the last assistant message, or None when the example
    has no assistant target or its context does not end with ``<|assistant|>``."""
    i = len(segments)
    while i > 0 and segments[i - 1].mode in T.TARGET_MODES:
        i -= 1
    if i == len(segments) or i == 0:
        return None
    last = segments[i - 1]
    if last.mode not in (T.MODE_TEXT, T.MODE_TEXT_TARGET) or not len(last.data) or last.data[-1] != V.ASSISTANT:
        return None
    return i


def text_ids(segments: Sequence[T.Segment], vocab: UnifiedVocab) -> list[int]:
    """Tokenizer ids of the text rows of ``segments`` (special tokens and audio left out)."""
    out = []
    for seg in segments:
        if seg.mode in (T.MODE_TEXT, T.MODE_TEXT_TARGET):
            out += [vocab.unified_to_text(int(t)) for t in seg.data if vocab.kind_of(int(t)) == "text"]
    return out


def strip_instruction(text: str, task: str) -> str:
    """The caption of a ``caption_to_audio`` user turn: the template's instruction line removed."""
    prompt = T.DEFAULT_PROMPTS.get(task)
    if prompt and text.startswith(prompt):
        return text[len(prompt):].strip()
    return text.strip()


def build_reference(source, document: int, task: str, vocab: UnifiedVocab,
                    decode: Callable[[list], str]) -> Optional[Reference]:
    """The prompt and reference of ``source``'s example ``document`` (None: no assistant target)."""
    segments = source.segments(document)
    cut = split_last_answer(segments)
    if cut is None:
        return None
    context, answer = segments[:cut], segments[cut:]
    first = answer[0]
    modality = MODALITY_OF.get(int(first.data[0])) if first.mode == T.MODE_TEXT_TARGET and len(first.data) else None
    if modality is None:
        return None
    example = T.layout(context, vocab)
    prompt = Prompt(example.tokens, [(s.row, s.num_rows) for s in example.audio_spans],
                    [source.clip(s.clip_index) for s in example.audio_spans], modality, seed=document)
    if modality == "text":
        return Reference(document, prompt, modality, text=decode(text_ids(answer, vocab)))
    return Reference(document, prompt, modality, caption=strip_instruction(decode(text_ids(context, vocab)), task))
