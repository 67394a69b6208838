"""The audio codec (X-Codec, ``transformers.XcodecModel``): 16 kHz waveforms <-> codes [K, T].

Loaded from a local HuggingFace directory only (``local_files_only``; nothing is downloaded),
or built as a tiny random instance for tests and the demo (:func:`tiny_codec_config`,
:func:`save_tiny_codec`).

Batching: X-Codec is not causal and has no padding mask (its HuBERT semantic branch uses
group norm over time and global attention), so zero-padding a clip changes its codes.
:meth:`Codec.encode` therefore only batches clips of exactly the same length; clips of other
lengths are encoded in their own batches. Datasets of fixed-length crops (ETTA's 10 s) batch
fully. ``tests/test_codec.py`` checks that a clip's codes in a batch equal its codes alone.

On GPU, cuDNN's TF32 convolutions make a clip's codes depend on the batch it is in (0.4% of
codes differed on an H200, random X-Codec weights); in fp32 the wrapper therefore turns TF32
off while encoding (exact, ~1,100x real time on an H200 vs ~1,750x with TF32) unless
``allow_tf32=True``. bf16 changes about half the codes relative to fp32 and is opt-in.
"""
from __future__ import annotations

import contextlib
import math
import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

SAMPLE_RATE = 16000
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def tiny_codec_config(num_codebooks: int = 8, codebook_size: int = 1024):
    """An ``XcodecConfig`` of ~80k parameters with X-Codec's interface: 16 kHz, hop 320
    (50 frames/s), ``num_codebooks`` x ``codebook_size`` codes (8 x 1024 like the real one)."""
    from transformers import XcodecConfig

    frame_rate, nbits = 50, math.ceil(math.log2(codebook_size))
    # XcodecConfig derives K from the top bandwidth: K = 1000 * bw // (frame_rate * nbits).
    bandwidth = num_codebooks * frame_rate * nbits / 1000 + 1e-6
    return XcodecConfig(
        target_bandwidths=[bandwidth], codebook_size=codebook_size, codebook_dim=16,
        acoustic_model_config=dict(
            encoder_hidden_size=4, decoder_hidden_size=32, hidden_size=8,
            downsampling_ratios=[8, 5, 4, 2], upsampling_ratios=[8, 5, 4, 2],
            n_codebooks=1, codebook_size=16, codebook_dim=4),
        semantic_model_config=dict(
            model_type="hubert", hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=16, conv_dim=[8] * 7, num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=2, hidden_dropout=0.0, activation_dropout=0.0,
            attention_dropout=0.0, layerdrop=0.0, feat_proj_dropout=0.0, apply_spec_augment=False),
    )


def build_tiny_codec(num_codebooks: int = 8, codebook_size: int = 1024, seed: int = 0):
    """A random ``XcodecModel`` from :func:`tiny_codec_config`, in eval mode.

    The codebooks are filled with seeded Gaussian vectors (HF initialises them to zeros,
    which would map every frame to code 0)."""
    from transformers import XcodecModel

    config = tiny_codec_config(num_codebooks, codebook_size)
    if config.num_quantizers != num_codebooks:
        raise AssertionError(f"tiny codec config gives K={config.num_quantizers}, wanted {num_codebooks}")
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = XcodecModel(config).eval()
    with torch.no_grad():
        for q in model.quantizer.quantizers:
            embed = torch.randn(q.codebook.embed.shape, generator=gen)
            q.codebook.embed.copy_(embed)
            q.codebook.embed_avg.copy_(embed)
    return model


def random_default_codec(seed: int = 0):
    """``XcodecModel(XcodecConfig())`` with random weights and codebooks spread by a normal draw:
    the real architecture (160.7M parameters) for speed measurements, which do not depend on
    the weights."""
    from transformers import XcodecConfig, XcodecModel
    torch.manual_seed(seed)
    model = XcodecModel(XcodecConfig()).eval()
    with torch.no_grad():
        for q in model.quantizer.quantizers:
            q.codebook.embed.normal_()
    return model


def save_tiny_codec(out_dir: str | os.PathLike, num_codebooks: int = 8, codebook_size: int = 1024,
                    seed: int = 0) -> str:
    """Write a tiny random codec as a local HF directory (config.json + safetensors)."""
    out_dir = os.fspath(out_dir)
    build_tiny_codec(num_codebooks, codebook_size, seed).save_pretrained(out_dir)
    return out_dir


def codec_config(path: str | os.PathLike):
    """The ``XcodecConfig`` of a local codec directory ("tiny": the tiny one), no weights loaded."""
    path = os.fspath(path)
    if path == "tiny":
        return tiny_codec_config()
    from transformers import XcodecConfig
    if not os.path.isdir(path):
        raise FileNotFoundError(f"codec directory {path} does not exist; pass a local HF "
                                "directory holding an XcodecModel (nothing is downloaded)")
    return XcodecConfig.from_pretrained(path, local_files_only=True)


@dataclass(frozen=True)
class CodecInfo:
    num_codebooks: int   # K
    codebook_size: int   # C
    hop_length: int      # samples per frame at 16 kHz
    frame_rate: float    # frames per second


