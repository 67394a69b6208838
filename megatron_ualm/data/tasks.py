"""Raw records -> stored documents for every task of SPEC section 4 (one chunk at a time).

The task of a dataset is chosen by the user, not by the manifest kind, so any audio record
feeds any audio task: an ETTA caption can be a TTA prompt (caption_to_audio) or an
understanding target (audio_to_caption); an AF3 clip can be an audio_only continuation.

Which text is used, per task and record kind:

    text_only                 text JSONL: every ``input`` turn, then ``output`` (assistant)
    caption_to_audio,         ETTA: ``caption``; AF3: the conversation's single assistant
    transcription_to_speech,  answer (several answers are rejected as ``multi_turn``: use
    audio_to_caption,         audio_to_conversation). Prompts are the templates' defaults
    speech_to_transcription   unless ``prompt`` is given.
    audio_to_conversation     AF3: every turn; ETTA: (prompt, caption) as one exchange
    audio_only                no text; the first ``prompt_seconds`` are context
    reasoning                 reasoning JSONL: every part of every turn (built by data/reasoning.py)

Audio that is a generation target (caption_to_audio, audio_only, transcription_to_speech)
is tokenized with the codec; audio that is an understanding input is stored as 16-bit PCM
in the waveform store with ``num_encoder_frames(n)`` placeholder rows.

A chunk is processed in phases so that every expensive step is batched: check the texts
(cheap rejects first), decode audio on a thread pool, run the codec on equal-length batches,
tokenize every text of the chunk in one call, then build and write documents in input order.
"""
from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from megatron_ualm.audio.frames import num_encoder_frames
from megatron_ualm.audio.io import SAMPLE_RATE, AudioError, load_audio, quantize_pcm16
from megatron_ualm.data import indexed as I
from megatron_ualm.data.manifests import (
    GenerationRecord, Reject, TextRecord, Turn, UnderstandingRecord,
)
from megatron_ualm.data.tokenizer import encode_batch
from megatron_ualm.formats import templates as T
from megatron_ualm.formats.vocab import UnifiedVocab

# Reject reasons added at this stage (manifest and audio ones come from manifests / audio.io).
EMPTY_TEXT = "empty_text"
TOO_SHORT = "too_short"
TOO_LONG = "too_long"
MULTI_TURN = "multi_turn"
BAD_CONVERSATION = "bad_conversation"
WRONG_KIND = "wrong_kind"

CODEC_TASKS = ("caption_to_audio", "audio_only", "transcription_to_speech", "reasoning")
WAVE_TASKS = ("audio_to_caption", "audio_to_conversation", "speech_to_transcription", "reasoning")
# reasoning (codes and waveforms, several clips per document) is built by data/reasoning.py
AUDIO_RECORDS = (GenerationRecord, UnderstandingRecord)


@dataclass
class Item:
    """One entry of the input stream. ``load`` (shards) returns its 16 kHz samples."""
    ordinal: int
    record: object = None            # TextRecord | GenerationRecord | UnderstandingRecord
    reject: Reject | None = None
    load: Callable[[], np.ndarray] | None = None
    key: str | None = None           # shard key, when read from shards
    # codec tasks: returns the clip's codec codes int [K, T] already made (the codec is not
    # run); raises AudioError for a bad codes file
    codes: Callable[[], np.ndarray] | None = None


@dataclass
class TaskOptions:
    task: str
    prompt: str | None = None        # None: the template's default prompt
    prompt_seconds: float = 0.0      # audio_only: seconds of context before the target
    max_seconds: float | None = None  # longer clips are rejected (None: no limit)
    window_seconds: float = 30.0     # encoder window, for the placeholder count


@dataclass
class ChunkResult:
    kept: int = 0
    rejects: list = field(default_factory=list)       # reject dicts, in input order
    counts: Counter = field(default_factory=Counter)   # summed document_stats + clips/samples


