"""Blending, packing and row building for training."""
import numpy as np
import pytest
import torch

from megatron_ualm.data.blending import blend_order, blended_samples
from megatron_ualm.data.loader import PackedRows, RowSettings, collate
from megatron_ualm.data.packing import pack
from megatron_ualm.formats import AudioRef, UnifiedVocab, build_segments, layout
from megatron_ualm.formats import templates as T

VOC = UnifiedVocab(text_vocab_size=50, num_codebooks=3, codebook_size=4)


class MemorySource:
    """An in-memory DocumentSource."""

    def __init__(self, docs, clips=None):
        self.docs, self._clips = docs, clips or {}

    def __len__(self):
        return len(self.docs)

    def segments(self, i):
        return self.docs[i]

    def clip(self, c):
        return self._clips[c]


def text_doc(n_user, n_answer, base=0):
    return build_segments(T.text_only([("user", "x" * n_user)], "y" * n_answer,
                                      lambda s: [base + (i % 40) for i in range(len(s))]), VOC)


def test_blend_shares_match_weights_and_prefix_is_stable():
    w = [0.6, 0.3, 0.1]
    order = blend_order(w, 100_000)
    counts = np.bincount(order, minlength=3)
    np.testing.assert_allclose(counts / 100_000, np.array(w), atol=2e-5)
    for n in (10, 997, 5000):  # every prefix within one sample of its share
        c = np.bincount(order[:n], minlength=3)
        assert (np.abs(c - n * np.array(w)) <= 1.0 + 1e-9).all()
    np.testing.assert_array_equal(blend_order(w, 3000), order[:3000])


def test_blend_unnormalised_weights_and_restart_order():
    a = blended_samples([5, 7], [3.0, 1.0], 400, seed=9)
    b = blended_samples([5, 7], [3.0, 1.0], 400, seed=9)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert abs(np.mean(a[0] == 0) - 0.75) < 0.01
    # each epoch of dataset 0 visits all its documents once
    docs0 = a[1][a[0] == 0]
    for e in range(len(docs0) // 5):
        assert sorted(docs0[e * 5:(e + 1) * 5]) == list(range(5))
    with pytest.raises(ValueError, match="positive"):
        blend_order([1.0, 0.0], 10)


def test_best_fit_packing_and_overlong_policies():
    plan = pack([5, 3, 4, 2, 6, 1], seq_length=8)
    used = sorted(i for r in plan.rows for i, _ in r)
    assert used == [0, 1, 2, 3, 4, 5]
    assert all(sum(n for _, n in r) <= 8 for r in plan.rows)
    assert plan.stats.rows == 3 and plan.stats.fill == 21 / 24
    dropped = pack([3, 12, 2], seq_length=8, overlong="drop")
    assert dropped.stats.dropped_overlong == 1 and sorted(i for r in dropped.rows for i, _ in r) == [0, 2]
    cut = pack([3, 12], seq_length=8, overlong="truncate")
    assert cut.stats.truncated_overlong == 1 and [(1, 8)] in cut.rows
    unpacked = pack([3, 2], seq_length=8, packing=False)
    assert unpacked.rows == [[(0, 3)], [(1, 2)]]


def test_rows_hold_shifted_examples_with_restarting_positions():
    docs = [text_doc(3, 2), text_doc(1, 4), text_doc(2, 2)]
    src = MemorySource(docs)
    ds = PackedRows([src], [1.0], [5], VOC, RowSettings(seq_length=32, seed=1), num_rows=2)
    row = ds[0]
    seen = 0
    for slot, (d, doc, n) in enumerate([ds.row_plan(0)][0]):
        ex = layout(docs[doc], VOC)
        sl = slice(seen, seen + n)
        np.testing.assert_array_equal(row["tokens"][sl], ex.tokens[:-1])
        np.testing.assert_array_equal(row["labels"][sl], ex.tokens[1:])
        np.testing.assert_array_equal(row["loss_weights"][sl], ex.weights[1:])
        assert row["position_ids"][sl].tolist() == list(range(n))
        assert (row["document_ids"][sl] == slot).all() and (row["task_ids"][sl] == 5).all()
        seen += n
    assert (row["document_ids"][seen:] == -1).all() and not row["loss_weights"][seen:].any()


def test_rows_are_identical_across_restarts_and_cfg_dropout_is_seeded():
    codes = np.arange(12).reshape(3, 4) % 4
    docs = [build_segments(T.caption_to_audio("ab", codes, lambda s: [1, 2]), VOC) for _ in range(20)]
    settings = RowSettings(seq_length=64, seed=3, cfg_dropout_prob=0.5)
    a = PackedRows([MemorySource(docs)], [1.0], [0], VOC, settings, num_rows=6)
    b = PackedRows([MemorySource(docs)], [1.0], [0], VOC, settings, num_rows=6)
    for i in (5, 0, 3):
        for key in ("tokens", "labels", "loss_weights"):
            np.testing.assert_array_equal(a[i][key], b[i][key])
    # with p=0.5 some examples were dropped to the unconditional form, some were not
    prompts = [a[i]["tokens"][1:4, 0].tolist() for i in range(6)]
    assert [0, 0, 0] in prompts and any(p != [0, 0, 0] for p in prompts)


def test_audio_clips_are_collated_with_their_rows():
    clip = np.linspace(-1, 1, 800, dtype=np.float32)
    doc = build_segments(T.audio_to_caption(AudioRef(0, 800, 2), "xy", lambda s: [3] * len(s)), VOC)
    src = MemorySource([doc, text_doc(2, 2)], clips={0: clip})
    ds = PackedRows([src], [1.0], [1], VOC, RowSettings(seq_length=40, seed=0), num_rows=3)
    batch = collate([ds[i] for i in range(3)])
    assert batch["tokens"].shape == (3, 40, 3) and batch["tokens"].dtype == torch.int64
    n = batch["audio_rows"].shape[0]
    assert n >= 1 and batch["audio_waveforms"].shape == (n, 800)
    b, at, rows = batch["audio_rows"][0].tolist()
    assert rows == 2 and (batch["tokens"][b, at:at + 2] == 0).all()
    assert batch["tokens"][b, at - 1, 0] == 8  # <|audio|> opens the placeholders


def test_all_overlong_is_a_clear_error():
    with pytest.raises(ValueError, match="longer than data.seq_length"):
        PackedRows([MemorySource([text_doc(30, 30)])], [1.0], [0], VOC, RowSettings(seq_length=8), num_rows=1)


def test_restart_from_an_anchor_plans_only_from_there_and_gives_the_same_rows():
    docs = [text_doc(int(n), 2) for n in np.random.default_rng(0).integers(1, 12, 50)]
    settings = RowSettings(seq_length=40, seed=5, pack_window=16)
    full = PackedRows([MemorySource(docs), MemorySource(docs[:7])], [0.7, 0.3], [0, 1], VOC, settings, num_rows=10**9)
    anchor = full.anchor_for(500)
    assert anchor[0] > 0 and anchor[1] <= 500
    resumed = PackedRows([MemorySource(docs), MemorySource(docs[:7])], [0.7, 0.3], [0, 1], VOC, settings,
                         num_rows=10**9, anchor=anchor)
    for row in (500, 501, 777):
        assert resumed.row_plan(row) == full.row_plan(row)
        np.testing.assert_array_equal(resumed[row]["tokens"], full[row]["tokens"])
    with pytest.raises(IndexError, match="before this plan's anchor"):
        resumed.row_plan(anchor[1] - 1)
    assert len(resumed._starts) < len(full._starts)  # nothing before the anchor was planned
