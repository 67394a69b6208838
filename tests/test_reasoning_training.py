"""Reasoning examples train like any other task: a few tiny-trainer steps with a falling, finite
loss, and TP=2 gives the TP=1 loss and gradients on a batch of reasoning examples."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from dist_utils import run_distributed
from megatron_ualm.audio.frames import SAMPLE_RATE, num_encoder_frames
from megatron_ualm.data.indexed import DocumentWriter
from megatron_ualm.formats import AudioRef, build_segments, layout
from megatron_ualm.formats import templates as T
from tiny_training import K, TEXT_ROWS, VOCAB, _meta, tiny_config


def _conversation(r: int, frames: int, ref_of):
    """Request r; the first clip is one code off, the critique names r, the revision fits."""
    ramp = np.arange(frames)[None, :] + np.arange(K)[:, None]
    codes = {"a": (ramp + r + 1) % VOCAB.codebook_size, "b": (ramp + r) % VOCAB.codebook_size}
    turns = [("user", [("text", "req")]),
             ("assistant", [("text", "plan"), ("audio_out", "a"), ("audio_in", "a"), ("text", "crit"),
                            ("audio_out", "b")])]
    words = {"req": [5, 6 + r], "plan": [20 + r, 30], "crit": [40 + r]}
    return T.reasoning(turns, words.__getitem__, codes.__getitem__, ref_of)


def _sine(r: int, samples: int) -> np.ndarray:
    return (np.sin(2 * np.pi * 200 * (r + 1) * np.arange(samples) / SAMPLE_RATE) * 0.4).astype(np.float32)


def write_reasoning_dataset(prefix: str, n: int = 24, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    w = DocumentWriter(prefix, with_audio=True)
    for _ in range(n):
        r, frames, samples = int(rng.integers(0, 6)), int(rng.integers(3, 6)), int(rng.integers(1600, 3200))
        clip = w.add_clip((_sine(r, samples) * 32767).astype(np.int16))
        ref = AudioRef(clip, samples, num_encoder_frames(samples))
        w.add_document(build_segments(_conversation(r, frames, lambda _: ref), VOCAB))
    w.finalize(_meta("reasoning", n))
    return prefix


def test_tiny_trainer_learns_reasoning_examples(tmp_path):
    from megatron_ualm.training.loop import pretrain
    prefix = write_reasoning_dataset(str(tmp_path / "reason"))
    exp = tmp_path / "run"
    cfg = tiny_config(str(tmp_path / "data"), str(exp), "training.train_iters=12", "checkpoint.save_interval=100",
                      f"data.train=[{{path: {prefix}, task: reasoning, weight: 1}}]",
                      "data.seq_length=128", "optimizer.lr=3e-3")
    assert TEXT_ROWS >= 46
    pretrain(cfg)
    rows = [json.loads(line) for line in (exp / "logs" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r.get("kind") == "train"]
    loss = [r["loss"] for r in train]
    assert len(loss) == 12 and all(np.isfinite(loss))
    assert np.mean(loss[-3:]) < 0.8 * np.mean(loss[:3]), loss
    assert any(k.startswith("loss/reasoning") for k in train[-1]), sorted(train[-1])


# --- TP=2 == TP=1 on reasoning rows (the test_model_parallel harness, another batch) -------------
def _reasoning_batch(vocab, seq_len):
    from model_batches import pack
    rng = np.random.RandomState(3)
    C = vocab.codebook_size
    samples = int(0.3 * SAMPLE_RATE)  # one encoder window: the example fits 48 rows
    clips = [(rng.randn(samples) * 0.1).astype(np.float32)]
    from model_batches import WINDOW_SECONDS
    ref = AudioRef(0, samples, num_encoder_frames(samples, WINDOW_SECONDS))
    codes = {"a": rng.randint(0, C, size=(vocab.num_codebooks, 3)), "b": rng.randint(0, C, size=(vocab.num_codebooks, 2))}
    turns = [("user", [("text", "q")]),
             ("assistant", [("text", "p"), ("audio_out", "a"), ("audio_in", "a"), ("text", "c"), ("audio_out", "b")])]
    text = lambda s: rng.randint(0, vocab.text_vocab_size, size=3).tolist()  # noqa: E731
    ex = layout(build_segments(T.reasoning(turns, text, codes.__getitem__, lambda _: ref), vocab), vocab)
    assert ex.num_rows <= seq_len
    return pack(None, seq_len, clips, vocab.num_codebooks, rows_of=[[ex], [ex]])


def _run_on_reasoning(tp: int):
    import test_model_parallel as parallel
    parallel._batch = _reasoning_batch
    return parallel._run(tp, 1, False)


@pytest.mark.slow
def test_tensor_parallel_matches_single_process_on_reasoning_rows():
    import test_model_parallel as parallel
    parallel._compare(run_distributed(_run_on_reasoning, 2, 2), run_distributed(_run_on_reasoning, 1, 1))
