"""The unified vocabulary: special tokens, text rows, then K codec codebook blocks.

Layout (SPEC section 3), for text vocabulary V_text, K codebooks of C codes each:

    [0, 256)                                 special tokens (<|pad|> = 0, ...), rest unused
    [256, 256 + V_text)                      text-model embedding rows, text id t -> 256 + t
    audio_start + k * (C + 1)                codebook k's pad
    audio_start + k * (C + 1) + 1 + c        codebook k, code c  (0 <= c < C)
    [size, padded_size)                      padding rows for tensor-parallel divisibility

where audio_start = 256 + V_text and size = audio_start + K * (C + 1).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NUM_SPECIAL_SLOTS = 256

SPECIAL_TOKENS: tuple[str, ...] = (
    "<|pad|>", "<|bos|>", "<|eos|>", "<|eot|>",
    "<|system|>", "<|user|>", "<|assistant|>",
    "<|text|>", "<|audio|>", "<|speech|>", "<|image|>", "<|video|>",
    "<|toolcall|>",
)
SPECIAL_IDS: dict[str, int] = {name: i for i, name in enumerate(SPECIAL_TOKENS)}

PAD, BOS, EOS, EOT = 0, 1, 2, 3
SYSTEM, USER, ASSISTANT = 4, 5, 6
TEXT, AUDIO, SPEECH = 7, 8, 9

ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
MODALITY_TOKENS = {"text": TEXT, "audio": AUDIO, "speech": SPEECH}


def pad_to_multiple(n: int, multiple: int) -> int:
    """Smallest m >= n with m % multiple == 0."""
    if multiple <= 0:
        raise ValueError(f"padding multiple must be positive, got {multiple}")
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class UnifiedVocab:
    """Index arithmetic of the unified vocabulary. All ids are rows of one embedding table.

    text_vocab_size: rows of the text model's embedding (151,936 for Qwen2.5-0.5B..3B),
        not the tokenizer's length.
    num_codebooks (K) and codebook_size (C): the codec's (X-Codec: 8 and 1024).
    pad_multiple: the padded size is a multiple of this (e.g. 128 * TP); padded rows are
        never predicted and are stripped on export.
    """

    text_vocab_size: int
    num_codebooks: int = 8
    codebook_size: int = 1024
    pad_multiple: int = 1

    def __post_init__(self):
        for name in ("text_vocab_size", "num_codebooks", "codebook_size", "pad_multiple"):
            if getattr(self, name) <= 0:
                raise ValueError(f"UnifiedVocab.{name} must be positive, got {getattr(self, name)}")

    # --- block boundaries -------------------------------------------------------------
    @property
    def text_offset(self) -> int:
        return NUM_SPECIAL_SLOTS

    @property
    def audio_start(self) -> int:
        return NUM_SPECIAL_SLOTS + self.text_vocab_size

    @property
    def block_size(self) -> int:
        """Rows per codebook block: one pad plus C codes."""
        return self.codebook_size + 1

    @property
    def size(self) -> int:
        """Real rows, before tensor-parallel padding."""
        return self.audio_start + self.num_codebooks * self.block_size

    @property
    def padded_size(self) -> int:
        return pad_to_multiple(self.size, self.pad_multiple)

    def with_pad_multiple(self, multiple: int) -> "UnifiedVocab":
        return UnifiedVocab(self.text_vocab_size, self.num_codebooks, self.codebook_size, multiple)

    def codebook_range(self, k: int) -> tuple[int, int]:
        """[start, end) rows of codebook k's block, its pad included (start is the pad)."""
        self._check_codebook(k)
        start = self.audio_start + k * self.block_size
        return start, start + self.block_size

    def codebook_pad(self, k: int) -> int:
        return self.codebook_range(k)[0]

    @property
    def codebook_pads(self) -> np.ndarray:
        """[K] pad id of each codebook."""
        return np.array([self.codebook_pad(k) for k in range(self.num_codebooks)], dtype=np.int64)

    # --- conversions ------------------------------------------------------------------
    def text_to_unified(self, ids):
        """Text-tokenizer ids -> unified ids (adds 256). Accepts an int or an array."""
        arr = np.asarray(ids, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= self.text_vocab_size):
            raise ValueError(f"text id outside [0, {self.text_vocab_size}): min {arr.min()}, max {arr.max()}")
        out = arr + self.text_offset
        return int(out) if np.ndim(ids) == 0 else out

    def unified_to_text(self, ids):
        arr = np.asarray(ids, dtype=np.int64)
        if arr.size and (arr.min() < self.text_offset or arr.max() >= self.audio_start):
            raise ValueError("id is not a text row")
        out = arr - self.text_offset
        return int(out) if np.ndim(ids) == 0 else out

    def codes_to_unified(self, codes: np.ndarray) -> np.ndarray:
        """Codec codes [K, T] in [0, C) -> unified ids [K, T] (codebook k's block)."""
        codes = np.asarray(codes, dtype=np.int64)
        if codes.ndim != 2 or codes.shape[0] != self.num_codebooks:
            raise ValueError(f"codes must be [K={self.num_codebooks}, T], got {list(codes.shape)}")
        if codes.size and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"codec code outside [0, {self.codebook_size}): min {codes.min()}, max {codes.max()}")
        return codes + (self.codebook_pads + 1)[:, None]

    def unified_to_codes(self, ids: np.ndarray) -> np.ndarray:
        """Unified ids [K, T] -> codes [K, T]; a codebook pad becomes -1."""
        ids = np.asarray(ids, dtype=np.int64)
        codes = ids - (self.codebook_pads + 1)[:, None]
        if ids.size and (codes.min() < -1 or codes.max() >= self.codebook_size):
            raise ValueError("id outside its codebook block")
        return codes

    def kind_of(self, token_id: int) -> str:
        """'special', 'text', 'audio' or 'padding' for one unified id."""
        if 0 <= token_id < NUM_SPECIAL_SLOTS:
            return "special"
        if token_id < self.audio_start:
            return "text"
        if token_id < self.size:
            return "audio"
        if token_id < self.padded_size:
            return "padding"
        raise ValueError(f"id {token_id} outside the vocabulary of {self.padded_size} rows")

    def special_name(self, token_id: int) -> str:
        if 0 <= token_id < len(SPECIAL_TOKENS):
            return SPECIAL_TOKENS[token_id]
        if 0 <= token_id < NUM_SPECIAL_SLOTS:
            return f"<|unused_{token_id}|>"
        raise ValueError(f"id {token_id} is not a special token")

    def _check_codebook(self, k: int):
        if not 0 <= k < self.num_codebooks:
            raise ValueError(f"codebook index {k} outside [0, {self.num_codebooks})")
