"""Tiny UALM models and batches for the model tests (helpers, not tests).

Examples are built with the real formats (``templates.layout``) so the batches follow the
contract in ``megatron_ualm/model/batch.py``; ``pack`` lays several examples into rows.
"""
from __future__ import annotations

import numpy as np
import torch

from megatron_ualm.audio.frames import SAMPLE_RATE, num_encoder_frames
from megatron_ualm.config import EncoderConfig, ModelConfig
from megatron_ualm.formats import templates as T
from megatron_ualm.formats.vocab import UnifiedVocab

WINDOW_SECONDS = 0.3  # tiny window so a short clip spans several encoder windows


def tiny_model_cfg(**overrides) -> ModelConfig:
    base = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
                kv_channels=16, max_position_embeddings=256, text_vocab_size=300, num_codebooks=4,
                codebook_size=16, init_method_std=0.05, attention_backend="sdpa",
                encoder=EncoderConfig(kind="qwen2_5_omni", path=None, window_seconds=WINDOW_SECONDS))
    base.update(overrides)
    return ModelConfig(**base)


def _text(rng, n, vocab: UnifiedVocab):
    return rng.randint(0, vocab.text_vocab_size, size=n).tolist()


def make_examples(vocab: UnifiedVocab, seed: int = 0):
    """(examples, clips): a text-only, a TTA (discrete audio target) and an audio-QA
    (placeholders) example; clips are the float32 waveforms the audio refs point at."""
    rng = np.random.RandomState(seed)
    K, C = vocab.num_codebooks, vocab.codebook_size
    text = T.layout(T.build_segments(
        T.text_only([("user", "q")], "a", lambda s: _text(rng, 5 if s == "q" else 4, vocab)), vocab), vocab)
    codes = rng.randint(0, C, size=(K, 6))
    tta = T.layout(T.build_segments(T.caption_to_audio("c", codes, lambda s: _text(rng, 4, vocab)), vocab), vocab)
    num_samples = int(0.7 * SAMPLE_RATE)  # three windows of 0.3 s -> 7 + 7 + 2 frames
    clip = (rng.randn(num_samples) * 0.1).astype(np.float32)
    ref = T.AudioRef(0, num_samples, num_encoder_frames(num_samples, WINDOW_SECONDS))
    qa = T.layout(T.build_segments(T.audio_to_caption(ref, "cap", lambda s: _text(rng, 3, vocab)), vocab), vocab)
    return {"text": text, "tta": tta, "qa": qa}, [clip]


def pack(examples, seq_len: int, clips, K: int, rows_of=None):
    """Batch dict from examples: ``rows_of`` lists, per batch row, the examples packed into it
    (default: one example per row). Labels are the next row; the example's weights shift with
    them; the last position of each example predicts nothing."""
    rows_of = rows_of or [[e] for e in examples]
    B = len(rows_of)
    tokens = torch.zeros(B, seq_len, K, dtype=torch.long)
    labels = torch.zeros(B, seq_len, K, dtype=torch.long)
    weights = torch.zeros(B, seq_len, K)
    pos = torch.zeros(B, seq_len, dtype=torch.long)
    docs = torch.full((B, seq_len), -1, dtype=torch.int32)
    spans, wavs = [], []
    for b, row in enumerate(rows_of):
        at = 0
        for d, ex in enumerate(row):
            n = ex.num_rows
            if at + n > seq_len:
                raise ValueError("examples do not fit the row")
            tok = torch.from_numpy(ex.tokens)
            tokens[b, at:at + n] = tok
            labels[b, at:at + n - 1] = tok[1:]
            weights[b, at:at + n - 1] = torch.from_numpy(ex.weights[1:])
            pos[b, at:at + n] = torch.arange(n)
            docs[b, at:at + n] = d
            for s in ex.audio_spans:
                spans.append((b, at + s.row, s.num_rows))
                wavs.append(clips[s.clip_index])
            at += n
    L = max([len(w) for w in wavs], default=1)
    wave = torch.zeros(len(wavs), L)
    for i, w in enumerate(wavs):
        wave[i, :len(w)] = torch.from_numpy(w)
    return {
        "tokens": tokens, "labels": labels, "loss_weights": weights, "position_ids": pos, "document_ids": docs,
        "audio_waveforms": wave, "audio_num_samples": torch.tensor([len(w) for w in wavs], dtype=torch.long),
        "audio_rows": torch.tensor(spans, dtype=torch.long).reshape(-1, 3),
    }


def model_inputs(batch: dict) -> dict:
    """Keyword arguments of UALMModel.forward from a batch dict."""
    keys = ("tokens", "position_ids", "document_ids", "labels", "loss_weights",
            "audio_waveforms", "audio_num_samples", "audio_rows")
    return {k: batch[k] for k in keys}
