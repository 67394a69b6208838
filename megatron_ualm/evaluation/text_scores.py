"""Scores of a generated text against its reference: WER / CER and SQuAD-style exact match
and token F1. Pure functions over strings.

Normalisation (both sides, before any comparison): lower case, punctuation removed,
the articles "a", "an", "the" dropped (SQuAD only, not for WER), whitespace collapsed.
WER and CER are corpus-level: the edits of every example summed, divided by the summed
reference lengths (``ErrorRate``), so a long utterance weighs more than a short one.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalise(text: str, drop_articles: bool = False) -> str:
    """Lower case, punctuation removed (apostrophes too: "don't" -> "dont"), whitespace
    collapsed; with ``drop_articles`` also "a", "an", "the" removed (SQuAD's rule)."""
    text = _PUNCT.sub("", text.lower())
    if drop_articles:
        text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def edit_distance(ref: Sequence, hyp: Sequence) -> int:
    """Levenshtein distance: substitutions + deletions + insertions turning ``ref`` into ``hyp``."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


@dataclass
class ErrorRate:
    """Running word (or character) error rate: summed edits / summed reference length."""
    edits: int = 0
    reference_length: int = 0

    def add(self, reference: Sequence, hypothesis: Sequence) -> int:
        d = edit_distance(reference, hypothesis)
        self.edits += d
        self.reference_length += len(reference)
        return d

    @property
    def rate(self) -> float:
        """edits / reference length; an empty reference with edits counts as 1 per edit."""
        return self.edits / max(self.reference_length, 1)


def words(text: str) -> list[str]:
    return normalise(text).split()


def characters(text: str) -> list[str]:
    """Characters of the normalised text, spaces excluded (CER over letters)."""
    return list(normalise(text).replace(" ", ""))


def wer(reference: str, hypothesis: str) -> float:
    """Word error rate of one pair (normalised words)."""
    e = ErrorRate()
    e.add(words(reference), words(hypothesis))
    return e.rate


def cer(reference: str, hypothesis: str) -> float:
    e = ErrorRate()
    e.add(characters(reference), characters(hypothesis))
    return e.rate


def exact_match(reference: str, hypothesis: str) -> float:
    """1.0 when the SQuAD-normalised strings are equal, else 0.0."""
    return float(normalise(reference, True) == normalise(hypothesis, True))


def token_f1(reference: str, hypothesis: str) -> float:
    """SQuAD token F1: harmonic mean of precision and recall of the shared normalised tokens
    (as a multiset). Both empty: 1.0; one empty: 0.0."""
    ref = normalise(reference, True).split()
    hyp = normalise(hypothesis, True).split()
    if not ref or not hyp:
        return float(ref == hyp)
    common = sum((Counter(ref) & Counter(hyp)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(hyp), common / len(ref)
    return 2 * precision * recall / (precision + recall)