class Codec:
    """Encode 16 kHz mono float clips to codes [K, T] and decode codes back to audio.

    path: a local HF directory holding an ``XcodecModel``; ``"tiny"`` builds a random tiny one
    in memory. device: "cpu", "cuda", "cuda:1", ... dtype: "fp32" (default; codes are the
    reference) or "bf16"/"fp16" (faster on GPU; codes may differ from fp32 at near ties).
    """

    def __init__(self, path: str | os.PathLike = "tiny", device: str = "cpu", dtype: str = "fp32",
                 allow_tf32: bool = False, cudnn_benchmark: bool = False, model=None):
        if dtype not in DTYPES:
            raise ValueError(f"codec dtype {dtype!r} not in {sorted(DTYPES)}")
        self.path = os.fspath(path)
        if model is not None:  # an XcodecModel already in memory (benchmarks); path is its label
            pass
        elif self.path == "tiny":
            model = build_tiny_codec()
        else:
            from transformers import XcodecModel
            if not os.path.isdir(self.path):
                raise FileNotFoundError(f"codec directory {self.path} does not exist; pass a local "
                                        "HF directory holding an XcodecModel (nothing is downloaded)")
            model = XcodecModel.from_pretrained(self.path, local_files_only=True)
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        self.allow_tf32 = allow_tf32
        self.cudnn_benchmark = cudnn_benchmark
        self.model = model.to(self.device, self.dtype).eval()
        cfg = self.model.config
        if cfg.sample_rate != SAMPLE_RATE:
            raise ValueError(f"{self.path}: codec sample rate {cfg.sample_rate}, expected {SAMPLE_RATE}")
        self.info = CodecInfo(int(cfg.num_quantizers), int(cfg.codebook_size), int(cfg.hop_length),
                              float(cfg.frame_rate))

    @property
    def num_codebooks(self) -> int:
        return self.info.num_codebooks

    @property
    def codebook_size(self) -> int:
        return self.info.codebook_size

    @property
    def min_samples(self) -> int:
        """Shortest clip accepted: one hop (one frame)."""
        return self.info.hop_length

    def identity(self) -> dict:
        """What the sidecar records about the codec (a dataset refuses another codec's codes)."""
        return {"path": os.path.abspath(self.path) if self.path != "tiny" else "tiny",
                "num_codebooks": self.num_codebooks, "codebook_size": self.codebook_size,
                "hop_length": self.info.hop_length, "dtype": str(self.dtype).replace("torch.", ""),
                "tf32": self.allow_tf32}

    @contextlib.contextmanager
    def _precision(self):
        """fp32 on CUDA without TF32 unless allowed (batch-independent codes); with
        ``allow_tf32`` both convolutions and matmuls use it. cuDNN's algorithm search only when
        ``cudnn_benchmark`` is set."""
        if self.device.type != "cuda":
            yield
            return
        exact = self.dtype == torch.float32 and not self.allow_tf32
        matmul = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = not exact  # TF32 when allowed: matmuls too, not only convolutions
        try:
            with torch.backends.cudnn.flags(enabled=True, benchmark=self.cudnn_benchmark, deterministic=False,
                                            allow_tf32=not exact):
                yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = matmul

    @torch.inference_mode()
    def encode(self, clips: Sequence[np.ndarray], batch_size: int = 16) -> list[np.ndarray]:
        """clips: float [n_i] at 16 kHz -> codes int32 [K, T_i] each, in input order.

        Only clips of identical length share a batch (see the module docstring)."""
        out: list[np.ndarray | None] = [None] * len(clips)
        by_length: dict[int, list[int]] = defaultdict(list)
        for i, clip in enumerate(clips):
            clip = np.asarray(clip)
            if clip.ndim != 1:
                raise ValueError(f"clip {i}: expected mono float [n], got shape {list(clip.shape)}")
            if len(clip) < self.min_samples:
                raise ValueError(f"clip {i}: {len(clip)} samples is shorter than one codec frame "
                                 f"({self.min_samples} samples)")
            by_length[len(clip)].append(i)
        for length in sorted(by_length):
            idx = by_length[length]
            for start in range(0, len(idx), batch_size):
                part = idx[start:start + batch_size]
                x = torch.from_numpy(np.stack([np.asarray(clips[i], dtype=np.float32) for i in part]))
                x = x[:, None, :].to(self.device, self.dtype)
                with self._precision():
                    codes = self.model.encode(x, return_dict=False)  # [B, K, T]
                codes = codes.to("cpu", torch.int32).numpy()
                for j, i in enumerate(part):
                    out[i] = codes[j]
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def decode(self, codes: np.ndarray) -> np.ndarray:
        """codes [K, T] in [0, C) -> float32 [T * hop] at 16 kHz."""
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[0] != self.num_codebooks:
            raise ValueError(f"codes must be [K={self.num_codebooks}, T], got {list(codes.shape)}")
        if codes.size and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"codes outside [0, {self.codebook_size}); drop pad codes first")
        c = torch.from_numpy(codes.astype(np.int64))[None].to(self.device)
        audio = self.model.decode(c, return_dict=False)  # [1, 1, samples]
        return audio[0, 0].float().cpu().numpy()
