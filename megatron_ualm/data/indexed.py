"""Tokenized datasets on disk: Megatron-core ``IndexedDataset`` files plus a waveform store.

One dataset prefix ``P`` is these files (all written atomically, the sidecar last):

    P.bin / P.idx              documents: int32, multimodal (one int8 ``mode`` per sequence).
                               One document per example, one sequence per ``Segment``, its
                               mode the Segment's (``formats.templates.MODE_*``).
    P.audio.bin / P.audio.idx  waveforms of continuous (understanding) inputs: int16 PCM at
                               16 kHz, one document of one sequence per clip; an ``AudioRef``'s
                               clip_index is its sequence index here (O(1) read). Only present
                               when the task has continuous audio.
    P.meta.json                sidecar: format version, task, vocabulary needs (tokenizer length,
                               K, C), tokenizer and codec identity, counts, hours, sources,
                               rejects by reason.

Both pairs are byte-compatible with ``megatron.core.datasets.indexed_dataset`` (its
``IndexedDataset`` opens them; its ``IndexedDatasetBuilder`` would write the same bytes); the
index is written here with vectorised numpy instead of the builder's per-sequence loop.
Reading a document touches only the index arrays and one contiguous slice of ``P.bin``.
"""
from __future__ import annotations

import glob
import json
import os
import re
import struct
import warnings
from typing import Iterable, Sequence

from dataclasses import dataclass

import numpy as np

from megatron_ualm.errors import UserError
from megatron_ualm.fileutil import read_json, write_atomic
from megatron_ualm.formats import templates as T
from megatron_ualm.formats.vocab import UnifiedVocab

FORMAT_NAME = "megatron_ualm.tokenized"
FORMAT_VERSION = 1
SAMPLE_RATE = 16000
TOKEN_DTYPE = np.int32
AUDIO_DTYPE = np.int16
# Megatron's .idx layout: magic, version 1, dtype code (int32 -> 4, int16 -> 3).
_IDX_MAGIC = b"MMIDIDX\x00\x00"
_DTYPE_CODES = {np.dtype(np.int16): 3, np.dtype(np.int32): 4}
_COPY_BLOCK = 1 << 24  # elements per block when copying/patching .bin files
_TMP_SUFFIX = re.compile(r"\.tmp\d+")  # what _tmp() appends to a file name


def _megatron_indexed():
    """megatron.core.datasets.indexed_dataset, imported without its optional-kernel warnings."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


class DatasetMismatchError(UserError, ValueError):
    """A stored dataset does not fit the vocabulary, task or tokenizer it is opened with."""


def bin_path(prefix: str) -> str:
    return f"{prefix}.bin"


def idx_path(prefix: str) -> str:
    return f"{prefix}.idx"


def audio_prefix(prefix: str) -> str:
    return f"{prefix}.audio"


def meta_path(prefix: str) -> str:
    return f"{prefix}.meta.json"


def _file_names(prefix: str) -> list[str]:
    return [bin_path(prefix), idx_path(prefix), bin_path(audio_prefix(prefix)),
            idx_path(audio_prefix(prefix)), meta_path(prefix)]


def dataset_files(prefix: str) -> list[str]:
    """Every file of a dataset prefix that exists."""
    return [n for n in _file_names(prefix) if os.path.exists(n)]


def remove_stale_tmp(prefix: str) -> list[str]:
    """Delete the ``<file>.tmp<pid>`` files that writers of ``prefix`` killed mid-way left
    behind (any pid); returns their paths. Call before writing ``prefix`` again: each prefix
    has one writer at a time, so no live writer's file is touched."""
    removed = []
    for name in _file_names(prefix):
        for path in glob.glob(glob.escape(name) + ".tmp*"):
            if _TMP_SUFFIX.fullmatch(path[len(name):]):
                os.remove(path)
                removed.append(path)
    return removed


