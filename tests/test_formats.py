"""The UALM sequence format, row by row (SPEC sections 3 and 4)."""
import numpy as np
import pytest

from megatron_ualm.formats import (AudioRef, UnifiedVocab, apply_delay, build_segments, cfg_dropout,
                                   dump, layout, undo_delay)
from megatron_ualm.formats import templates as T
from megatron_ualm.formats import vocab as V

# A small vocabulary: 100 text rows, K=3 codebooks of C=4 codes.
# specials [0,256) | text [256,356) | cb0 pad 356, codes 357..360 | cb1 pad 361 ... | cb2 pad 366 ...
VOC = UnifiedVocab(text_vocab_size=100, num_codebooks=3, codebook_size=4)
WORDS = {"hi": 10, "yo": 11, "gen": 20, "dog": 21, "what": 30, "a": 31, "more": 32, "b": 33, "describe": 34}


def tok(s):
    return [WORDS[w] for w in s.lower().replace("?", "").split()]


def rows(example):
    return example.tokens.tolist()


# --- vocabulary ---------------------------------------------------------------------------
def test_qwen25_1p5b_vocabulary_matches_spec():
    v = UnifiedVocab(text_vocab_size=151_936, num_codebooks=8, codebook_size=1024)
    assert v.size == 256 + 151_936 + 8 * 1025 == 160_392
    assert [v.special_name(i) for i in range(13)] == [
        "<|pad|>", "<|bos|>", "<|eos|>", "<|eot|>", "<|system|>", "<|user|>", "<|assistant|>",
        "<|text|>", "<|audio|>", "<|speech|>", "<|image|>", "<|video|>", "<|toolcall|>"]
    assert v.special_name(13) == "<|unused_13|>" and v.kind_of(255) == "special"
    assert v.text_to_unified(0) == 256 and v.text_to_unified(151_935) == 152_191
    assert v.audio_start == 152_192
    for k in range(8):
        assert v.codebook_range(k) == (152_192 + k * 1025, 152_192 + (k + 1) * 1025)
        assert v.kind_of(v.codebook_pad(k)) == "audio"
    assert v.codebook_range(7)[1] == v.size
    codes = np.array([[0, 1023]] * 8)
    uni = v.codes_to_unified(codes)
    assert uni[0].tolist() == [152_193, 153_216] and uni[7, 1] == v.size - 1
    np.testing.assert_array_equal(v.unified_to_codes(uni), codes)


def test_tensor_parallel_padding():
    v = UnifiedVocab(151_936, 8, 1024, pad_multiple=128 * 2)
    assert v.padded_size == 160_512 and v.padded_size % 256 == 0
    assert v.kind_of(160_392) == "padding"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        v.kind_of(160_512)


def test_codes_out_of_range_are_refused():
    with pytest.raises(ValueError, match="codec code outside"):
        VOC.codes_to_unified(np.array([[0], [4], [0]]))
    with pytest.raises(ValueError, match="codes must be"):
        VOC.codes_to_unified(np.zeros((2, 5), dtype=int))


# --- delay pattern -----------------------------------------------------------------------
def test_delay_pattern_exact_rows():
    codes = np.array([[0, 1], [2, 3], [1, 1]])
    r = apply_delay(VOC.codes_to_unified(codes), VOC.codebook_pads)
    assert r.tolist() == [[357, 361, 366],
                          [358, 364, 366],
                          [356, 365, 368],
                          [356, 361, 368]]


def test_delay_inverse_is_identity_on_random_codes():
    rng = np.random.default_rng(0)
    for _ in range(200):
        K = int(rng.integers(1, 10))
        T_ = int(rng.integers(0, 60))
        codes = rng.integers(0, 1024, size=(K, T_))
        pads = rng.integers(-5, 0, size=K)
        r = apply_delay(codes, pads)
        assert r.shape == (T_ + K - 1, K)
        np.testing.assert_array_equal(undo_delay(r), codes)


def test_undo_delay_of_truncated_generation():
    codes = np.arange(12).reshape(3, 4)
    r = apply_delay(codes, [-1, -1, -1])[:5]  # generation stopped after 5 rows
    np.testing.assert_array_equal(undo_delay(r, num_frames=3), codes[:, :3])
    with pytest.raises(ValueError):
        undo_delay(r, num_frames=4)


# --- templates ----------------------------------------------------------------------------
def test_text_only_rows():
    ex = layout(build_segments(T.text_only([("user", "hi")], "yo", tok), VOC), VOC)
    B, E, U, A, TX = V.BOS, V.EOS, V.USER, V.ASSISTANT, V.TEXT
    assert [r[0] for r in rows(ex)] == [B, U, TX, 266, E, A, TX, 267, E]
    assert not ex.tokens[:, 1:].any()  # text rows hold <|pad|> in streams 1..K-1
    assert ex.weights[:, 0].tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1]
    assert not ex.weights[:, 1:].any()


def test_loss_on_all_weighs_every_row_but_the_first():
    ex = layout(build_segments(T.text_only([("user", "hi")], "yo", tok), VOC), VOC, loss_on="all")
    assert ex.weights[:, 0].tolist() == [0] + [1] * 8


