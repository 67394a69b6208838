"""Generation-based scores of one task: greedy answers from the inference engine, compared
with the references of ``evaluation.references``.

========================== ==========================================================
task                       scores
========================== ==========================================================
speech_to_transcription    ``wer``, ``cer`` (corpus-level, ``text_scores.ErrorRate``)
text_only,                 ``exact_match``, ``f1`` (SQuAD normalisation, mean over
audio_to_caption,          examples)
audio_to_conversation
caption_to_audio           ``clap`` (mean cosine, ``clap.ClapScorer``) when a CLAP
                           model is given; otherwise a note says it was skipped
others                     none (a note says so)
========================== ==========================================================
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from megatron_ualm.evaluation import text_scores as S
from megatron_ualm.evaluation.references import Reference
from megatron_ualm.inference.engine import Engine
from megatron_ualm.inference.outputs import segment_codes, segment_text
from megatron_ualm.inference.sampling import GenerationSettings

WER_TASKS = ("speech_to_transcription",)
QA_TASKS = ("text_only", "audio_to_caption", "audio_to_conversation")
CLAP_TASKS = ("caption_to_audio",)
SAMPLES_KEPT = 3  # reference/answer pairs per task in the JSON, to eyeball


def scored_tasks() -> tuple:
    return WER_TASKS + QA_TASKS + CLAP_TASKS


def answer_text(generation, vocab, decode) -> str:
    return "".join(segment_text(s, vocab, decode) for s in generation.segments if s.modality == "text")


def answer_audio(generation, vocab, codec) -> np.ndarray:
    """The first audio segment decoded to 16 kHz float32 (empty when there is none)."""
    for seg in generation.segments:
        if seg.modality != "text":
            codes = segment_codes(seg, vocab)
            if codes.shape[1]:
                return np.asarray(codec.decode(codes), dtype=np.float32)
    return np.zeros(0, dtype=np.float32)


def generate_answers(engine: Engine, refs: list[Reference], settings: GenerationSettings,
                     progress=None) -> tuple[list, int]:
    """[(Reference, Generation)] in ``refs`` order for the prompts that fit the model's
    positions, and how many did not fit. Prompts of similar length share a batch."""
    fits = [r for r in refs if engine.max_new_rows(len(r.prompt.rows), settings) > 0]
    order = sorted(range(len(fits)), key=lambda i: len(fits[i].prompt.rows))
    answers: dict[int, object] = {}
    for start in range(0, len(order), settings.batch_size):
        chunk = order[start:start + settings.batch_size]
        for i, gen in zip(chunk, engine.generate([fits[i].prompt for i in chunk], settings)):
            answers[i] = gen
        if progress is not None:
            progress.update(len(chunk))
    return [(fits[i], answers[i]) for i in range(len(fits))], len(refs) - len(fits)


def score_task(task: str, pairs: list, vocab, decode: Callable[[list], str], codec=None,
               clap=None) -> dict:
    """Scores of ``task`` from [(Reference, Generation)]; see the module docstring."""
    out: dict = {"generated": len(pairs)}
    samples = []
    if task in WER_TASKS:
        words, chars = S.ErrorRate(), S.ErrorRate()
        for ref, gen in pairs:
            hyp = answer_text(gen, vocab, decode)
            words.add(S.words(ref.text), S.words(hyp))
            chars.add(S.characters(ref.text), S.characters(hyp))
            samples.append({"reference": ref.text, "answer": hyp})
        out.update(wer=words.rate, cer=chars.rate, reference_words=words.reference_length)
    elif task in QA_TASKS:
        em, f1 = [], []
        for ref, gen in pairs:
            hyp = answer_text(gen, vocab, decode)
            em.append(S.exact_match(ref.text, hyp))
            f1.append(S.token_f1(ref.text, hyp))
            samples.append({"reference": ref.text, "answer": hyp})
        out.update(exact_match=float(np.mean(em)) if em else None, f1=float(np.mean(f1)) if f1 else None)
    elif task in CLAP_TASKS:
        if clap is None:
            out["note"] = "clap skipped: no --clap DIR given"
        else:
            captions, waves = [], []
            for ref, gen in pairs:
                wave = answer_audio(gen, vocab, codec)
                if len(wave):
                    captions.append(ref.caption)
                    waves.append(wave)
                samples.append({"caption": ref.caption, "answer_seconds": len(wave) / 16000})
            sims = clap.scores(captions, waves)
            out.update(clap=float(np.mean(sims)) if sims else None, silent_answers=len(pairs) - len(sims))
    else:
        out["note"] = f"no generation score for {task}"
    if samples:
        out["samples"] = samples[:SAMPLES_KEPT]
    return out
