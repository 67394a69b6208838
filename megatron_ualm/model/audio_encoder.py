"""Continuous audio input: log-mel -> (frozen) audio encoder -> adapter -> LM width.

``AudioEncoder(waveforms, num_samples)`` turns N zero-padded 16 kHz clips into the
embeddings of their placeholder rows: exactly ``audio.frames.num_encoder_frames(n)``
frames per clip (asserted), concatenated in clip order.

* Features: Whisper-style 128-bin log-mel computed in torch (n_fft 400, hop 160, Hann,
  power spectrum, Slaney mel filters up to 8 kHz, log10, floor at max - 8, (x + 4) / 4,
  the trailing STFT frame dropped), so a clip of n samples gives n // 160 frames.
* Windows: a clip longer than ``window_seconds`` is cut into windows (``frames.window_sizes``)
  that are featurised and encoded independently; their frames are concatenated. Nothing is
  truncated.
* ``kind="qwen2_5_omni"`` (default): transformers ``Qwen2_5OmniAudioEncoder``; every window
  is one entry of its ``feature_lens`` (the tower chunks, convolves with stride 2 and
  average-pools by 2 itself: 25 frames/s). Output width ``config.output_dim``.
* ``kind="whisper"``: transformers ``WhisperEncoder``; each window is zero-padded to the
  encoder's fixed input (as Whisper does), encoded (50 frames/s), cut to the window's real
  frames and average-pooled by 2 (25 frames/s, as Qwen2-Audio / AF-Whisper). Width ``d_model``.
* Weights: ``path`` is a LOCAL directory for ``from_pretrained`` holding the encoder alone
  (``Qwen2_5OmniAudioEncoder`` / ``WhisperEncoder`` ``save_pretrained`` layout); nothing is
  downloaded. ``path=None`` builds a tiny random instance from a config (tests, demos;
  ``EncoderConfig.tiny`` overrides its fields).
* Frozen (default): ``requires_grad=False`` (so no gradient, no optimizer state, no DDP
  buffer), kept in eval mode whatever ``train()`` says, run under ``no_grad``.
* Adapter: ``Linear(encoder width -> hidden_size)`` with bias, always trainable.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from megatron_ualm.audio.frames import (
    HOP_LENGTH, SAMPLE_RATE, frames_of_mel, mel_frames, num_encoder_frames, window_sizes,
)

N_FFT = 400
NUM_MEL_BINS = 128
ENCODER_KINDS = ("qwen2_5_omni", "whisper")

TINY_QWEN2_5_OMNI = dict(d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64,
                         output_dim=48, num_mel_bins=NUM_MEL_BINS, n_window=100, max_source_positions=1500)
TINY_WHISPER = dict(d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64,
                    num_mel_bins=NUM_MEL_BINS)


@functools.lru_cache(maxsize=4)
def _mel_filters(num_mel_bins: int) -> np.ndarray:
    from transformers.audio_utils import mel_filter_bank
    return mel_filter_bank(num_frequency_bins=1 + N_FFT // 2, num_mel_filters=num_mel_bins, min_frequency=0.0,
                           max_frequency=8000.0, sampling_rate=SAMPLE_RATE, norm="slaney", mel_scale="slaney")


def log_mel(waveform: Tensor, num_mel_bins: int = NUM_MEL_BINS) -> Tensor:
    """Whisper-style log-mel of one clip. waveform: float [n] at 16 kHz -> float32 [mel, n // 160]."""
    x = waveform.float()
    window = torch.hann_window(N_FFT, device=x.device)
    stft = torch.stft(x, N_FFT, HOP_LENGTH, window=window, return_complex=True)
    power = stft[..., :-1].abs().pow(2)
    filters = torch.from_numpy(_mel_filters(num_mel_bins)).to(device=x.device, dtype=torch.float32)
    mel = filters.t() @ power
    logm = torch.clamp(mel, min=1e-10).log10()
    logm = torch.maximum(logm, logm.max() - 8.0)
    return (logm + 4.0) / 4.0


def build_hf_encoder(kind: str, path: Optional[str], tiny: Optional[dict] = None,
                     window_seconds: float = 30.0) -> tuple[nn.Module, int]:
    """(encoder module, output width). Local ``path`` only; random tiny instance when None."""
    if kind == "qwen2_5_omni":
        from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniAudioEncoderConfig
        from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniAudioEncoder as cls
        cfg_cls, defaults = Qwen2_5OmniAudioEncoderConfig, TINY_QWEN2_5_OMNI
    elif kind == "whisper":
        from transformers import WhisperConfig as cfg_cls
        from transformers.models.whisper.modeling_whisper import WhisperEncoder as cls
        defaults = dict(TINY_WHISPER, max_source_positions=int(round(window_seconds * SAMPLE_RATE / HOP_LENGTH)) // 2)
    else:
        raise ValueError(f"encoder kind {kind!r} not in {ENCODER_KINDS}")
    if path is not None:
        model = cls.from_pretrained(path, local_files_only=True, attn_implementation="sdpa")
    else:
        config = cfg_cls(**{**defaults, **(tiny or {})})
        model = cls._from_config(config, attn_implementation="sdpa")
    width = model.config.output_dim if kind == "qwen2_5_omni" else model.config.d_model
    if model.config.num_mel_bins != NUM_MEL_BINS:
        raise ValueError(f"the encoder expects {model.config.num_mel_bins} mel bins; features have {NUM_MEL_BINS}")
    return model, width


class AudioEncoder(nn.Module):
    """waveforms float [N, L], num_samples int [N] -> frames [sum_i F_i, hidden_size],
    F_i = num_encoder_frames(num_samples[i], window_seconds).

    encoder_cfg: ``megatron_ualm.config.EncoderConfig`` (kind, path, frozen, window_seconds, tiny).
    """

    def __init__(self, encoder_cfg, hidden_size: int, init_std: float = 0.02, dtype=torch.float32,
                 device=None):
        super().__init__()
        self.kind = encoder_cfg.kind
        self.window_seconds = float(encoder_cfg.window_seconds)
        self.frozen = bool(encoder_cfg.frozen)
        self.encoder, self.encoder_width = build_hf_encoder(self.kind, encoder_cfg.path, encoder_cfg.tiny,
                                                            self.window_seconds)
        self.adapter = nn.Linear(self.encoder_width, hidden_size, bias=True, device=device, dtype=dtype)
        nn.init.normal_(self.adapter.weight, mean=0.0, std=init_std)
        nn.init.zeros_(self.adapter.bias)
        if device is not None:
            self.encoder.to(device)
        if self.frozen:
            self.encoder.requires_grad_(False)
            self.encoder.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.encoder.eval()
        return self

    def frame_counts(self, num_samples: Sequence[int]) -> list[int]:
        return [num_encoder_frames(int(n), self.window_seconds) for n in num_samples]

    def encode(self, waveforms: Tensor, num_samples: Sequence[int]) -> Tensor:
        """Encoder output before the adapter: [sum_i F_i, encoder_width]."""
        windows = []  # (clip, start, length) in samples
        for i, n in enumerate(num_samples):
            start = 0
            for size in window_sizes(int(n), self.window_seconds):
                windows.append((i, start, size))
                start += size
        dtype = next(self.encoder.parameters()).dtype
        if not windows:
            return waveforms.new_zeros(0, self.encoder_width, dtype=dtype)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            if self.kind == "qwen2_5_omni":
                mels = [log_mel(waveforms[i, s:s + n]) for i, s, n in windows]
                feats = torch.cat(mels, dim=1).to(dtype)
                lens = torch.tensor([m.shape[1] for m in mels], dtype=torch.long, device=feats.device)
                out = self.encoder(input_features=feats, feature_lens=lens).last_hidden_state
            else:
                out = self._encode_whisper(waveforms, windows, dtype)
        return out

    def _encode_whisper(self, waveforms: Tensor, windows, dtype) -> Tensor:
        window = int(round(self.window_seconds * SAMPLE_RATE))
        mels = []
        for i, s, n in windows:
            x = waveforms[i, s:s + n].float()
            mels.append(log_mel(torch.nn.functional.pad(x, (0, window - n))))
        hidden = self.encoder(input_features=torch.stack(mels).to(dtype)).last_hidden_state  # [W, T, d]
        outs = []
        for (_, _, n), h in zip(windows, hidden):
            after_conv = (mel_frames(n) - 1) // 2 + 1
            pooled = frames_of_mel(mel_frames(n))
            h = h[:after_conv]
            outs.append((h[0:2 * pooled:2] + h[1:2 * pooled:2]) / 2)
        return torch.cat(outs, dim=0)

    def forward(self, waveforms: Tensor, num_samples: Tensor | Sequence[int]) -> Tensor:
        """num_samples: int tensor [N], or the same as host ints (no device sync)."""
        if isinstance(num_samples, Tensor):
            num_samples = num_samples.tolist()
        counts = self.frame_counts(num_samples)
        frames = self.encode(waveforms, num_samples)
        if frames.shape[0] != sum(counts):
            raise AssertionError(f"the {self.kind} encoder gave {frames.shape[0]} frames for clips "
                                 f"expecting {counts} (sum {sum(counts)})")
        return self.adapter(frames.to(self.adapter.weight.dtype))
