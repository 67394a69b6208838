"""Per-request decoding state: which tokens the next row may hold, and how a sampled row
is written back. Pure Python over unified ids (no torch), one object per request.

The answer follows the training layout (``formats.templates``): after the prompt's
``<|assistant|>`` row comes a modality row, then the content, then END:

    <|assistant|> <|text|>  t t t ... <|eos|>                    one text answer
    <|assistant|> <|audio|> a a ... a <|eot|> <|assistant|> <|text|> t t <|eos|>   interleaved

Text and special rows hold the token in stream 0 and ``<|pad|>`` (0) in streams 1..K-1.
An audio segment of T frames is T + K - 1 rows in the delay pattern (``formats.delay``):
row r, stream k holds frame r - k of codebook k, or codebook k's pad where r - k is
outside [0, T). So at segment row r:

* stream k >= 1 is forced to its pad while r < k (the start corner) and once r - k >= T
  (the end corner); otherwise it is sampled over codebook k's codes;
* stream 0 is sampled over codebook 0's codes; from ``min_frames`` on it may also end the
  audio by choosing codebook 0's pad, ``<|eos|>`` or ``<|eot|>``: that row is T. Row T
  holds codebook 0's pad in stream 0 whichever of the three was chosen, rows T+1 .. T+K-2
  are forced to it, and the row after the last audio row is END: the ``<|eos|>``/``<|eot|>``
  chosen at row T, or a choice between the two when the pad ended the frames.
  ``max_frames`` forces the end.

``<|eos|>`` finishes the answer; ``<|eot|>`` is followed by a forced ``<|assistant|>`` row
and a new modality choice. In reasoning mode the engine may instead append the rows of the
model listening to its clip (``listened``), after which the next row is a modality choice.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from megatron_ualm.formats import vocab as V
from megatron_ualm.formats.vocab import UnifiedVocab

# Stream-0 masks (rows of ``masks.stream0_masks``).
MASK_MODALITY, MASK_TEXT, MASK_AUDIO0, MASK_AUDIO0_OR_END, MASK_END = range(5)
MASK_NAMES = ("modality", "text", "audio0", "audio0_or_end", "end")
MODALITY_IDS = {"text": V.TEXT, "audio": V.AUDIO, "speech": V.SPEECH}
MODALITY_NAMES = {v: k for k, v in MODALITY_IDS.items()}


@dataclass
class RowSpec:
    """What the next row may hold.

    stream0: a mask index (MASK_*) to sample from, or None when ``forced0`` is set.
    forced: per stream 1..K-1 a forced id, or None where that stream is sampled over its
        codebook's codes.
    audio: sample with the audio settings (and guidance) instead of the text settings.
    """
    stream0: Optional[int]
    forced0: Optional[int]
    forced: list
    audio: bool

    @property
    def samples_anything(self) -> bool:
        return self.stream0 is not None or any(f is None for f in self.forced)


@dataclass
class Segment:
    """One answer segment: its modality and the rows it generated (audio: the delayed rows
    without END; text: stream-0 ids without END)."""
    modality: str
    ids: list = field(default_factory=list)     # text: unified ids
    rows: list = field(default_factory=list)    # audio: [K] unified ids per row
    num_frames: Optional[int] = None            # audio: T once known
    end: Optional[int] = None                   # the END token (EOS/EOT), None if cut off
    listened_rows: Optional[int] = None         # reasoning: encoder rows of this clip fed back
    waveform: Optional[object] = None           # reasoning: the 16 kHz clip the model heard


class RowState:
    """Decoding state of one request.

    forced_modality: "text" / "audio" / "speech" forces the first modality row; None lets
    the model choose among the three. max_rows: rows this request may generate.
    """

    def __init__(self, vocab: UnifiedVocab, forced_modality: Optional[str], max_rows: int,
                 min_frames: int = 1, max_frames: int = 1500):
        if vocab.num_codebooks < 2:
            raise ValueError("decoding needs K >= 2 codebooks (the delay pattern's end corner)")
        if forced_modality is not None and forced_modality not in MODALITY_IDS:
            raise ValueError(f"modality {forced_modality!r} not in {sorted(MODALITY_IDS)} or auto")
        self.vocab = vocab
        self.K = vocab.num_codebooks
        self.pads = [int(p) for p in vocab.codebook_pads]
        self.forced_modality = forced_modality
        self.max_rows = max_rows
        self.min_frames, self.max_frames = min_frames, max_frames
        self.phase = "modality"
        self.segments: list[Segment] = []
        self.rows: list[list[int]] = []      # every generated row, as fed to the model
        self.audio_started = False           # the unconditional branch sees rows from here on
        self.finish_reason: Optional[str] = None
        self._r = 0                          # row index inside the current audio segment
        self._end_token: Optional[int] = None

    @property
    def done(self) -> bool:
        return self.phase == "done"

    # --- what comes next -------------------------------------------------------------------
    def spec(self) -> RowSpec:
        pad_rest = [V.PAD] * (self.K - 1)
        if self.phase == "modality":
            first = not self.segments
            if first and self.forced_modality is not None:
                return RowSpec(None, MODALITY_IDS[self.forced_modality], pad_rest, False)
            return RowSpec(MASK_MODALITY, None, pad_rest, False)
        if self.phase == "text":
            return RowSpec(MASK_TEXT, None, pad_rest, False)
        if self.phase == "role":
            return RowSpec(None, V.ASSISTANT, pad_rest, False)
        if self.phase == "audio":
            seg, r = self.segments[-1], self._r
            T = seg.num_frames
            if T is not None or r >= self.max_frames:
                stream0, forced0 = None, self.pads[0]
            elif r < self.min_frames:
                stream0, forced0 = MASK_AUDIO0, None
            else:
                stream0, forced0 = MASK_AUDIO0_OR_END, None
            ends_here = forced0 is not None and T is None
            end = r if ends_here else T
            forced = [self.pads[k] if (r < k or (end is not None and r - k >= end)) else None
                      for k in range(1, self.K)]
            return RowSpec(stream0, forced0, forced, True)
        if self.phase == "end":
            if self._end_token is not None:
                return RowSpec(None, self._end_token, pad_rest, True)
            return RowSpec(MASK_END, None, pad_rest, True)
        if self.phase == "done":
            return RowSpec(None, V.PAD, pad_rest, False)
        raise AssertionError(self.phase)

    # --- taking a row ----------------------------------------------------------------------
    def accept(self, row: list[int]) -> list[int]:
        """Record the chosen row [K] (forced entries already applied); returns the row to
        feed to the model (stream 0 of the row that ends the frames becomes codebook 0's pad)."""
        row = [int(x) for x in row]
        if self.phase == "done":
            return row
        tok = row[0]
        if self.phase == "modality":
            modality = MODALITY_NAMES[tok]
            self.segments.append(Segment(modality))
            if modality == "text":
                self.phase = "text"
            else:
                self.phase, self._r, self._end_token = "audio", 0, None
        elif self.phase == "text":
            if tok in (V.EOS, V.EOT):
                self.segments[-1].end = tok
                self._close(tok)
            else:
                self.segments[-1].ids.append(tok)
        elif self.phase == "role":
            self.phase = "modality"
        elif self.phase == "audio":
            seg = self.segments[-1]
            if seg.num_frames is None and tok in (self.pads[0], V.EOS, V.EOT):
                seg.num_frames = self._r
                if tok != self.pads[0]:
                    self._end_token = tok
                    row[0] = self.pads[0]
            self.audio_started = True
            seg.rows.append(row)
            self._r += 1
            if seg.num_frames is not None and self._r == seg.num_frames + self.K - 1:
                self.phase = "end"
        elif self.phase == "end":
            self.segments[-1].end = tok
            self._close(tok)
        self.rows.append(row)
        if not self.done and len(self.rows) >= self.max_rows:
            self.phase, self.finish_reason = "done", "length"
        return row

    def listened(self, num_rows: int, waveform, rows_left: int):
        """The engine appended ``<|assistant|> <|audio|>`` + ``num_rows`` placeholder rows +
        ``<|eot|> <|assistant|>`` after the audio segment that just ended with ``<|eot|>``;
        ``rows_left``: positions still free after them (bounds the rows this request may add)."""
        seg = self.segments[-1]
        if self.phase != "role" or seg.modality == "text" or seg.end != V.EOT:
            raise AssertionError("a clip is listened to right after it ends with <|eot|>")
        seg.listened_rows, seg.waveform = num_rows, waveform
        self.phase = "modality"
        self.max_rows = min(self.max_rows, len(self.rows) + rows_left)
        if rows_left <= 0:
            self.phase, self.finish_reason = "done", "length"

    def stop(self, reason: str):
        self.phase, self.finish_reason = "done", reason

    def _close(self, end_token: int):
        if end_token == V.EOS:
            self.phase, self.finish_reason = "done", "eos"
        else:
            self.phase = "role"