# --- writing ---------------------------------------------------------------------------------
def write_index(path: str, lengths: np.ndarray, document_indices: np.ndarray,
                modes: np.ndarray | None, dtype=TOKEN_DTYPE) -> None:
    """Write a Megatron .idx: lengths int32 [S], document_indices int64 [D + 1] (starting at 0),
    modes int8 [S] (multimodal) or None."""
    lengths = np.asarray(lengths, dtype=np.int32)
    document_indices = np.asarray(document_indices, dtype=np.int64)
    itemsize = np.dtype(dtype).itemsize
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1].astype(np.int64) * itemsize, out=pointers[1:])
    with open(path, "wb") as f:
        f.write(_IDX_MAGIC)
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", _DTYPE_CODES[np.dtype(dtype)]))
        f.write(struct.pack("<Q", len(lengths)))
        f.write(struct.pack("<Q", len(document_indices)))
        f.write(lengths.tobytes(order="C"))
        f.write(pointers.tobytes(order="C"))
        f.write(document_indices.tobytes(order="C"))
        if modes is not None:
            f.write(np.asarray(modes, dtype=np.int8).tobytes(order="C"))


def _tmp(path: str) -> str:
    return f"{path}.tmp{os.getpid()}"


def _commit(tmp_paths: dict[str, str]) -> None:
    """Rename tmp -> final for every pair (data before the sidecar, which is last)."""
    for final, tmp in tmp_paths.items():
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)


def write_json_atomic(path: str, obj) -> None:
    text = json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
    write_atomic(path, text.encode("utf-8"), _tmp(path))


class DocumentWriter:
    """Streams documents (lists of Segments) and clips to a dataset prefix.

    Nothing is visible under the final names until :meth:`finalize` renames the files
    (sidecar last), so an interrupted writer leaves only ``*.tmp<pid>`` files behind; the
    next writer of the prefix deletes them.
    """

    def __init__(self, prefix: str, with_audio: bool):
        self.prefix = prefix
        self.with_audio = with_audio
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        remove_stale_tmp(prefix)
        self._tmp = {bin_path(prefix): _tmp(bin_path(prefix)), idx_path(prefix): _tmp(idx_path(prefix))}
        self._bin = open(self._tmp[bin_path(prefix)], "wb", buffering=1 << 20)
        self._lengths: list[int] = []
        self._modes: list[int] = []
        self._doc_ends: list[int] = []
        if with_audio:
            ap = audio_prefix(prefix)
            self._tmp[bin_path(ap)] = _tmp(bin_path(ap))
            self._tmp[idx_path(ap)] = _tmp(idx_path(ap))
            self._audio = open(self._tmp[bin_path(ap)], "wb", buffering=1 << 20)
            self._clip_lengths: list[int] = []

    @property
    def num_documents(self) -> int:
        return len(self._doc_ends)

    @property
    def num_clips(self) -> int:
        return len(self._clip_lengths) if self.with_audio else 0

    def add_document(self, segments: Sequence[T.Segment]) -> None:
        if not segments:
            raise ValueError("a document needs at least one segment")
        parts = []
        for seg in segments:
            data = np.asarray(seg.data)
            if data.size and (data.min() < np.iinfo(TOKEN_DTYPE).min or data.max() > np.iinfo(TOKEN_DTYPE).max):
                raise ValueError("segment value does not fit int32")
            parts.append(data)
            self._lengths.append(len(data))
            self._modes.append(int(seg.mode))
        self._bin.write(np.concatenate(parts).astype(TOKEN_DTYPE, copy=False).tobytes())
        self._doc_ends.append(len(self._lengths))

    def add_clip(self, pcm16: np.ndarray) -> int:
        """Store int16 PCM [n] at 16 kHz; returns its clip_index."""
        if not self.with_audio:
            raise RuntimeError("this writer was opened without a waveform store")
        pcm16 = np.asarray(pcm16)
        if pcm16.dtype != AUDIO_DTYPE or pcm16.ndim != 1:
            raise ValueError(f"clips are stored as int16 [n], got {pcm16.dtype} {list(pcm16.shape)}")
        self._audio.write(pcm16.tobytes())
        self._clip_lengths.append(len(pcm16))
        return len(self._clip_lengths) - 1

    def finalize(self, meta: dict) -> None:
        """Write the indices and the sidecar, then move everything to the final names."""
        self._bin.close()
        write_index(self._tmp[idx_path(self.prefix)], np.asarray(self._lengths, np.int64),
                    np.asarray([0] + self._doc_ends, np.int64), np.asarray(self._modes, np.int8))
        if self.with_audio:
            self._audio.close()
            ap = audio_prefix(self.prefix)
            n = len(self._clip_lengths)
            write_index(self._tmp[idx_path(ap)], np.asarray(self._clip_lengths, np.int64),
                        np.arange(n + 1, dtype=np.int64), None, dtype=AUDIO_DTYPE)
        _commit(self._tmp)
        write_json_atomic(meta_path(self.prefix), meta)

    def abort(self) -> None:
        for f in (self._bin, getattr(self, "_audio", None)):
            if f is not None:
                f.close()
        for tmp in self._tmp.values():
            if os.path.exists(tmp):
                os.remove(tmp)


