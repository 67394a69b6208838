"""UALMModel against a plain-PyTorch reference of the same math (single process, CPU).

Reference: transformers' Qwen2 (eager attention, float32) with the same weights through
``hf_adapter``, each packed example run alone from position 0; the multi-stream embedding
and head written out directly; the audio path through WhisperFeatureExtractor and the HF
audio tower called window by window.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model_batches import make_examples, model_inputs, pack, tiny_model_cfg, WINDOW_SECONDS

ATOL = 2e-5


@pytest.fixture(scope="module")
def runtime():
    from megatron_ualm.runtime import init_runtime, shutdown_runtime
    rt = init_runtime(device="cpu", seed=3)
    yield rt
    shutdown_runtime()


@pytest.fixture(scope="module")
def setup(runtime):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from megatron_ualm.model.hf_adapter import hf_to_ualm, qwen2_config_dict, qwen2_shape
    from megatron_ualm.model.transformer_config import transformer_config_from
    from megatron_ualm.model.ualm_model import UALMModel

    cfg = tiny_model_cfg()
    model = UALMModel(cfg, transformer_config_from(cfg, None, "fp32"))
    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(Qwen2Config(**qwen2_config_dict(cfg), attn_implementation="eager")).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():  # make every weight matter (norms, biases too)
            p.add_(torch.randn_like(p) * 0.05)
    full = hf_to_ualm(hf.state_dict(), qwen2_shape(hf.config), model.vocab, init_std=0.05, seed=1)
    missing, unexpected = model.load_state_dict(full, strict=False)
    assert not unexpected
    assert all(k.endswith("_extra_state") or k.startswith("audio_encoder.") for k in missing), missing
    examples, clips = make_examples(model.vocab)
    return model, hf, full, examples, clips


# --- the reference ---------------------------------------------------------------------------------
def _ref_audio(model, clip: np.ndarray) -> torch.Tensor:
    from transformers import WhisperFeatureExtractor
    from megatron_ualm.audio.frames import window_sizes
    fe = WhisperFeatureExtractor(feature_size=128)
    enc = model.audio_encoder.encoder
    outs, start = [], 0
    for size in window_sizes(len(clip), WINDOW_SECONDS):
        mel = fe(clip[start:start + size], sampling_rate=16000, return_tensors="pt",
                 padding="longest").input_features[0]
        outs.append(enc(input_features=mel, feature_lens=torch.tensor([mel.shape[1]])).last_hidden_state)
        start += size
    return model.audio_encoder.adapter(torch.cat(outs))


@torch.no_grad()
def reference(model, hf, full, batch):
    """Per-position CE [B, S, K] (0 where weight 0), stream-0 logits [B, S, Vpad] and block
    logits [B, S, K-1, C+1], every example run alone."""
    from megatron_ualm.model.hf_adapter import EMBEDDING, HEAD, STREAMS
    vocab = model.vocab
    E, W, e = full[EMBEDDING], full[HEAD], full[STREAMS]
    tokens, labels, weights = batch["tokens"], batch["labels"], batch["loss_weights"]
    B, S, K = tokens.shape
    ce = torch.zeros(B, S, K)
    logits0 = torch.full((B, S, vocab.padded_size), float("-inf"))
    all_audio = model.head.audio_head == "all_audio"
    width = vocab.size - vocab.audio_start if all_audio else vocab.block_size
    blocks = torch.zeros(B, S, K - 1, width)
    spans = batch["audio_rows"].tolist()
    for b in range(B):
        docs = batch["document_ids"][b]
        for d in sorted(set(docs.tolist()) - {-1}):
            idx = torch.nonzero(docs == d).squeeze(1)
            start = int(idx[0])
            x = E[tokens[b, idx]].sum(1)
            for i, (bb, row, n) in enumerate(spans):
                if bb == b and start <= row < start + len(idx):
                    clip = batch["audio_waveforms"][i, :batch["audio_num_samples"][i]].numpy()
                    x[row - start:row - start + n] = _ref_audio(model, clip)
            h = hf.model(inputs_embeds=x[None], position_ids=torch.arange(len(idx))[None]).last_hidden_state[0]
            l0 = h @ W.t()
            l0[:, vocab.size:] = float("-inf")
            logits0[b, idx] = l0
            ce[b, idx, 0] = -F.log_softmax(l0, -1).gather(1, labels[b, idx, 0:1])[:, 0]
            for k in range(1, K):
                lo, hi = (vocab.audio_start, vocab.size) if all_audio else vocab.codebook_range(k)
                lk = (h + e[k - 1]) @ W[lo:hi].t()
                blocks[b, idx, k - 1] = lk
                tgt = (labels[b, idx, k] - lo).clamp(0, hi - lo - 1)
                ce[b, idx, k] = -F.log_softmax(lk, -1).gather(1, tgt[:, None])[:, 0]
    ce = torch.where(weights > 0, ce, torch.zeros_like(ce))
    return ce, logits0, blocks


def _check(model, hf, full, batch):
    from megatron_ualm.model.batch import validate_batch
    from megatron_ualm.model.loss import ualm_loss
    validate_batch(batch, model.vocab, WINDOW_SECONDS)
    ref_ce, ref_l0, ref_blocks = reference(model, hf, full, batch)
    with torch.no_grad():
        out = model(**model_inputs(batch))
        l0, blocks = model.logits(batch["tokens"], batch["position_ids"], batch["document_ids"],
                                  audio_waveforms=batch["audio_waveforms"],
                                  audio_num_samples=batch["audio_num_samples"], audio_rows=batch["audio_rows"])
    w = batch["loss_weights"]
    assert (w > 0).any(dim=(0, 1)).all(), "every stream should carry loss in this batch"
    torch.testing.assert_close(out.ce, ref_ce, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(ualm_loss(out.ce, w), ualm_loss(ref_ce, w), atol=ATOL, rtol=1e-5)
    real = batch["document_ids"] >= 0
    torch.testing.assert_close(l0[real], ref_l0[real], atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(blocks[real], ref_blocks[real], atol=ATOL, rtol=1e-5)
    assert torch.isinf(l0[..., model.vocab.size:]).all()
    # correctness flags agree with the reference argmax where weighted
    ref_ok0 = ref_l0.argmax(-1) == batch["labels"][..., 0]
    sel = w[..., 0] > 0
    assert torch.equal(out.correct[..., 0][sel], ref_ok0[sel])
    assert not out.correct[w == 0].any()


def test_unpacked_batches_match_hf_reference(setup):
    model, hf, full, ex, clips = setup
    S = max(e.num_rows for e in ex.values()) + 3
    batch = pack(list(ex.values()), S, clips, model.vocab.num_codebooks)
    _check(model, hf, full, batch)


def test_packed_batches_match_hf_reference(setup):
    model, hf, full, ex, clips = setup
    rows = [[ex["qa"], ex["text"], ex["tta"]], [ex["tta"], ex["qa"]]]
    S = max(sum(e.num_rows for e in r) for r in rows) + 2
    batch = pack(None, S, clips, model.vocab.num_codebooks, rows_of=rows)
    _check(model, hf, full, batch)


def test_packed_loss_sum_equals_examples_alone(setup):
    from megatron_ualm.model.loss import loss_sums
    model, hf, full, ex, clips = setup
    order = [ex["text"], ex["qa"], ex["tta"]]
    K = model.vocab.num_codebooks
    packed = pack(None, sum(e.num_rows for e in order) + 1, clips, K, rows_of=[order])
    with torch.no_grad():
        num_packed, den_packed = loss_sums(model(**model_inputs(packed)).ce, packed["loss_weights"])
        num_alone = den_alone = 0.0
        for e in order:
            alone = pack([e], e.num_rows, clips, K)
            n, d = loss_sums(model(**model_inputs(alone)).ce, alone["loss_weights"])
            num_alone, den_alone = num_alone + n, den_alone + d
    torch.testing.assert_close(num_packed, torch.as_tensor(num_alone), atol=1e-4, rtol=1e-6)
    assert den_packed == den_alone


def test_pad_row_is_zero_and_gets_no_gradient(setup):
    model, hf, full, ex, clips = setup
    from megatron_ualm.model.loss import ualm_loss
    batch = pack(list(ex.values()), max(e.num_rows for e in ex.values()), clips, model.vocab.num_codebooks)
    model.zero_grad(set_to_none=True)
    out = model(**model_inputs(batch))
    ualm_loss(out.ce, batch["loss_weights"]).backward()
    emb = model.embedding.word_embeddings.weight
    assert torch.count_nonzero(emb[0]) == 0
    assert torch.count_nonzero(emb.grad[0]) == 0
    assert emb.grad.abs().sum() > 0
    # frozen encoder: no gradient; adapter and stream embeddings: gradient
    assert all(p.grad is None and not p.requires_grad for p in model.audio_encoder.encoder.parameters())
    assert model.audio_encoder.adapter.weight.grad.abs().sum() > 0
    assert model.head.stream_embeddings.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_all_audio_head_matches_reference(setup):
    from megatron_ualm.model.transformer_config import transformer_config_from
    from megatron_ualm.model.ualm_model import UALMModel
    model, hf, full, ex, clips = setup
    cfg = tiny_model_cfg(audio_head="all_audio")
    wide = UALMModel(cfg, transformer_config_from(cfg, None, "fp32"))
    wide.load_state_dict(model.state_dict())
    batch = pack(None, 64, clips, wide.vocab.num_codebooks, rows_of=[[ex["tta"], ex["qa"]]])
    _check(wide, hf, full, batch)
