"""Generation engine on a tiny random UALM (CPU): KV cache vs full recompute, guidance,
masks and the delay pattern, left padding, prompts vs training layout, sampling."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from model_batches import tiny_model_cfg

from megatron_ualm.formats import templates as T
from megatron_ualm.formats import vocab as V
from megatron_ualm.formats.delay import apply_delay, undo_delay


@pytest.fixture(scope="module")
def model():
    from megatron_ualm.model.transformer_config import transformer_config_from
    from megatron_ualm.model.ualm_model import UALMModel
    from megatron_ualm.runtime import init_runtime, shutdown_runtime
    init_runtime(device="cpu", seed=3)
    cfg = tiny_model_cfg(init_method_std=0.3)  # peaked logits: greedy choices are far from ties
    yield UALMModel(cfg, transformer_config_from(cfg, None, "fp32")).eval()
    shutdown_runtime()


def tokenize(text: str) -> list[int]:
    return [32 + (ord(c) % 200) for c in text]


def prompt_from(text: str, vocab, modality=None, seed=0, task="text"):
    from megatron_ualm.inference.prompts import build_prompt
    record = {"caption": text} if task == "tta" else {"prompt": text}
    p = build_prompt(record, vocab, tokenize, seed=seed)
    p.modality = modality if task != "tta" else p.modality
    return p


def settings(**kw):
    from megatron_ualm.inference.sampling import GenerationSettings
    base = dict(max_new_rows=24, max_audio_seconds=0.2, batch_size=8)
    return GenerationSettings(**{**base, **kw})


def generate(model, prompts, st, **engine_kw):
    from megatron_ualm.inference.engine import Engine
    return Engine(model, **engine_kw).generate(prompts, st)


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.rows, y.rows)
        assert x.finish_reason == y.finish_reason


def mixed_prompts(vocab):
    return [prompt_from("what is two and two", vocab, None, seed=1),
            prompt_from("hi", vocab, "text", seed=2),
            prompt_from("a dog barks near a river", vocab, seed=3, task="tta"),
            prompt_from("rain", vocab, "speech", seed=4)]


# --- KV cache -------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["graph", "cached"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cached_text_equals_full_recompute(model, temperature, backend):
    prompts = [prompt_from("what is two and two", model.vocab, "text", seed=1),
               prompt_from("hi", model.vocab, "text", seed=2)]
    st = settings(text_temperature=temperature, text_top_k=40, text_top_p=0.9)
    cached = generate(model, prompts, st, backend=backend)
    assert all(len(g.rows) > 1 for g in cached)
    assert_same(cached, generate(model, prompts, st, backend="full"))


@pytest.mark.parametrize("backend", ["graph", "cached"])
def test_cached_audio_with_guidance_equals_full_recompute(model, backend):
    prompts = mixed_prompts(model.vocab)
    st = settings(guidance_scale=3.0)
    cached = generate(model, prompts, st, backend=backend)
    assert any(s.modality != "text" for g in cached for s in g.segments)
    assert all(g.timing["guided"] for g in cached)
    assert_same(cached, generate(model, prompts, st, backend="full"))


# --- guidance -------------------------------------------------------------------------------------
def test_guidance_one_equals_plain_conditional(model):
    prompts = mixed_prompts(model.vocab)
    plain = generate(model, prompts, settings(guidance_scale=1.0))
    assert not plain[0].timing["guided"]
    with_uncond = generate(model, prompts, settings(guidance_scale=1.0), force_uncond=True)
    assert with_uncond[0].timing["guided"]
    assert_same(plain, with_uncond)


def test_joint_cond_uncond_batch_equals_separate_batches(model):
    prompts = mixed_prompts(model.vocab)
    st = settings(guidance_scale=3.0)
    assert_same(generate(model, prompts, st), generate(model, prompts, st, split_guidance=True))
    # and at the level of logits: one prefill of 2B rows vs two of B rows
    from megatron_ualm.inference.forward import CachedForward, left_pad_layout
    lengths = [p.rows.shape[0] for p in prompts]
    B, N, K = len(prompts), max(lengths), model.vocab.num_codebooks
    docs, pos, pads = left_pad_layout(lengths, N + 1, 2 * B, "cpu")
    tokens = torch.zeros(2 * B, N + 1, K, dtype=torch.long)
    for b, p in enumerate(prompts):
        tokens[b, pads[b]:N] = torch.from_numpy(p.rows)
    joint = CachedForward(model, 2 * B, N + 1)(tokens, docs, pos, 0, N)
    cond = CachedForward(model, B, N + 1)(tokens[:B], docs[:B], pos[:B], 0, N)
    uncond = CachedForward(model, B, N + 1)(tokens[B:], docs[B:], pos[B:], 0, N)
    for i in range(2):
        torch.testing.assert_close(joint[i], torch.cat([cond[i], uncond[i]]), atol=1e-5, rtol=1e-5)


def test_uncond_rows_are_pad_until_first_audio_row(model):
    """The unconditional twin sees what CFG dropout shows in training: <|pad|> everywhere
    before the first audio target row, the shared rows from there on."""
    from megatron_ualm.inference.forward import CachedForward
    seen = {}

    class Spy(CachedForward):
        def __call__(self, tokens, docs, positions, start, end, audio=None, masked=True):
            seen["tokens"] = tokens
            return super().__call__(tokens, docs, positions, start, end, audio, masked)

    from megatron_ualm.inference import engine as E
    prompts = [prompt_from("a dog barks", model.vocab, seed=5, task="tta")]
    old = E.BACKENDS["cached"]
    E.BACKENDS["cached"] = Spy
    try:
        gen = generate(model, prompts, settings(), backend="cached")[0]
    finally:
        E.BACKENDS["cached"] = old
    tokens = seen["tokens"]
    n = prompts[0].rows.shape[0]
    first_audio = n + 1  # after the forced <|audio|> row
    assert gen.rows[0, 0] == V.AUDIO
    assert (tokens[1, :first_audio] == 0).all()
    total = n + len(gen.rows)
    torch.testing.assert_close(tokens[1, first_audio:total], tokens[0, first_audio:total])


# --- masks and the delay pattern ------------------------------------------------------------------
def test_generated_rows_stay_in_their_blocks_and_undo_delay(model):
    vocab, K = model.vocab, model.vocab.num_codebooks
    prompts = [prompt_from(f"sound number {i}", vocab, seed=10 + i, task="tta") for i in range(6)]
    prompts += [prompt_from(f"question {i}", vocab, None, seed=20 + i) for i in range(2)]
    st = settings(audio_temperature=1.5, audio_top_k=0, max_new_rows=40, max_audio_seconds=0.3)
    gens = generate(model, prompts, st)
    complete = 0
    for g in gens:
        for seg in g.segments:
            if seg.modality == "text":
                assert all(1 <= t < len(V.SPECIAL_TOKENS) or vocab.text_offset <= t < vocab.audio_start
                           for t in seg.ids)
                continue
            rows = np.asarray(seg.rows).reshape(-1, K)
            for k in range(K):
                lo, hi = vocab.codebook_range(k)
                assert ((rows[:, k] >= lo) & (rows[:, k] < hi)).all(), f"stream {k} left its block"
                assert (rows[:k, k] == lo).all(), "start corner not padded"
            T_ = seg.num_frames
            if T_ is None:
                continue
            complete += 1
            assert len(rows) == T_ + K - 1 and seg.end in (V.EOS, V.EOT)
            codes = undo_delay(rows, T_)
            assert (codes != vocab.codebook_pads[:, None]).all(), "a pad inside the frames"
            np.testing.assert_array_equal(apply_delay(codes, vocab.codebook_pads), rows)
            assert T_ <= st.max_audio_frames
    assert complete >= 3


def test_forced_end_at_max_audio_frames(model):
    vocab, K = model.vocab, model.vocab.num_codebooks
    gens = generate(model, [prompt_from("long", vocab, seed=7, task="tta")],
                    settings(max_audio_seconds=0.04, min_audio_frames=2, max_new_rows=30))
    seg = gens[0].segments[0]
    assert seg.num_frames == 2 and len(seg.rows) == 2 + K - 1
    assert gens[0].rows[1 + len(seg.rows), 0] in (V.EOS, V.EOT)


# --- batching -------------------------------------------------------------------------------------
def test_left_padded_batch_equals_each_request_alone(model):
    prompts = mixed_prompts(model.vocab)
    st = settings()
    batched = generate(model, prompts, st)
    for p, g in zip(prompts, batched):
        alone = generate(model, [p], st)[0]
        np.testing.assert_array_equal(alone.rows, g.rows)


def test_same_seed_same_output_other_seed_differs(model):
    vocab = model.vocab
    st = settings(max_new_rows=16)
    a = generate(model, [prompt_from("owl", vocab, seed=1, task="tta")], st)
    b = generate(model, [prompt_from("owl", vocab, seed=1, task="tta")], st)
    c = generate(model, [prompt_from("owl", vocab, seed=2, task="tta")], st)
    assert_same(a, b)
    assert not np.array_equal(a[0].rows, c[0].rows)


# --- prompts --------------------------------------------------------------------------------------
def test_prompt_rows_are_the_training_rows_before_the_answer(model):
    vocab, K = model.vocab, model.vocab.num_codebooks
    codes = np.zeros((K, 3), dtype=np.int64)
    train = T.layout(T.build_segments(T.caption_to_audio("a cat", codes, tokenize), vocab), vocab)
    p = prompt_from("a cat", vocab, task="tta")
    n = p.rows.shape[0]
    np.testing.assert_array_equal(p.rows, train.tokens[:n])
    assert train.tokens[n, 0] == V.AUDIO and train.target_audio_rows[0] == n + 1
    assert p.modality == "audio"
    text = T.layout(T.build_segments(T.text_only([("user", "q?")], "yes", tokenize), vocab), vocab)
    p = prompt_from("q?", vocab)
    np.testing.assert_array_equal(p.rows, text.tokens[:p.rows.shape[0]])
    assert p.modality is None


def test_filter_logits_top_k_and_top_p():
    from megatron_ualm.inference.sampling import filter_logits
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(filter_logits(logits, 1.0, 2, 1.0))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(filter_logits(logits, 1.0, 0, 0.7))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(filter_logits(logits, 1.0, 0, 0.4))
    assert kept.tolist() == [[True, False, False, False]]


def test_segment_codes_of_cut_segments_keep_complete_frames(model):
    from megatron_ualm.inference.outputs import segment_codes
    from megatron_ualm.inference.state import Segment
    vocab, K = model.vocab, model.vocab.num_codebooks
    codes = np.arange(5 * K).reshape(K, 5) % vocab.codebook_size
    rows = apply_delay(vocab.codes_to_unified(codes), vocab.codebook_pads)  # 5 + K - 1 rows
    whole = Segment("audio", rows=rows.tolist(), num_frames=5, end=V.EOS)
    np.testing.assert_array_equal(segment_codes(whole, vocab), codes)
    cut = Segment("audio", rows=rows[:6].tolist(), num_frames=5)  # budget hit in the end corner
    np.testing.assert_array_equal(segment_codes(cut, vocab), codes[:, :6 - K + 1])
    open_ = Segment("audio", rows=rows[:K + 1].tolist())  # budget hit before the end was chosen
    np.testing.assert_array_equal(segment_codes(open_, vocab), codes[:, :2])


def test_text_rows_stay_inside_the_tokenizer(model):
    vocab = model.vocab
    prompts = [prompt_from(f"say something {i}", vocab, "text", seed=30 + i) for i in range(4)]
    gens = generate(model, prompts, settings(text_temperature=2.0, max_new_rows=30), tokenizer_size=40)
    ids = [t for g in gens for s in g.segments for t in s.ids]
    assert len(ids) > 20
    assert all(t in (V.EOS, V.EOT) or 1 <= t < len(V.SPECIAL_TOKENS) or 256 <= t < 256 + 40 for t in ids)