# --- reading ---------------------------------------------------------------------------------
def read_document(ds, index: int) -> list[T.Segment]:
    """Document ``index`` of a megatron ``IndexedDataset`` (multimodal) -> its Segments.

    One contiguous read of the .bin; only the index arrays are consulted."""
    doc = ds.index.document_indices
    start, end = int(doc[index]), int(doc[index + 1])
    sequences, modes = ds[start:end]
    return [T.Segment(int(m), np.asarray(s, dtype=np.int64)) for s, m in zip(sequences, modes)]


def rows_per_document(ds, num_codebooks: int) -> np.ndarray:
    """int64 [D]: LM rows (positions) of every document, from the index (+ one int32 read per
    audio reference for its placeholder count); vectorised, no document is parsed."""
    lengths = ds.index.sequence_lengths.astype(np.int64)
    modes = ds.index.sequence_modes
    rows = lengths.copy()
    codec = (modes == T.MODE_CODEC) | (modes == T.MODE_CODEC_TARGET)
    rows[codec] = lengths[codec] // num_codebooks + num_codebooks - 1
    ref = np.flatnonzero(modes == T.MODE_AUDIO_REF)
    if len(ref):
        data = np.memmap(bin_path(ds.path_prefix), dtype=TOKEN_DTYPE, mode="r")
        rows[ref] = data[ds.index.sequence_pointers[ref] // 4 + 2]
    doc = ds.index.document_indices.astype(np.int64)
    csum = np.concatenate([[0], np.cumsum(rows)])
    return csum[doc[1:]] - csum[doc[:-1]]


def read_meta(prefix: str) -> dict:
    path = meta_path(prefix)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: {prefix} is not a finished megatron_ualm dataset "
                                "(re-run the preprocessing tool; it resumes where it stopped)")
    meta = read_json(path, "re-run the preprocessing tool", DatasetMismatchError)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise DatasetMismatchError(f"{path}: not a {FORMAT_NAME} sidecar")
    if meta.get("version") != FORMAT_VERSION:
        raise DatasetMismatchError(f"{path}: format version {meta.get('version')}, this code reads "
                                   f"version {FORMAT_VERSION}; re-run the preprocessing")
    return meta