def test_caption_to_audio_rows_with_delay_corners():
    codes = np.array([[0, 1], [2, 3], [1, 1]])
    msgs = T.caption_to_audio("dog", codes, tok, prompt="gen")
    ex = layout(build_segments(msgs, VOC), VOC)
    third = pytest.approx(1 / 3)
    expected = [
        [V.BOS, 0, 0], [V.USER, 0, 0], [V.TEXT, 0, 0], [276, 0, 0], [277, 0, 0], [V.EOS, 0, 0],
        [V.ASSISTANT, 0, 0], [V.AUDIO, 0, 0],
        [357, 361, 366],  # corners hold each codebook's own pad
        [358, 364, 366],
        [356, 365, 368],
        [356, 361, 368],
        [V.EOS, 0, 0]]
    assert rows(ex) == expected
    w = ex.weights
    assert w[:7].sum() == 0
    assert w[7].tolist() == [1, 0, 0] and w[12].tolist() == [1, 0, 0]
    assert all(x == third for x in w[8:12].ravel())
    assert ex.target_audio_rows == (8, 12)
    # one audio frame weighs like one text token: 4 rows x 3 streams x 1/3 = 4
    assert w[8:12].sum() == pytest.approx(4.0)


def test_multi_turn_audio_qa_rows():
    ref = AudioRef(clip_index=7, num_samples=32_000, num_rows=3)
    conv = [("human", "<sound>\nWhat?"), ("gpt", "a"), ("human", "more?"), ("gpt", "b")]
    ex = layout(build_segments(T.audio_to_conversation(ref, conv, tok), VOC), VOC)
    B, E, EOT, U, A, TX, AU = V.BOS, V.EOS, V.EOT, V.USER, V.ASSISTANT, V.TEXT, V.AUDIO
    assert [r[0] for r in rows(ex)] == [
        B, U, AU, 0, 0, 0, EOT,      # user audio; next message is also the user's -> eot
        U, TX, 286, E,               # user question
        A, TX, 287, E,               # first answer
        U, TX, 288, E,               # second question: every turn is kept
        A, TX, 289, E]
    assert [(s.row, s.num_rows, s.clip_index, s.num_samples) for s in ex.audio_spans] == [(3, 3, 7, 32_000)]
    assert ex.weights[:, 0].tolist() == [0] * 12 + [1, 1, 1] + [0] * 5 + [1, 1, 1]
    assert ex.target_audio_rows is None


def test_interleaved_answer_uses_eot_between_assistant_segments():
    codes = np.zeros((3, 1), dtype=int)
    msgs = [T.Message("user", "text", tok("gen")), T.Message("assistant", "text", tok("yo")),
            T.Message("assistant", "audio", codes)]
    ex = layout(build_segments(msgs, VOC), VOC)
    s0 = [r[0] for r in rows(ex)]
    assert s0[:9] == [V.BOS, V.USER, V.TEXT, 276, V.EOS, V.ASSISTANT, V.TEXT, 267, V.EOT]
    assert s0[-1] == V.EOS


def test_cfg_dropout_keeps_only_the_target_audio():
    codes = np.array([[0, 1], [2, 3], [1, 1]])
    ex = layout(build_segments(T.caption_to_audio("dog", codes, tok, prompt="gen"), VOC), VOC)
    dropped = cfg_dropout(ex)
    assert rows(dropped)[:8] == [[0, 0, 0]] * 8
    assert rows(dropped)[8:] == rows(ex)[8:]
    assert not dropped.weights[:8].any()
    np.testing.assert_array_equal(dropped.weights[8:], ex.weights[8:])
    text_ex = layout(build_segments(T.text_only([("user", "hi")], "yo", tok), VOC), VOC)
    assert cfg_dropout(text_ex) is text_ex


def test_other_task_templates():
    ref = AudioRef(0, 16_000, 2)
    asr = T.speech_to_transcription(ref, "hi", tok, prompt="describe")
    assert [(m.role, m.modality) for m in asr] == [("user", "speech"), ("user", "text"), ("assistant", "text")]
    tts = T.transcription_to_speech("hi", np.zeros((3, 2), int), tok, prompt="gen")
    assert tts[-1].modality == "speech"
    cont = T.audio_only(np.arange(12).reshape(3, 4) % 4, prompt_frames=1)
    segs = build_segments(cont, VOC)
    assert [s.mode for s in segs] == [T.MODE_TEXT, T.MODE_CODEC, T.MODE_TEXT, T.MODE_TEXT_TARGET,
                                      T.MODE_CODEC_TARGET, T.MODE_TEXT_TARGET]
    cap = T.audio_to_caption(ref, "yo", tok, prompt="describe")
    assert cap[0].content == ref


def test_bad_messages_are_refused():
    with pytest.raises(ValueError, match="role"):
        T.Message("robot", "text", [1])
    with pytest.raises(ValueError, match="no assistant"):
        T.audio_to_conversation(AudioRef(0, 1, 1), [("human", "hi")], tok)
    with pytest.raises(ValueError, match="text id outside"):
        build_segments([T.Message("user", "text", [100])], VOC)


def test_dump_is_readable():
    codes = np.array([[0, 1], [2, 3], [1, 1]])
    ex = layout(build_segments(T.caption_to_audio("dog", codes, tok, prompt="gen"), VOC), VOC)
    text = dump(ex, VOC, decode_text=lambda ids: {20: "gen", 21: "dog"}[ids[0]])
    assert "<|assistant|>" in text and "'dog'" in text and "c0:0 c1:pad c2:pad" in text
    ref = AudioRef(3, 8000, 2)
    ex2 = layout(build_segments(T.audio_to_caption(ref, "yo", tok, prompt="describe"), VOC), VOC)
    assert "audio clip 3: 0.50 s -> 2 placeholder rows" in dump(ex2, VOC)
