"""Stored documents: our writer's bytes equal megatron's builder's; megatron reads them back."""
import os

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from megatron_ualm.data import indexed as I
from megatron_ualm.formats import templates as T
from megatron_ualm.formats.vocab import UnifiedVocab

VOCAB = UnifiedVocab(text_vocab_size=300, num_codebooks=4, codebook_size=16)


def _docs(rng, n, clip_base=0):
    docs = []
    for i in range(n):
        codes = rng.integers(0, 16, size=(4, int(rng.integers(1, 6))))
        ref = T.AudioRef(clip_base + i, 16000, 25)
        msgs = [T.Message("user", "audio", ref),
                T.Message("user", "text", rng.integers(0, 300, size=int(rng.integers(0, 5)))),
                T.Message("assistant", "audio", codes)]
        docs.append(T.build_segments(msgs, VOCAB))
    return docs


def _meta(n_docs, task="audio_to_caption"):
    return {"format": I.FORMAT_NAME, "version": I.FORMAT_VERSION, "task": task,
            "vocab": {"text_vocab_size": 300, "tokenizer_length": 290, "num_codebooks": 4, "codebook_size": 16},
            "tokenizer": {"vocab_sha256": "abc"}, "codec": None, "sample_rate": 16000,
            "encoder_window_seconds": 30.0, "counts": {"documents": n_docs}, "sources": ["x"]}


def _write(prefix, docs, clips):
    w = I.DocumentWriter(prefix, with_audio=True)
    for d in docs:
        w.add_document(d)
    for c in clips:
        w.add_clip(c)
    w.finalize(_meta(len(docs)))


def test_bytes_equal_megatron_builder_and_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    docs = _docs(rng, 7)
    clips = [rng.integers(-2000, 2000, size=int(rng.integers(1, 50))).astype(np.int16) for _ in range(7)]
    ours = str(tmp_path / "ours")
    _write(ours, docs, clips)
    ref = str(tmp_path / "ref")
    b = IndexedDatasetBuilder(ref + ".bin", dtype=np.int32, multimodal=True)
    for d in docs:
        for seg in d:
            b.add_item(torch.from_numpy(seg.data.astype(np.int32)), mode=seg.mode)
        b.end_document()
    b.finalize(ref + ".idx")
    for ext in (".bin", ".idx"):
        assert open(ours + ext, "rb").read() == open(ref + ext, "rb").read()
    ab = IndexedDatasetBuilder(ref + ".audio.bin", dtype=np.int16)
    for c in clips:
        ab.add_item(torch.from_numpy(c))
        ab.end_document()
    ab.finalize(ref + ".audio.idx")
    for ext in (".audio.bin", ".audio.idx"):
        assert open(ours + ext, "rb").read() == open(ref + ext, "rb").read()

    ds = I.TokenizedDataset(ours, vocab=VOCAB, task="audio_to_caption")
    assert len(ds) == 7 and ds.num_clips == 7
    raw = IndexedDataset(ours, multimodal=True)
    for i, d in enumerate(docs):
        assert ds.segments(i) == d
        assert I.read_document(raw, i) == d
        np.testing.assert_array_equal(ds.clip_pcm16(i), clips[i])
    expected_rows = [T.layout(d, VOCAB).num_rows for d in docs]
    np.testing.assert_array_equal(ds.rows(), expected_rows)
    assert [I.document_stats(d, 4)["rows"] for d in docs] == expected_rows


def test_mismatch_refused(tmp_path):
    prefix = str(tmp_path / "d")
    _write(prefix, _docs(np.random.default_rng(1), 2), [np.zeros(3, np.int16)] * 2)
    with pytest.raises(I.DatasetMismatchError, match="num_codebooks=4 but the model has num_codebooks=8"):
        I.TokenizedDataset(prefix, vocab=UnifiedVocab(300, 8, 16))
    with pytest.raises(I.DatasetMismatchError, match="tokenizer has 290 entries but the model has text_vocab_size=200"):
        I.TokenizedDataset(prefix, vocab=UnifiedVocab(200, 4, 16))
    I.TokenizedDataset(prefix, vocab=UnifiedVocab(1000, 4, 16))  # more text rows: fine
    with pytest.raises(I.DatasetMismatchError, match="holds task 'audio_to_caption'"):
        I.TokenizedDataset(prefix, task="text_only")
    with pytest.raises(I.DatasetMismatchError, match="another tokenizer"):
        I.TokenizedDataset(prefix, tokenizer={"vocab_sha256": "zzz"})
    os.remove(prefix + ".meta.json")
    with pytest.raises(FileNotFoundError, match="not a finished"):
        I.TokenizedDataset(prefix)


def test_concat_shifts_clip_indices(tmp_path):
    rng = np.random.default_rng(2)
    a, b = _docs(rng, 3), _docs(rng, 2)
    ca = [np.full(5, i, np.int16) for i in range(3)]
    cb = [np.full(4, 10 + i, np.int16) for i in range(2)]
    _write(str(tmp_path / "a"), a, ca)
    _write(str(tmp_path / "b"), b, cb)
    out = str(tmp_path / "ab")
    I.concat_datasets([str(tmp_path / "a"), str(tmp_path / "b")], out, _meta(5))
    ds = I.TokenizedDataset(out)
    assert len(ds) == 5 and ds.num_clips == 5
    for i in range(5):
        (ref,) = [s for s in ds.segments(i) if s.mode == T.MODE_AUDIO_REF]
        np.testing.assert_array_equal(ds.clip_pcm16(int(ref.data[0])), (ca + cb)[i])
    # one writer over everything gives the same bytes as the concatenation
    whole = str(tmp_path / "whole")
    _write(whole, a + _docs(np.random.default_rng(2), 5, clip_base=0)[3:], ca + cb)
    for ext in (".bin", ".idx", ".audio.bin", ".audio.idx"):
        assert open(whole + ext, "rb").read() == open(out + ext, "rb").read()
