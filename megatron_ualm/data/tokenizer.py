"""The text tokenizer: a local HuggingFace tokenizer directory, or a small BPE trained here.

Text ids are the tokenizer's own ids, without special tokens added (UALM's special tokens are
the unified vocabulary's first 256 rows, see ``formats.vocab``); the data tools shift them by
256. The model's ``text_vocab_size`` (embedding rows) must be >= ``len(tokenizer)``.
"""
from __future__ import annotations

import hashlib
import os
from typing import Iterable, Sequence

import numpy as np


class TextTokenizer:
    """The Rust tokenizer of a local HF directory, without importing transformers/torch.

    Same ids as ``AutoTokenizer.from_pretrained(path)(text, add_special_tokens=False)``;
    ``len()`` counts added tokens as the HF tokenizer does."""

    def __init__(self, backend, path: str | None = None):
        self.backend = backend  # tokenizers.Tokenizer
        self.path = path

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict:
        return self.backend.get_vocab(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(path: str | os.PathLike) -> TextTokenizer:
    """A local tokenizer directory (never downloads). ``tokenizer.json`` is read directly;
    a directory without one goes through ``AutoTokenizer`` (which must give a fast tokenizer)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory {path} does not exist; pass a local HF "
                                "tokenizer directory (nothing is downloaded)")
    path = os.path.abspath(path)
    tj = os.path.join(path, "tokenizer.json")
    if os.path.exists(tj):
        from tokenizers import Tokenizer
        return TextTokenizer(Tokenizer.from_file(tj), path)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if not tok.is_fast:
        raise ValueError(f"{path}: a fast (Rust) tokenizer is needed (tokenizer.json)")
    return TextTokenizer(tok.backend_tokenizer, path)


def train_tiny_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 512):
    """Train a byte-level BPE of ``vocab_size`` entries on ``texts`` and save it as a
    ``PreTrainedTokenizerFast`` directory. Deterministic for the same texts. Returns it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    fast.save_pretrained(os.fspath(out_dir))
    return fast


def encode_batch(tokenizer, texts: Sequence[str]) -> list[np.ndarray]:
    """Texts -> int32 id arrays, no special tokens added (one Rust batch call)."""
    if not texts:
        return []
    backend = tokenizer.backend if isinstance(tokenizer, TextTokenizer) else tokenizer._tokenizer
    # encode_batch_fast skips character offsets, which we never use (~15% less CPU)
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    enc = encode(list(texts), add_special_tokens=False)
    return [np.asarray(e.ids, dtype=np.int32) for e in enc]


def tokenizer_identity(tokenizer, path: str | None = None) -> dict:
    """Name, length and a hash of the vocabulary: enough to refuse a mismatched dataset."""
    vocab = tokenizer.get_vocab()
    digest = hashlib.sha256("\n".join(f"{t}\t{i}" for t, i in sorted(vocab.items(), key=lambda kv: kv[1]))
                            .encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return {"path": None if path is None else os.path.abspath(os.fspath(path)),
            "length": len(tokenizer), "vocab_sha256": digest}


def check_text_vocab(tokenizer, text_vocab_size: int, where: str = "tokenizer") -> None:
    if len(tokenizer) > text_vocab_size:
        raise ValueError(f"{where} has {len(tokenizer)} entries but text_vocab_size is "
                         f"{text_vocab_size}; set model.text_vocab_size >= {len(tokenizer)}")