def check_meta(meta: dict, prefix: str, vocab: UnifiedVocab | None = None, task: str | None = None,
               tokenizer: dict | None = None) -> None:
    """Raise DatasetMismatchError naming the field when the dataset was built for another
    vocabulary layout, task or tokenizer."""
    where = meta_path(prefix)
    stored = meta["vocab"]
    if vocab is not None:
        # Text is stored as unified ids (text id + 256) and audio as raw codes, so a dataset fits
        # any vocabulary with enough text rows and the same codebooks.
        need = stored.get("tokenizer_length")
        if need is not None and vocab.text_vocab_size < need:
            raise DatasetMismatchError(
                f"{where}: its tokenizer has {need} entries but the model has text_vocab_size="
                f"{vocab.text_vocab_size}; use the model's tokenizer or raise model.text_vocab_size")
        for name, want in (("num_codebooks", vocab.num_codebooks), ("codebook_size", vocab.codebook_size)):
            if stored.get(name) is not None and stored[name] != want:
                raise DatasetMismatchError(
                    f"{where}: built with a codec of {name}={stored[name]} but the model has "
                    f"{name}={want}; re-run the preprocessing with the model's codec or fix model.{name}")
    if task is not None and meta["task"] != task:
        raise DatasetMismatchError(f"{where}: holds task {meta['task']!r}, listed as {task!r} in "
                                   "the data config; fix the DatasetSpec's task")
    if tokenizer is not None and meta.get("tokenizer"):
        have, want = meta["tokenizer"].get("vocab_sha256"), tokenizer.get("vocab_sha256")
        if have and want and have != want:
            raise DatasetMismatchError(f"{where}: tokenized with another tokenizer "
                                       f"({meta['tokenizer'].get('path')}, vocab hash {have}) than "
                                       f"{tokenizer.get('path')} (hash {want}); re-run the preprocessing")


class TokenizedDataset:
    """A finished dataset prefix opened for training: ``segments(i)`` and ``clip(j)``.

    vocab / task / tokenizer (an identity dict from ``data.tokenizer.tokenizer_identity``),
    when given, are checked against the sidecar; a mismatch raises DatasetMismatchError.
    """

    def __init__(self, prefix: str, vocab: UnifiedVocab | None = None, task: str | None = None,
                 tokenizer: dict | None = None):
        IndexedDataset = _megatron_indexed().IndexedDataset
        self.prefix = os.fspath(prefix)
        self.meta = read_meta(self.prefix)
        check_meta(self.meta, self.prefix, vocab, task, tokenizer)
        self.task = self.meta["task"]
        # None when the dataset holds no codec segments (text and waveform tasks)
        self.num_codebooks = self.meta["vocab"].get("num_codebooks")
        self.docs = IndexedDataset(self.prefix, multimodal=True)
        if len(self.docs.index.document_indices) - 1 != self.meta["counts"]["documents"]:
            raise DatasetMismatchError(f"{meta_path(self.prefix)} counts "
                                       f"{self.meta['counts']['documents']} documents but "
                                       f"{idx_path(self.prefix)} holds "
                                       f"{len(self.docs.index.document_indices) - 1}; the files "
                                       "come from different runs")
        self.audio = None
        if os.path.exists(idx_path(audio_prefix(self.prefix))):
            self.audio = IndexedDataset(audio_prefix(self.prefix), multimodal=False)

    def __len__(self) -> int:
        return len(self.docs.index.document_indices) - 1

    def segments(self, index: int) -> list[T.Segment]:
        return read_document(self.docs, index)

    def clip_pcm16(self, clip_index: int) -> np.ndarray:
        if self.audio is None:
            raise IndexError(f"{self.prefix} has no waveform store ({audio_prefix(self.prefix)}.bin)")
        return self.audio[clip_index]

    def clip(self, clip_index: int) -> np.ndarray:
        """float32 [n] at 16 kHz in [-1, 1)."""
        return self.clip_pcm16(clip_index).astype(np.float32) / np.float32(32768.0)

    @property
    def num_clips(self) -> int:
        return 0 if self.audio is None else len(self.audio)

    def rows(self) -> np.ndarray:
        """int64 [D] LM rows per document (see :func:`rows_per_document`)."""
        return rows_per_document(self.docs, self.num_codebooks or 1)