class _Skip(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


def _text(value: str, what: str) -> str:
    if not value.strip():
        raise _Skip(EMPTY_TEXT, f"{what} is empty")
    return value


def _answer(rec) -> str:
    if isinstance(rec, GenerationRecord):
        return _text(rec.caption, "caption")
    answers = [t.content for t in rec.conversations if t.role == "assistant"]
    if len(answers) != 1:
        raise _Skip(MULTI_TURN, f"conversation has {len(answers)} assistant answers; this task "
                    "needs exactly one (use --task audio_to_conversation to keep every turn)")
    return _text(answers[0], "assistant answer")


def _prompt_kw(opts: TaskOptions) -> dict:
    return {} if opts.prompt is None else {"prompt": opts.prompt}


def task_messages(opts: TaskOptions, rec, tokenize, audio, frame_rate: float = 50.0) -> list[T.Message]:
    """One record -> messages of ``opts.task``. ``audio``: codes [K, T] for codec tasks, an
    AudioRef for waveform tasks, None for text_only. Raises _Skip / ValueError on bad input."""
    task = opts.task
    if task == "text_only":
        if not isinstance(rec, TextRecord):
            raise _Skip(WRONG_KIND, "text_only needs a text-only JSONL record")
        turns = [(t.role, _text(t.content, f"input turn {i} ({t.role})")) for i, t in enumerate(rec.input)]
        return T.text_only(turns, _text(rec.output, "output"), tokenize)
    if not isinstance(rec, AUDIO_RECORDS):
        raise _Skip(WRONG_KIND, f"{task} needs an audio record (ETTA or AF3), got a text-only one")
    if task == "caption_to_audio":
        return T.caption_to_audio(_answer(rec), audio, tokenize, **_prompt_kw(opts))
    if task == "transcription_to_speech":
        return T.transcription_to_speech(_answer(rec), audio, tokenize, **_prompt_kw(opts))
    if task == "audio_to_caption":
        return T.audio_to_caption(audio, _answer(rec), tokenize, **_prompt_kw(opts))
    if task == "speech_to_transcription":
        return T.speech_to_transcription(audio, _answer(rec), tokenize, **_prompt_kw(opts))
    if task == "audio_only":
        return T.audio_only(audio, int(round(opts.prompt_seconds * frame_rate)))
    if task == "audio_to_conversation":
        if isinstance(rec, GenerationRecord):
            prompt = opts.prompt or T.DEFAULT_PROMPTS["audio_to_caption"]
            conv = [("user", prompt), ("assistant", _text(rec.caption, "caption"))]
        else:
            for i, t in enumerate(rec.conversations):
                if t.role == "assistant":
                    _text(t.content, f"conversations[{i}] (gpt)")
            conv = [(t.role, t.content) for t in rec.conversations]
        return T.audio_to_conversation(audio, conv, tokenize)
    raise ValueError(f"unknown task {task!r}; use one of {T.TASKS}")


def _reject_of(item: Item, reason: str, message: str) -> dict:
    rec = item.record
    rej = Reject(getattr(rec, "file", "?"), getattr(rec, "line", None), reason, message,
                 index=getattr(rec, "index", None), key=item.key)
    return rej.to_json()


def _load(item: Item, opts: TaskOptions) -> np.ndarray:
    if item.load is not None:
        return item.load()
    rec = item.record
    if isinstance(rec, GenerationRecord):
        return load_audio(rec.location, rec.start_time, rec.end_time)
    return load_audio(rec.sound)


class ExampleBuilder:
    """Turns chunks of Items into documents written to a DocumentWriter."""

    def __init__(self, opts: TaskOptions, tokenizer, vocab: UnifiedVocab, codec=None,
                 batch_size: int = 16, decode_threads: int = 2):
        if opts.task not in T.TASKS:
            raise ValueError(f"unknown task {opts.task!r}; use one of {T.TASKS}")
        if opts.task in CODEC_TASKS and codec is None:
            raise ValueError(f"task {opts.task} tokenizes audio with the codec: pass --codec")
        self.opts, self.tokenizer, self.vocab, self.codec = opts, tokenizer, vocab, codec
        self.batch_size, self.decode_threads = batch_size, decode_threads
        self.uses_codec = opts.task in CODEC_TASKS
        self.uses_waves = opts.task in WAVE_TASKS
        self.frame_rate = codec.info.frame_rate if codec is not None else 50.0
        if self.uses_codec:
            self._dummy_codes = np.broadcast_to(np.zeros(1, np.int64), (vocab.num_codebooks, 1 << 30))
        self._dummy_ref = T.AudioRef(0, 1, 1)

    def process(self, items: Sequence[Item], writer: I.DocumentWriter) -> ChunkResult:
        return self.finish(self.prepare(items), writer)

    def prepare(self, items: Sequence[Item]) -> "_Prepared":
        """CPU phases (text checks, audio decoding): may run on a thread for the next chunk
        while :meth:`finish` runs the codec on this one."""
        opts = self.opts
        outcome: list = [None] * len(items)  # reject dict, or the texts the item needs

        def fail(i, reason, message):
            outcome[i] = _reject_of(items[i], reason, message)

        # 1. texts (and template validity) before any audio is touched
        for i, item in enumerate(items):
            if item.reject is not None:
                outcome[i] = dict(item.reject.to_json(), **({"key": item.key} if item.key else {}))
                continue
            texts: list[str] = []
            dummy = self._dummy_codes if self.uses_codec else self._dummy_ref if self.uses_waves else None
            try:
                task_messages(opts, item.record, lambda s: texts.append(s) or [], dummy, self.frame_rate)
                outcome[i] = texts
            except _Skip as e:
                fail(i, e.reason, e.message)
            except ValueError as e:
                fail(i, BAD_CONVERSATION, str(e))

        # 2. audio: decode on threads, check lengths
        audio: dict[int, np.ndarray] = {}
        given: dict[int, np.ndarray] = {}  # codes read instead of encoded
        if self.uses_codec or self.uses_waves:
            todo = [i for i, o in enumerate(outcome) if isinstance(o, list)]

            def decode(i):
                try:
                    if items[i].codes is not None:
                        return i, items[i].codes(), None
                    return i, _load(items[i], opts), None
                except AudioError as e:
                    return i, None, e
            with ThreadPoolExecutor(max(1, self.decode_threads)) as pool:
                for i, samples, err in pool.map(decode, todo):
                    if err is not None:
                        fail(i, err.reason, f"{err.path}: {err.message}")
                        continue
                    is_codes = items[i].codes is not None
                    n = samples.shape[1] * self.codec.info.hop_length if is_codes else len(samples)
                    if (why := self._length_problem(n)) is not None:
                        fail(i, *why)
                    else:
                        (given if is_codes else audio)[i] = samples

        return _Prepared(list(items), outcome, audio, given)

    def finish(self, prep: "_Prepared", writer: I.DocumentWriter) -> ChunkResult:
        """Codec, tokenizer and writing phases."""
        opts, res = self.opts, ChunkResult()
        items, outcome, audio = prep.items, prep.outcome, prep.audio

        # 3. codec on equal-length batches
        codes: dict[int, np.ndarray] = dict(prep.codes)
        if self.uses_codec and audio:
            order = sorted(audio)
            for i, c in zip(order, self.codec.encode([audio[i] for i in order], self.batch_size)):
                codes[i] = c

        # 4. every text of the chunk in one tokenizer call
        keep = [i for i, o in enumerate(outcome) if isinstance(o, list)
                and (not (self.uses_codec or self.uses_waves) or i in audio or i in codes)]
        unique = sorted({s for i in keep for s in outcome[i]})
        ids = dict(zip(unique, encode_batch(self.tokenizer, unique)))
        tokenize = ids.__getitem__

        # 5. documents in input order
        for i, o in enumerate(outcome):
            if i not in keep:
                continue  # rejected above
            content = None
            if self.uses_codec:
                content = codes[i]
            elif self.uses_waves:
                n = len(audio[i])
                content = T.AudioRef(writer.num_clips, n, num_encoder_frames(n, opts.window_seconds))
            segments = T.build_segments(task_messages(opts, items[i].record, tokenize, content,
                                                      self.frame_rate), self.vocab)
            if self.uses_waves:
                writer.add_clip(quantize_pcm16(audio[i]))
                res.counts["clips"] += 1
            if i in audio:
                res.counts["audio_samples"] += len(audio[i])
            elif i in prep.codes:
                res.counts["audio_samples"] += prep.codes[i].shape[1] * self.codec.info.hop_length
            writer.add_document(segments)
            res.counts.update(I.document_stats(segments, self.vocab.num_codebooks))
            res.counts["sequences"] += len(segments)
            res.kept += 1
        res.rejects = [o for o in outcome if isinstance(o, dict)]
        return res

    def _length_problem(self, n: int):
        opts = self.opts
        if opts.max_seconds is not None and n > opts.max_seconds * SAMPLE_RATE:
            return TOO_LONG, f"{n / SAMPLE_RATE:.2f} s is longer than --max-seconds {opts.max_seconds}"
        if self.uses_waves and num_encoder_frames(n, opts.window_seconds) == 0:
            return TOO_SHORT, f"{n} samples give no audio-encoder frame"
        if self.uses_codec:
            hop = self.codec.info.hop_length
            need = hop * (1 + int(round(opts.prompt_seconds * self.frame_rate)))
            if n < need:
                return TOO_SHORT, (f"{n} samples is shorter than {need} (one codec frame"
                                   f"{' after the prompt' if opts.prompt_seconds else ''})")
        return None


@dataclass
class _Prepared:
    items: list
    outcome: list          # per item: reject dict, or the texts it needs
    audio: dict            # item index -> float32 samples
    codes: dict = field(default_factory=dict)  # item index -> codes [K, T] given, not encoded


def turns_from_json(turns) -> tuple[Turn, ...]:
    return tuple(Turn(t["role"], t["content"]) for t in turns)


def record_from_shard_meta(meta: dict):
    """A shard sample's JSON (data/shards.py) -> the record it was built from."""
    src = meta.get("source", {})
    if meta.get("kind") == "etta":
        crop = meta.get("crop") or [0.0, None]
        return GenerationRecord(src.get("file", "?"), src.get("line", 0), meta.get("audio", "?"),
                                crop[0] or 0.0, crop[1], meta.get("manifest_duration"),
                                meta.get("caption", ""), meta.get("manifest_sample_rate"))
    if meta.get("kind") == "af3":
        return UnderstandingRecord(src.get("file", "?"), src.get("line", 0), src.get("index", 0),
                                   str(meta.get("id", "")), meta.get("audio", "?"),
                                   meta.get("manifest_duration"),
                                   turns_from_json(meta.get("conversations", [])))
    raise ValueError(f"shard sample {meta.get('key')}: unknown kind {meta.get('kind')!r}")
