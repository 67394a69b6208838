"""Request records (one JSON object each) -> prompts laid out exactly as in training.

The user messages come from the training templates (``formats.templates``) with the
assistant answer dropped; ``build_segments`` + ``layout`` lay them out, and one
``<|assistant|>`` row is appended. So a prompt's rows equal the first rows of the training
example that would answer it.

Request kinds (``task`` may be given explicitly; otherwise it is inferred):

=========================== =============================================== ============
task                        fields                                          answer
=========================== =============================================== ============
text_only                   ``prompt`` or ``messages``                      model picks
audio_to_conversation       ``audio`` (+ ``start_time``/``end_time``) and   model picks
                            ``prompt`` or ``messages`` (``<sound>`` marks
                            where the clip goes; default: before the text)
caption_to_audio            ``caption`` (+ ``instruction``)                 audio
transcription_to_speech     ``text`` (+ ``instruction``)                    speech
=========================== =============================================== ============

``messages`` is ``[{"role": "system"|"user"|"assistant", "content": "..."}]`` ending
with a user turn. ``"mode": "reasoning"`` (text or audio requests) answers UALM-Reason
style: the model hears every clip it generates and may critique and regenerate it (at
most ``max_rounds`` clips; ``engine`` module doc). ``modality`` ("auto", "text", "audio", "speech") overrides the answer
modality. Relative audio paths are resolved against ``base_dir`` (the manifest's folder).
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import numpy as np

from megatron_ualm.audio.frames import num_encoder_frames
from megatron_ualm.formats import templates as T
from megatron_ualm.formats import vocab as V
from megatron_ualm.formats.vocab import UnifiedVocab
from megatron_ualm.inference.engine import Prompt

REQUEST_TASKS = ("text_only", "audio_to_conversation", "caption_to_audio", "transcription_to_speech")
FORCED_MODALITY = {"caption_to_audio": "audio", "transcription_to_speech": "speech"}


class RequestError(ValueError):
    """A request that cannot be run; ``reason`` is a short code for the error record."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def infer_task(record: dict) -> str:
    task = record.get("task")
    if task is not None:
        if task not in REQUEST_TASKS:
            raise RequestError("bad_request", f"task {task!r} not in {REQUEST_TASKS}")
        return task
    if "caption" in record:
        return "caption_to_audio"
    if "audio" in record:
        return "audio_to_conversation"
    return "text_only"


def _turns(record: dict) -> list[tuple[str, str]]:
    """[(role, text)] of the request, ending with a user turn."""
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
            raise RequestError("bad_request", "messages must be a list of {role, content} objects")
        turns = [(str(m.get("role", "")), str(m.get("content", ""))) for m in msgs]
    else:
        turns = [("user", str(record.get("prompt", "")))]
    if not turns or turns[-1][0] != "user":
        raise RequestError("bad_request", "the conversation must end with a user turn")
    for role, _ in turns:
        if role not in T.ROLES:
            raise RequestError("bad_request", f"message role {role!r} not in {T.ROLES}")
    return turns


def build_prompt(record: dict, vocab: UnifiedVocab, tokenize: Callable[[str], list],
                 base_dir: str = ".", window_seconds: float = 30.0, seed: int = 0) -> Prompt:
    """One request record -> Prompt. Raises RequestError (missing/unreadable audio, empty
    prompt, malformed record)."""
    task = infer_task(record)
    K = vocab.num_codebooks
    clips: list[np.ndarray] = []
    if task in ("caption_to_audio", "transcription_to_speech"):
        key = "caption" if task == "caption_to_audio" else "text"
        text = str(record.get(key, "")).strip()
        if not text:
            raise RequestError("empty_prompt", f"{task} request has an empty {key!r}")
        template = T.caption_to_audio if task == "caption_to_audio" else T.transcription_to_speech
        kwargs = {"prompt": record["instruction"]} if "instruction" in record else {}
        messages = template(text, np.zeros((K, 1), dtype=np.int64), tokenize, **kwargs)[:-1]
    elif task == "audio_to_conversation":
        turns = _turns(record)
        path = str(record.get("audio", ""))
        if not path:
            raise RequestError("bad_request", "audio request without an 'audio' path")
        if not os.path.isabs(path):
            path = os.path.join(base_dir, path)
        from megatron_ualm.audio.io import AudioError, load_audio  # libsndfile only for audio requests
        try:
            clip = load_audio(path, record.get("start_time"), record.get("end_time"))
        except AudioError as e:
            raise RequestError(e.reason, str(e)) from None
        rows = num_encoder_frames(len(clip), window_seconds)
        if rows == 0:
            raise RequestError("audio_too_short", f"{path}: too short to give one encoder frame")
        clips.append(clip)
        ref = T.AudioRef(0, len(clip), rows)
        conversation = [("human" if r == "user" else r, text) for r, text in turns] + [("gpt", "")]
        modality = record.get("audio_modality", "audio")
        try:
            messages = T.audio_to_conversation(ref, conversation, tokenize, modality=modality)
        except ValueError as e:
            raise RequestError("bad_request", str(e)) from None
        messages = messages[:-1] if messages and messages[-1].role == "assistant" else messages
    else:
        turns = _turns(record)
        if not turns[-1][1].strip():
            raise RequestError("empty_prompt", "the last user turn is empty")
        messages = T.text_only(turns, "", tokenize)[:-1]
    if not any(len(m.content) if not isinstance(m.content, T.AudioRef) else 1 for m in messages):
        raise RequestError("empty_prompt", "the request has no content")

    example = T.layout(T.build_segments(messages, vocab), vocab)
    assistant = np.zeros((1, K), dtype=np.int64)
    assistant[0, 0] = V.ASSISTANT
    rows = np.concatenate([example.tokens, assistant])
    spans = [(s.row, s.num_rows) for s in example.audio_spans]
    modality = _modality(record, task)
    mode = record.get("mode", "default")
    if mode not in ("default", "reasoning"):
        raise RequestError("bad_request", f"mode {mode!r} not in default/reasoning")
    return Prompt(rows, spans, [clips[s.clip_index] for s in example.audio_spans], modality, seed,
                  reasoning=mode == "reasoning")


def _modality(record: dict, task: str) -> Optional[str]:
    value = record.get("modality", FORCED_MODALITY.get(task, "auto"))
    if value not in ("auto", "text", "audio", "speech"):
        raise RequestError("bad_request", f"modality {value!r} not in auto/text/audio/speech")
    return None if value == "auto" else value
