"""Conversations -> stored segments -> rows of K token ids with per-row loss weights.

Three steps, each a pure function:

1. A task template (``caption_to_audio``, ``audio_to_conversation``, ...) turns one raw
   example into a list of ``Message``: a role, a modality and one piece of content (text
   ids, codec codes, or a reference to a continuous audio clip). A user turn that holds
   both audio and text becomes two messages of the same role.
2. ``build_segments`` lays the messages out as SPEC section 4 says,
   ``<|bos|>`` then per message ``<|role|> <|modality|> content END`` with END = ``<|eot|>``
   when the next message has the same role and ``<|eos|>`` otherwise, and groups the
   result into ``Segment`` s: exactly what the data tools store, one IndexedDataset
   sequence per segment, its ``mode`` saying what it holds (see the MODE_* constants).
3. ``layout`` turns stored segments into an ``Example``: token rows [T, K], target weights
   [T, K] and the placeholder spans where the audio encoder's frames go. The delay pattern
   is applied here, so the stored codes stay in plain [K, T] order.

Loss weights: ``weights[t, k]`` is the weight of predicting ``tokens[t, k]`` from rows
< t. Text target rows weigh 1 on stream 0 and 0 elsewhere; discrete audio target rows weigh
1/K on each stream (one frame counts like one text token).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Sequence, Union

import numpy as np

from megatron_ualm.formats import vocab as V
from megatron_ualm.formats.delay import apply_delay
from megatron_ualm.formats.vocab import UnifiedVocab

# --- what a stored sequence (segment) holds ----------------------------------------------
MODE_TEXT = 0            # unified ids for stream 0 (special tokens included), context
MODE_TEXT_TARGET = 1     # same, predicted (assistant content)
MODE_CODEC = 2           # raw codec codes [K, T] flattened row-major (codebook-major), context
MODE_CODEC_TARGET = 3    # same, predicted (audio generation target)
MODE_AUDIO_REF = 4       # continuous audio: [clip_index, num_samples, num_rows]
MODE_NAMES = {MODE_TEXT: "text", MODE_TEXT_TARGET: "text*", MODE_CODEC: "codec",
              MODE_CODEC_TARGET: "codec*", MODE_AUDIO_REF: "audio_ref"}
TARGET_MODES = (MODE_TEXT_TARGET, MODE_CODEC_TARGET)

TASKS = ("text_only", "caption_to_audio", "audio_to_caption", "audio_to_conversation",
         "audio_only", "transcription_to_speech", "speech_to_transcription")
GENERATION_TASKS = ("caption_to_audio", "audio_only", "transcription_to_speech")

ROLES = ("system", "user", "assistant")
MODALITIES = ("text", "audio", "speech")
LOSS_ON = ("assistant", "all")

DEFAULT_PROMPTS = {
    "caption_to_audio": "Generate audio for this caption.",
    "audio_to_caption": "Describe this audio.",
    "transcription_to_speech": "Speak this text.",
    "speech_to_transcription": "Transcribe this speech.",
}


@dataclass(frozen=True)
class AudioRef:
    """A continuous audio input: clip ``clip_index`` of the waveform store, ``num_samples``
    long at 16 kHz, shown to the model as ``num_rows`` placeholder rows (the encoder's frame
    count for that many samples, computed by the data tools)."""
    clip_index: int
    num_samples: int
    num_rows: int


Content = Union[Sequence[int], np.ndarray, AudioRef]


@dataclass
class Message:
    """One message: ``content`` is text-tokenizer ids (text), codec codes [K, T] (discrete
    audio), or an AudioRef (continuous audio)."""
    role: str
    modality: str
    content: Content

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"message role {self.role!r} not in {ROLES}")
        if self.modality not in MODALITIES:
            raise ValueError(f"message modality {self.modality!r} not in {MODALITIES}")


@dataclass
class Segment:
    mode: int
    data: np.ndarray  # int64 [n]

    def __eq__(self, other):
        return (isinstance(other, Segment) and self.mode == other.mode
                and np.array_equal(self.data, other.data))


@dataclass
class AudioSpan:
    """Placeholder rows [row, row + num_rows) to be overwritten by encoder frames."""
    row: int
    num_rows: int
    clip_index: int
    num_samples: int


@dataclass
class Example:
    tokens: np.ndarray             # int64 [T, K] unified ids
    weights: np.ndarray            # float32 [T, K] target weights
    audio_spans: list = field(default_factory=list)       # [AudioSpan]
    target_audio_rows: tuple | None = None  # [start, end) rows of the first audio target

    @property
    def num_rows(self) -> int:
        return int(self.tokens.shape[0])


# --- step 2: messages -> segments ---------------------------------------------------------
def build_segments(messages: Sequence[Message], vocab: UnifiedVocab) -> list[Segment]:
    """Lay out a conversation as stored segments (targets = assistant messages)."""
    if not messages:
        raise ValueError("a conversation needs at least one message")
    segments: list[Segment] = []
    pending: list[int] = []
    pending_target = False

    def add_text(ids, target):
        nonlocal pending, pending_target
        if pending and pending_target != target:
            flush()
        pending_target = target
        pending.extend(int(i) for i in ids)

    def flush():
        nonlocal pending
        if pending:
            mode = MODE_TEXT_TARGET if pending_target else MODE_TEXT
            segments.append(Segment(mode, np.asarray(pending, dtype=np.int64)))
            pending = []

    add_text([V.BOS], False)
    for i, msg in enumerate(messages):
        # An assistant AudioRef (reasoning: the model listens to its own clip) is context that
        # the inference loop inserts: its header, placeholder rows and END carry no loss.
        target = msg.role == "assistant" and not isinstance(msg.content, AudioRef)
        nxt = messages[i + 1] if i + 1 < len(messages) else None
        end = V.EOT if (nxt is not None and nxt.role == msg.role) else V.EOS
        add_text([V.ROLE_TOKENS[msg.role]], False)
        add_text([V.MODALITY_TOKENS[msg.modality]], target)
        content = msg.content
        if isinstance(content, AudioRef):
            flush()
            segments.append(Segment(MODE_AUDIO_REF, np.asarray(
                [content.clip_index, content.num_samples, content.num_rows], dtype=np.int64)))
        elif isinstance(content, np.ndarray) and content.ndim == 2:
            flush()
            codes = np.asarray(content, dtype=np.int64)
            vocab.codes_to_unified(codes)  # validates shape and range
            segments.append(Segment(MODE_CODEC_TARGET if target else MODE_CODEC, codes.reshape(-1)))
        else:
            add_text(vocab.text_to_unified(np.asarray(content, dtype=np.int64)).tolist(), target)
        add_text([end], target)
    flush()
    return segments


# --- step 3: segments -> rows --------------------------------------------------------------
def layout(segments: Sequence[Segment], vocab: UnifiedVocab, loss_on: str = "assistant") -> Example:
    """Stored segments -> Example with rows [T, K] and target weights [T, K].

    loss_on="assistant" weighs only target segments; "all" weighs every text and codec row
    except the first (nothing predicts it). Placeholder rows never carry weight.
    """
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on={loss_on!r} not in {LOSS_ON}")
    K = vocab.num_codebooks
    token_parts, weight_parts, spans = [], [], []
    target_audio = None
    row = 0
    for seg in segments:
        data = np.asarray(seg.data, dtype=np.int64)
        weighted = seg.mode in TARGET_MODES or loss_on == "all"
        if seg.mode in (MODE_TEXT, MODE_TEXT_TARGET):
            tok = np.zeros((len(data), K), dtype=np.int64)
            tok[:, 0] = data
            w = np.zeros((len(data), K), dtype=np.float32)
            w[:, 0] = 1.0 if weighted else 0.0
        elif seg.mode in (MODE_CODEC, MODE_CODEC_TARGET):
            if len(data) % K:
                raise ValueError(f"codec segment of {len(data)} ids is not a multiple of K={K}")
            codes = data.reshape(K, -1)
            tok = apply_delay(vocab.codes_to_unified(codes), vocab.codebook_pads)
            w = np.full(tok.shape, 1.0 / K if weighted else 0.0, dtype=np.float32)
            if seg.mode == MODE_CODEC_TARGET and target_audio is None:
                target_audio = (row, row + len(tok))
        elif seg.mode == MODE_AUDIO_REF:
            clip_index, num_samples, num_rows = (int(x) for x in data)
            tok = np.zeros((num_rows, K), dtype=np.int64)
            w = np.zeros((num_rows, K), dtype=np.float32)
            spans.append(AudioSpan(row, num_rows, clip_index, num_samples))
        else:
            raise ValueError(f"unknown segment mode {seg.mode}")
        token_parts.append(tok)
        weight_parts.append(w)
        row += len(tok)
    tokens = np.concatenate(token_parts) if token_parts else np.zeros((0, K), np.int64)
    weights = np.concatenate(weight_parts) if weight_parts else np.zeros((0, K), np.float32)
    if len(weights):
        weights[0] = 0.0  # the first row has no context to be predicted from
    return Example(tokens, weights, spans, target_audio)


def cfg_dropout(example: Example) -> Example:
    """Classifier-free-guidance dropout: every row before the first audio target becomes
    ``<|pad|>`` with zero weight (its placeholder spans vanish); the target audio and what
    follows it are kept. Examples without an audio target are returned unchanged.

    At inference the unconditional branch sees the same thing: an all-pad prompt of the
    same length followed by the shared generated rows.
    """
    if example.target_audio_rows is None:
        return example
    start = example.target_audio_rows[0]
    tokens = example.tokens.copy()
    weights = example.weights.copy()
    tokens[:start] = V.PAD
    weights[:start] = 0.0
    spans = [s for s in example.audio_spans if s.row >= start]
    return replace(example, tokens=tokens, weights=weights, audio_spans=spans)


# --- step 1: task templates ----------------------------------------------------------------
Tokenize = Callable[[str], Sequence[int]]


def text_only(turns: Sequence[tuple[str, str]], output: str, tokenize: Tokenize) -> list[Message]:
    """turns: [(role, text)] of the JSONL ``input``; output: the assistant answer."""
    msgs = [Message(role, "text", tokenize(text)) for role, text in turns]
    msgs.append(Message("assistant", "text", tokenize(output)))
    return msgs


def caption_to_audio(caption: str, codes: np.ndarray, tokenize: Tokenize,
                     prompt: str = DEFAULT_PROMPTS["caption_to_audio"], modality: str = "audio") -> list[Message]:
    return [Message("user", "text", tokenize(f"{prompt}\n{caption}")),
            Message("assistant", modality, codes)]


def transcription_to_speech(text: str, codes: np.ndarray, tokenize: Tokenize,
                            prompt: str = DEFAULT_PROMPTS["transcription_to_speech"]) -> list[Message]:
    return caption_to_audio(text, codes, tokenize, prompt=prompt, modality="speech")


def audio_to_caption(audio: AudioRef, caption: str, tokenize: Tokenize,
                     prompt: str = DEFAULT_PROMPTS["audio_to_caption"], modality: str = "audio") -> list[Message]:
    return [Message("user", modality, audio), Message("user", "text", tokenize(prompt)),
            Message("assistant", "text", tokenize(caption))]


def speech_to_transcription(audio: AudioRef, text: str, tokenize: Tokenize,
                            prompt: str = DEFAULT_PROMPTS["speech_to_transcription"]) -> list[Message]:
    return audio_to_caption(audio, text, tokenize, prompt=prompt, modality="speech")


def audio_only(codes: np.ndarray, prompt_frames: int = 0) -> list[Message]:
    """Audio continuation: the first ``prompt_frames`` frames are context (a user audio
    message), the rest is the target. With 0 the whole clip is the target."""
    codes = np.asarray(codes)
    if not 0 <= prompt_frames < codes.shape[1]:
        raise ValueError(f"prompt_frames={prompt_frames} must leave at least one of {codes.shape[1]} frames")
    msgs = []
    if prompt_frames:
        msgs.append(Message("user", "audio", codes[:, :prompt_frames]))
    msgs.append(Message("assistant", "audio", codes[:, prompt_frames:]))
    return msgs


SOUND_MARKER = "<sound>"


def audio_to_conversation(audio: AudioRef, conversations: Sequence[tuple[str, str]],
                          tokenize: Tokenize, modality: str = "audio") -> list[Message]:
    """Audio-Flamingo-3 style conversation, every turn kept. ``conversations`` holds
    (from, value) with from in {"human", "gpt"} (or user/assistant). The ``<sound>`` marker
    places the clip inside its turn; if no turn has it, the clip opens the first user turn."""
    role_of = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
               "system": "system"}
    turns = []
    for speaker, value in conversations:
        if speaker not in role_of:
            raise ValueError(f"conversation speaker {speaker!r} not in {sorted(role_of)}")
        turns.append((role_of[speaker], value))
    user_turns = [i for i, (role, _) in enumerate(turns) if role == "user"]
    if not user_turns:
        raise ValueError("conversation has no user turn to hold the audio")
    if not any(role == "assistant" for role, _ in turns):
        raise ValueError("conversation has no assistant turn")
    marked = [i for i in user_turns if SOUND_MARKER in turns[i][1]]
    audio_turn = marked[0] if marked else user_turns[0]

    msgs: list[Message] = []
    for i, (role, value) in enumerate(turns):
        if i == audio_turn:
            before, _, after = value.partition(SOUND_MARKER) if SOUND_MARKER in value else ("", "", value)
            if before.strip():
                msgs.append(Message(role, "text", tokenize(before.strip())))
            msgs.append(Message(role, modality, audio))
            value = after
        value = value.replace(SOUND_MARKER, "").strip()
        if value:
            msgs.append(Message(role, "text", tokenize(value)))
    return msgs


# --- inspection ----------------------------------------------------------------------------
def token_name(token_id: int, vocab: UnifiedVocab, decode_text: Callable[[list[int]], str] | None = None) -> str:
    kind = vocab.kind_of(int(token_id))
    if kind == "special":
        return vocab.special_name(int(token_id))
    if kind == "text":
        text_id = vocab.unified_to_text(int(token_id))
        return repr(decode_text([text_id])) if decode_text else f"t{text_id}"
    if kind == "audio":
        k = (int(token_id) - vocab.audio_start) // vocab.block_size
        c = (int(token_id) - vocab.audio_start) % vocab.block_size - 1
        return f"c{k}:pad" if c < 0 else f"c{k}:{c}"
    return "<|padding|>"


def dump(example: Example, vocab: UnifiedVocab, decode_text=None, max_rows: int | None = None) -> str:
    """One line per row: index, stream-0 weight, audio-stream weight, the K tokens."""
    span_rows = {s.row: s for s in example.audio_spans}
    in_span = np.zeros(example.num_rows, dtype=bool)
    for s in example.audio_spans:
        in_span[s.row:s.row + s.num_rows] = True
    lines = [f"{example.num_rows} rows x {example.tokens.shape[1]} streams; "
             f"weights: stream0 / stream1..; * marks placeholder rows"]
    rows = range(example.num_rows if max_rows is None else min(max_rows, example.num_rows))
    for t in rows:
        w = example.weights[t]
        if t in span_rows:
            s = span_rows[t]
            lines.append(f"{t:5d}  audio clip {s.clip_index}: {s.num_samples / 16000:.2f} s "
                         f"-> {s.num_rows} placeholder rows")
        if in_span[t]:
            continue
        toks = example.tokens[t]
        if toks[1:].any() or vocab.kind_of(int(toks[0])) == "audio":
            body = " ".join(token_name(x, vocab) for x in toks)
        else:
            body = token_name(toks[0], vocab, decode_text)
        lines.append(f"{t:5d}  w={w[0]:.3g}/{w[1:].max() if len(w) > 1 else 0:.3g}  {body}")
    return "\n".join(lines)


def num_rows(segments: Sequence[Segment], num_codebooks: int) -> int:
    """Rows ``layout`` would produce, computed without building them."""
    total = 0
    for seg in segments:
        if seg.mode in (MODE_TEXT, MODE_TEXT_TARGET):
            total += len(seg.data)
        elif seg.mode in (MODE_CODEC, MODE_CODEC_TARGET):
            total += len(seg.data) // num_codebooks + num_codebooks - 1
        elif seg.mode == MODE_AUDIO_REF:
            total += int(seg.data[2])
        else:
            raise ValueError(f"unknown segment mode {seg.mode}")
    return total
