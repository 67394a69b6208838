"""CLAP score of text-to-audio answers: the cosine similarity between the caption's CLAP text
embedding and the generated audio's CLAP audio embedding.

The model is a local directory in the transformers layout (``ClapModel`` weights beside a
``ClapProcessor``: a Roberta tokenizer and a ``ClapFeatureExtractor``); nothing is
downloaded. The 16 kHz answers are resampled (soxr) to the feature extractor's rate
(48 kHz for the LAION checkpoints) before their features are taken.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch

from megatron_ualm.errors import UserError

SOURCE_RATE = 16000


def _embedding(features) -> torch.Tensor:
    """transformers 4 returns the projected embedding, 5 an output whose pooler holds it."""
    return features if isinstance(features, torch.Tensor) else features.pooler_output


class ClapScorer:
    """Scores (caption, 16 kHz waveform) pairs with a local CLAP model; ``option`` names the
    command-line option the directory came from, for the error a wrong directory gives."""

    def __init__(self, directory: str, device: torch.device = torch.device("cpu"), option: str = "--clap"):
        if not os.path.isfile(os.path.join(directory, "config.json")):
            raise UserError(f"{option}: {directory} has no config.json; pass a local CLAP model directory "
                            "(transformers ClapModel + ClapProcessor, saved with save_pretrained)")
        from transformers import ClapModel, ClapProcessor
        self.model = ClapModel.from_pretrained(directory).to(device).eval()
        self.processor = ClapProcessor.from_pretrained(directory)
        self.rate = int(self.processor.feature_extractor.sampling_rate)
        self.device = device

    def resample(self, wave: np.ndarray) -> np.ndarray:
        import soxr
        wave = np.asarray(wave, dtype=np.float32)
        return wave if self.rate == SOURCE_RATE else soxr.resample(wave, SOURCE_RATE, self.rate).astype(np.float32)

    @torch.no_grad()
    def embed_text(self, captions: Sequence[str]) -> torch.Tensor:
        inputs = self.processor(text=list(captions), return_tensors="pt", padding=True).to(self.device)
        return _embedding(self.model.get_text_features(**inputs)).float()

    @torch.no_grad()
    def embed_audio(self, waves_16k: Sequence[np.ndarray]) -> torch.Tensor:
        audio = [self.resample(w) for w in waves_16k]
        state = np.random.get_state()  # the feature extractor crops long clips at random: crop the same way every time
        np.random.seed(0)
        try:
            inputs = self.processor(audio=audio, sampling_rate=self.rate, return_tensors="pt").to(self.device)
        finally:
            np.random.set_state(state)
        return _embedding(self.model.get_audio_features(**inputs)).float()

    def scores(self, captions: Sequence[str], waves_16k: Sequence[np.ndarray]) -> list[float]:
        """Cosine similarity of each (caption, 16 kHz waveform) pair."""
        if not captions:
            return []
        sim = torch.nn.functional.cosine_similarity(self.embed_text(captions), self.embed_audio(waves_16k), dim=-1)
        return sim.cpu().tolist()