# --- concatenation (rank/chunk parts -> one dataset; several datasets -> one) ----------------
@dataclass
class IndexArrays:
    """The arrays of a Megatron .idx, read with numpy alone (no torch import)."""
    dtype: np.dtype
    sequence_lengths: np.ndarray   # int32 [S]
    sequence_pointers: np.ndarray  # int64 [S], bytes into .bin
    document_indices: np.ndarray   # int64 [D + 1]
    sequence_modes: np.ndarray | None  # int8 [S]


def read_index(prefix: str, multimodal: bool) -> IndexArrays:
    path = idx_path(prefix)
    with open(path, "rb") as f:
        head = f.read(34)
    if head[:9] != _IDX_MAGIC or struct.unpack("<Q", head[9:17])[0] != 1:
        raise ValueError(f"{path}: not a Megatron IndexedDataset index (version 1)")
    dtype = {v: k for k, v in _DTYPE_CODES.items()}[head[17]]
    n_seq, n_doc = struct.unpack("<QQ", head[18:34])
    buf = np.memmap(path, dtype=np.uint8, mode="r")
    off = 34
    lengths = np.frombuffer(buf, np.int32, n_seq, off)
    off += 4 * n_seq
    pointers = np.frombuffer(buf, np.int64, n_seq, off)
    off += 8 * n_seq
    docs = np.frombuffer(buf, np.int64, n_doc, off)
    off += 8 * n_doc
    modes = np.frombuffer(buf, np.int8, n_seq, off) if multimodal else None
    return IndexArrays(dtype, lengths, pointers, docs, modes)


def _copy_bin(src: str, dst, dtype, patch_positions: np.ndarray | None, patch_add: int) -> None:
    """Append src's elements to the open file dst, adding patch_add at element positions."""
    data = np.memmap(src, dtype=dtype, mode="r") if os.path.getsize(src) else np.zeros(0, dtype)
    if patch_positions is None or not len(patch_positions) or patch_add == 0:
        for s in range(0, len(data), _COPY_BLOCK):
            dst.write(np.asarray(data[s:s + _COPY_BLOCK]).tobytes())
        return
    for s in range(0, len(data), _COPY_BLOCK):
        block = np.array(data[s:s + _COPY_BLOCK])
        lo, hi = np.searchsorted(patch_positions, [s, s + len(block)])
        block[patch_positions[lo:hi] - s] += patch_add
        dst.write(block.tobytes())
    del data


def concat_datasets(prefixes: Sequence[str], out_prefix: str, meta: dict) -> None:
    """Concatenate datasets (documents in order) into ``out_prefix``; AudioRef clip indices
    are shifted by the clips of the datasets before. ``meta`` is the merged sidecar."""
    with_audio = any(os.path.exists(idx_path(audio_prefix(p))) for p in prefixes)
    remove_stale_tmp(out_prefix)
    tmp = {bin_path(out_prefix): _tmp(bin_path(out_prefix)), idx_path(out_prefix): _tmp(idx_path(out_prefix))}
    ap = audio_prefix(out_prefix)
    if with_audio:
        tmp[bin_path(ap)] = _tmp(bin_path(ap))
        tmp[idx_path(ap)] = _tmp(idx_path(ap))
    lengths, modes, doc_ends, clip_lengths = [], [], [], []
    seq_offset, clip_offset = 0, 0
    with open(tmp[bin_path(out_prefix)], "wb") as out_bin:
        audio_bin = open(tmp[bin_path(ap)], "wb") if with_audio else None
        try:
            for p in prefixes:
                index = read_index(p, multimodal=True)
                m = np.array(index.sequence_modes)
                refs = np.flatnonzero(m == T.MODE_AUDIO_REF)
                positions = index.sequence_pointers[refs] // np.dtype(TOKEN_DTYPE).itemsize
                _copy_bin(bin_path(p), out_bin, TOKEN_DTYPE, np.sort(positions), clip_offset)
                lengths.append(np.array(index.sequence_lengths))
                modes.append(m)
                doc_ends.append(np.array(index.document_indices[1:]) + seq_offset)
                seq_offset += len(index.sequence_lengths)
                del index
                if os.path.exists(idx_path(audio_prefix(p))):
                    aidx = read_index(audio_prefix(p), multimodal=False)
                    clip_lengths.append(np.array(aidx.sequence_lengths))
                    clip_offset += len(aidx.sequence_lengths)
                    del aidx
                    _copy_bin(bin_path(audio_prefix(p)), audio_bin, AUDIO_DTYPE, None, 0)
                elif len(refs):
                    raise ValueError(f"{p} has audio references but no {audio_prefix(p)}.bin")
        finally:
            if audio_bin is not None:
                audio_bin.close()
    cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)  # noqa: E731
    write_index(tmp[idx_path(out_prefix)], cat(lengths, np.int64),
                np.concatenate([[0], cat(doc_ends, np.int64)]), cat(modes, np.int8))
    if with_audio:
        n = sum(len(c) for c in clip_lengths)
        write_index(tmp[idx_path(ap)], cat(clip_lengths, np.int64), np.arange(n + 1), None, dtype=AUDIO_DTYPE)
    _commit(tmp)
    write_json_atomic(meta_path(out_prefix), meta)


