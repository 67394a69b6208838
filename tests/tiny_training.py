"""A tiny, learnable, self-made training setup for the trainer tests: tokenized datasets
written straight through ``DocumentWriter`` (no tokenizer, codec or audio files needed) and
a matching config."""
from __future__ import annotations

import os

import numpy as np

from megatron_ualm.audio.frames import num_encoder_frames
from megatron_ualm.config import load_config
from megatron_ualm.data.indexed import FORMAT_NAME, FORMAT_VERSION, DocumentWriter
from megatron_ualm.formats import AudioRef, UnifiedVocab, build_segments
from megatron_ualm.formats import templates as T

TEXT_ROWS, K, C = 64, 4, 16
VOCAB = UnifiedVocab(TEXT_ROWS, K, C)


def _meta(task, n):
    return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "task": task,
            "vocab": {"tokenizer_length": TEXT_ROWS, "num_codebooks": K, "codebook_size": C},
            "counts": {"documents": n}}


def write_datasets(root: str, n: int = 40, seed: int = 0) -> dict:
    """Three small datasets whose answers follow from their prompts (so the loss can drop)."""
    rng = np.random.default_rng(seed)
    prefixes = {}
    # text_only: the answer is the question reversed
    w = DocumentWriter(os.path.join(root, "text"), with_audio=False)
    for _ in range(n):
        q = rng.integers(1, TEXT_ROWS, size=int(rng.integers(3, 8))).tolist()
        w.add_document(build_segments([T.Message("user", "text", q), T.Message("assistant", "text", q[::-1])],
                                      VOCAB))
    w.finalize(_meta("text_only", n))
    prefixes["text_only"] = os.path.join(root, "text")
    # caption_to_audio: the codes repeat the caption's first token
    w = DocumentWriter(os.path.join(root, "tta"), with_audio=False)
    for _ in range(n):
        cap = rng.integers(1, TEXT_ROWS, size=3).tolist()
        frames = int(rng.integers(4, 12))
        codes = (np.arange(frames)[None, :] + cap[0] + np.arange(K)[:, None]) % C
        w.add_document(build_segments([T.Message("user", "text", cap), T.Message("assistant", "audio", codes)], VOCAB))
    w.finalize(_meta("caption_to_audio", n))
    prefixes["caption_to_audio"] = os.path.join(root, "tta")
    # audio_to_caption: a sine whose pitch class is the caption
    w = DocumentWriter(os.path.join(root, "a2c"), with_audio=True)
    for _ in range(n):
        label = int(rng.integers(0, 4))
        samples = int(rng.integers(1600, 4000))
        t = np.arange(samples) / 16000
        pcm = (np.sin(2 * np.pi * 200 * (label + 1) * t) * 12000).astype(np.int16)
        clip = w.add_clip(pcm)
        ref = AudioRef(clip, samples, num_encoder_frames(samples))
        w.add_document(build_segments([T.Message("user", "audio", ref), T.Message("user", "text", [5]),
                                       T.Message("assistant", "text", [10 + label])], VOCAB))
    w.finalize(_meta("audio_to_caption", n))
    prefixes["audio_to_caption"] = os.path.join(root, "a2c")
    return prefixes


TINY_YAML = os.path.join(os.path.dirname(__file__), "..", "examples", "tiny.yaml")


def tiny_config(data_root: str, experiment_dir: str, *overrides: str):
    return load_config(TINY_YAML, tiny_overrides(data_root, experiment_dir, *overrides))


def tiny_overrides(data_root: str, experiment_dir: str, *overrides: str) -> list[str]:
    """The key=value settings over examples/tiny.yaml of the tiny run (datasets written first)."""
    prefixes = write_datasets(data_root) if not os.path.exists(os.path.join(data_root, "text.bin")) else {
        "text_only": os.path.join(data_root, "text"), "caption_to_audio": os.path.join(data_root, "tta"),
        "audio_to_caption": os.path.join(data_root, "a2c")}
    train = ", ".join(f"{{path: {p}, task: {t}, weight: 1}}" for t, p in prefixes.items())
    return [
        f"data.train=[{train}]", f"data.valid=[{{path: {prefixes['text_only']}, task: text_only}}]",
        f"model.text_vocab_size={TEXT_ROWS}", f"model.num_codebooks={K}", f"model.codebook_size={C}",
        "data.seq_length=96", "data.num_workers=0", "data.cfg_dropout_prob=0.2",
        "training.micro_batch_size=2", "training.global_batch_size=4", "training.train_iters=6",
        "training.log_interval=1", "training.eval_interval=1000", "optimizer.warmup_iters=2",
        f"checkpoint.experiment_dir={experiment_dir}", "checkpoint.save_interval=2", "checkpoint.keep_last=5",
        *overrides]
