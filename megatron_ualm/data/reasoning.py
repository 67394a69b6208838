"""Reasoning conversations (UALM-Reason, SPEC section 9) -> stored documents.

A record (``manifests.ReasoningRecord``) may use several clips: every ``audio_out`` path is
tokenized with the codec (a generation target), every ``audio_in`` path is stored once per
document in the waveform store (the encoder hears it; ``num_encoder_frames`` placeholder
rows). One path may be both: the model generates a clip and then listens to it. The layout
is ``templates.reasoning`` + ``build_segments``; see /formats/templates.py for the weights.

Same phases as ``tasks.ExampleBuilder`` (cheap text checks, threaded decoding, codec on
equal-length batches, one tokenizer call per chunk, documents in input order), so a chunk's
output is a pure function of its entries and ``preprocess.py``'s resume rules hold.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np

from megatron_ualm.audio.frames import num_encoder_frames
from megatron_ualm.audio.io import SAMPLE_RATE, AudioError, load_audio, quantize_pcm16
from megatron_ualm.data import indexed as I
from megatron_ualm.data.manifests import ReasoningRecord
from megatron_ualm.data.tasks import (
    BAD_CONVERSATION, TOO_LONG, TOO_SHORT, WRONG_KIND, ChunkResult, Item, TaskOptions, _Prepared,
    _reject_of,
)
from megatron_ualm.data.tokenizer import encode_batch
from megatron_ualm.formats import templates as T
from megatron_ualm.formats.vocab import UnifiedVocab


def _uses(rec: ReasoningRecord, key: str) -> list[str]:
    """Distinct paths used as ``key`` parts, in order of first use."""
    return list(dict.fromkeys(v for _, parts in rec.turns for k, v in parts if k == key))


def _texts(rec: ReasoningRecord) -> list[str]:
    return [v for _, parts in rec.turns for k, v in parts if k == "text"]


class ReasoningBuilder:
    """Turns chunks of Items holding ReasoningRecords into documents (codes + waveforms)."""

    def __init__(self, opts: TaskOptions, tokenizer, vocab: UnifiedVocab, codec,
                 batch_size: int = 16, decode_threads: int = 2):
        if codec is None:
            raise ValueError("task reasoning tokenizes audio_out clips with the codec: pass --codec")
        self.opts, self.tokenizer, self.vocab, self.codec = opts, tokenizer, vocab, codec
        self.batch_size, self.decode_threads = batch_size, decode_threads

    def process(self, items: Sequence[Item], writer: I.DocumentWriter) -> ChunkResult:
        return self.finish(self.prepare(items), writer)

    def prepare(self, items: Sequence[Item]) -> _Prepared:
        outcome: list = [None] * len(items)
        for i, item in enumerate(items):
            if item.reject is not None:
                outcome[i] = item.reject.to_json()
            elif not isinstance(item.record, ReasoningRecord):
                outcome[i] = _reject_of(item, WRONG_KIND, "task reasoning needs a reasoning JSONL "
                                        "record ({\"messages\": [...]})")
            else:
                outcome[i] = _texts(item.record)

        todo = [(i, path) for i, o in enumerate(outcome) if isinstance(o, list)
                for path in items[i].record.audio_paths()]

        def decode(job):
            try:
                return job, load_audio(job[1]), None
            except AudioError as e:
                return job, None, e

        audio: dict[int, dict[str, np.ndarray]] = {}
        with ThreadPoolExecutor(max(1, self.decode_threads)) as pool:
            for (i, path), samples, err in pool.map(decode, todo):
                if not isinstance(outcome[i], list):
                    continue  # an earlier clip of this entry already failed
                why = ((err.reason, f"{err.path}: {err.message}") if err is not None
                       else self._length_problem(items[i].record, path, len(samples)))
                if why is not None:
                    outcome[i] = _reject_of(items[i], *why)
                    audio.pop(i, None)
                else:
                    audio.setdefault(i, {})[path] = samples
        return _Prepared(list(items), outcome, audio)

    def finish(self, prep: _Prepared, writer: I.DocumentWriter) -> ChunkResult:
        res = ChunkResult()
        items, outcome, audio = prep.items, prep.outcome, prep.audio
        keep = [i for i, o in enumerate(outcome) if isinstance(o, list)]

        # codec on every audio_out clip of the chunk, equal lengths batched
        jobs = [(i, path) for i in keep for path in _uses(items[i].record, "audio_out")]
        codes = dict(zip(jobs, self.codec.encode([audio[i][p] for i, p in jobs], self.batch_size)))

        unique = sorted({s for i in keep for s in outcome[i]})
        ids = dict(zip(unique, encode_batch(self.tokenizer, unique)))

        for i in keep:
            rec = items[i].record
            heard = _uses(rec, "audio_in")
            refs = {}
            for j, path in enumerate(heard):
                n = len(audio[i][path])
                refs[path] = T.AudioRef(writer.num_clips + j, n,
                                        num_encoder_frames(n, self.opts.window_seconds))
            try:
                msgs = T.reasoning(rec.turns, ids.__getitem__, lambda p: codes[(i, p)], refs.__getitem__)
                segments = T.build_segments(msgs, self.vocab)
            except ValueError as e:
                outcome[i] = _reject_of(items[i], BAD_CONVERSATION, str(e))
                continue
            for path in heard:
                writer.add_clip(quantize_pcm16(audio[i][path]))
            writer.add_document(segments)
            res.counts["clips"] += len(heard)
            res.counts["audio_samples"] += sum(len(a) for a in audio[i].values())
            res.counts.update(I.document_stats(segments, self.vocab.num_codebooks))
            res.counts["sequences"] += len(segments)
            res.kept += 1
        res.rejects = [o for o in outcome if isinstance(o, dict)]
        return res

    def _length_problem(self, rec: ReasoningRecord, path: str, n: int):
        opts = self.opts
        if opts.max_seconds is not None and n > opts.max_seconds * SAMPLE_RATE:
            return TOO_LONG, f"{path}: {n / SAMPLE_RATE:.2f} s is longer than --max-seconds {opts.max_seconds}"
        if path in _uses(rec, "audio_in") and num_encoder_frames(n, opts.window_seconds) == 0:
            return TOO_SHORT, f"{path}: {n} samples give no audio-encoder frame"
        hop = self.codec.info.hop_length
        if path in _uses(rec, "audio_out") and n < hop:
            return TOO_SHORT, f"{path}: {n} samples is shorter than one codec frame ({hop})"
        return None