def merge_metas(metas: Sequence[dict]) -> dict:
    """Sidecar of a concatenation: identity fields must agree; counts and figures add up."""
    import hashlib

    if not metas:
        raise ValueError("nothing to merge")
    first = metas[0]
    for m in metas[1:]:
        for key in ("format", "version", "task", "vocab", "tokenizer", "codec",
                    "encoder_window_seconds", "sample_rate"):
            if m.get(key) != first.get(key):
                raise DatasetMismatchError(f"cannot merge datasets with different {key}: "
                                           f"{first.get(key)!r} vs {m.get(key)!r}")
    out = dict(first)
    out["counts"] = _sum_dicts(m["counts"] for m in metas)
    out["kept"] = out["counts"].get("documents", 0)
    out["rejected"] = _sum_dicts(m.get("rejected", {}) for m in metas)
    out["sources"] = [s for m in metas for s in m.get("sources", [])]
    out["options"] = [m.get("options") for m in metas] if len(metas) > 1 else first.get("options")
    out["audio_hours"] = round(out["counts"].get("audio_samples", 0) / SAMPLE_RATE / 3600, 6)
    out["build_fingerprint"] = hashlib.sha256(
        "".join(m.get("build_fingerprint", "") for m in metas).encode()).hexdigest()
    return out


def merge_datasets(prefixes: Sequence[str], out_prefix: str) -> dict:
    """Concatenate finished datasets of one task (same tokenizer/codec) into ``out_prefix``."""
    metas = [read_meta(p) for p in prefixes]
    meta = merge_metas(metas)
    concat_datasets(prefixes, out_prefix, meta)
    return meta


def _sum_dicts(dicts: Iterable[dict]) -> dict:
    total: dict = {}
    for d in dicts:
        for k, v in d.items():
            total[k] = total.get(k, 0) + v
    return dict(sorted(total.items()))


def document_stats(segments: Sequence[T.Segment], num_codebooks: int) -> dict:
    """Counts of one document, summed into the sidecar."""
    rows = text = frames = placeholders = target_rows = 0
    for seg in segments:
        n = len(seg.data)
        if seg.mode in (T.MODE_TEXT, T.MODE_TEXT_TARGET):
            r = n
            text += n
        elif seg.mode in (T.MODE_CODEC, T.MODE_CODEC_TARGET):
            frames += n // num_codebooks
            r = n // num_codebooks + num_codebooks - 1
        else:
            r = int(seg.data[2])
            placeholders += r
        rows += r
        if seg.mode in T.TARGET_MODES:
            target_rows += r
    return {"rows": rows, "text_tokens": text, "codec_frames": frames,
            "placeholder_rows": placeholders, "target_rows": target_rows}
