"""Raw manifests (SPEC section 1) -> small typed records; bad entries -> reject records.

Four kinds are read:

* text-only JSONL: ``{"input": [{"role": ..., "content": ...}, ...], "output": "..."}``
* Audio-Flamingo-3 JSON list (a JSONL file of the same objects is accepted too):
  ``{"id", "sound", "duration", "conversations": [{"from": "human"|"gpt", "value"}, ...]}``,
  every turn kept (roles mapped human -> user, gpt -> assistant).
* ETTA JSONL: ``{"location", "start_time", "end_time", "duration", "caption", "sample_rate"}``;
  the [start_time, end_time) crop is the sample.
* reasoning JSONL (UALM-Reason): ``{"id", "messages": [{"role", "content": str or [part]}]}``
  with parts ``{"text"}``, ``{"audio_out": path}`` (assistant only: a generation target) and
  ``{"audio_in": path}`` (audio heard through the encoder).

Iterators never raise on bad data: a malformed JSON line, a missing field, a wrong type, a
non-UTF-8 byte or an unreadable file becomes a :class:`Reject` in the stream, at the position
the bad entry held, with the file, the 1-based line and a reason code. Audio paths are resolved
against the manifest's directory. :class:`Rejects` and :class:`RunSummary` are the reporting
helpers every data tool shares (rejects JSONL, counts by reason, the reject-fraction exit rule).
"""
from __future__ import annotations

import json
import os
import re
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import ClassVar, Iterator, Union

# Reason codes for manifest-level rejects (audio-level ones live in megatron_ualm.audio.io).
BAD_JSON = "bad_json"
BAD_ENCODING = "bad_encoding"
NOT_OBJECT = "not_object"
NOT_LIST = "not_list"
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
BAD_VALUE = "bad_value"
UNREADABLE_MANIFEST = "unreadable_manifest"

AF3_ROLES = {"human": "user", "gpt": "assistant", "system": "system",
             "user": "user", "assistant": "assistant"}
TEXT_ROLES = ("system", "user", "assistant")
KINDS = ("text", "af3", "etta", "reasoning")
# reasoning conversations (UALM-Reason): reasons of their own
BAD_ROLE = "bad_role"
UNKNOWN_PART = "unknown_part"
EMPTY_TEXT = "empty_text"
PART_KEYS = ("text", "audio_out", "audio_in")


@dataclass(frozen=True)
class Turn:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass(frozen=True)
class TextRecord:
    """One text-only example: prompt turns and the answer."""
    kind: ClassVar[str] = "text"
    file: str
    line: int  # 1-based line in ``file``
    input: tuple[Turn, ...]
    output: str


@dataclass(frozen=True)
class UnderstandingRecord:
    """One Audio-Flamingo-3 entry: a clip and the whole conversation about it."""
    kind: ClassVar[str] = "af3"
    file: str
    line: int  # 1-based line where the entry starts
    index: int  # 0-based position in the JSON list (or among the JSONL lines)
    id: str
    sound: str  # absolute path
    duration: float | None  # seconds, as the manifest claims
    conversations: tuple[Turn, ...]


@dataclass(frozen=True)
class GenerationRecord:
    """One ETTA entry: the caption and the [start_time, end_time) crop (seconds) it describes."""
    kind: ClassVar[str] = "etta"
    file: str
    line: int
    location: str  # absolute path
    start_time: float
    end_time: float | None  # None: to the end of the file
    duration: float | None  # file duration the manifest claims, seconds
    caption: str
    sample_rate: int | None  # rate the manifest claims; the decoder reads the real one


@dataclass(frozen=True)
class ReasoningRecord:
    """One reasoning conversation: turns of (role, parts), each part (key, value) with key in
    PART_KEYS; audio paths are absolute."""
    kind: ClassVar[str] = "reasoning"
    file: str
    line: int
    id: str
    turns: tuple  # ((role, ((key, value), ...)), ...)

    def audio_paths(self) -> list[str]:
        """Distinct audio paths (audio_in and audio_out), in order of first use."""
        seen: dict[str, None] = {}
        for _, parts in self.turns:
            for key, value in parts:
                if key != "text":
                    seen.setdefault(value, None)
        return list(seen)


@dataclass(frozen=True)
class Reject:
    """A manifest entry or clip that was dropped, and why."""
    file: str
    line: int | None
    reason: str
    message: str
    index: int | None = None
    key: str | None = None  # shard key, when the reject happened while building shards

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


Record = Union[TextRecord, UnderstandingRecord, GenerationRecord, ReasoningRecord]


class _Bad(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


def _resolve(manifest: str, path: str) -> str:
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(manifest)), path))


def _get(obj: dict, name: str, types, required: bool = True, default=None):
    """obj[name] checked against ``types``; bool never passes as a number."""
    if name not in obj or obj[name] is None:
        if required:
            raise _Bad(MISSING_FIELD, f"missing field '{name}'")
        return default
    value = obj[name]
    if isinstance(value, bool) or not isinstance(value, types):
        want = "/".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise _Bad(WRONG_TYPE, f"field '{name}' must be {want}, got {type(value).__name__}")
    return value


_SURROGATE = re.compile("[\udc80-\udcff]")  # what surrogateescape decodes a non-UTF-8 byte to


def _has_surrogates(value) -> bool:
    """True when a decoded value still holds bytes that were not UTF-8 (surrogateescape)."""
    if isinstance(value, str):
        return _SURROGATE.search(value) is not None
    if isinstance(value, dict):
        return any(_has_surrogates(k) or _has_surrogates(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_surrogates(v) for v in value)
    return False


def _iter_jsonl_objects(path: str) -> Iterator[tuple[int, object] | Reject]:
    """(line number, parsed value) per non-blank line, or a Reject for that line."""
    try:
        f = open(path, "rb")
    except OSError as e:
        yield Reject(path, None, UNREADABLE_MANIFEST, f"cannot open manifest: {e.strerror}")
        return
    with f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield Reject(path, lineno, BAD_ENCODING,
                             f"byte {e.start} is not UTF-8; re-encode the file as UTF-8")
                continue
            try:
                yield lineno, json.loads(text)
            except json.JSONDecodeError as e:
                yield Reject(path, lineno, BAD_JSON, f"invalid JSON at column {e.colno}: {e.msg}")


def _iter_json_list(path: str) -> Iterator[tuple[int, object] | Reject]:
    """Elements of a top-level JSON list with the line each starts on (a streaming-style parse,
    so one bad element is reported at its own line and the good ones before it are kept)."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", "surrogateescape")
    except OSError as e:
        yield Reject(path, None, UNREADABLE_MANIFEST, f"cannot open manifest: {e.strerror}")
        return
    text = text.lstrip("\ufeff")
    decoder = json.JSONDecoder()
    n = len(text)

    def skip_ws(p: int) -> int:
        while p < n and text[p] in " \t\r\n":
            p += 1
        return p

    def line_of(p: int) -> int:
        return text.count("\n", 0, p) + 1

    pos = skip_ws(0)
    if pos >= n or text[pos] != "[":
        yield Reject(path, line_of(pos), NOT_LIST,
                     "an Audio-Flamingo-3 manifest must be a JSON list of objects")
        return
    pos = skip_ws(pos + 1)
    if pos < n and text[pos] == "]":
        return
    line, line_pos = 1, 0  # incremental line counting keeps this linear in the file size
    while True:
        line += text.count("\n", line_pos, pos)
        line_pos = pos
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            yield Reject(path, e.lineno, BAD_JSON,
                         f"invalid JSON at column {e.colno}: {e.msg}; entries after it are not read")
            return
        yield line, value
        pos = skip_ws(end)
        if pos < n and text[pos] == ",":
            pos = skip_ws(pos + 1)
            continue
        if pos < n and text[pos] == "]":
            return
        yield Reject(path, line_of(pos), BAD_JSON,
                     "expected ',' or ']' between list entries; entries after it are not read")
        return


def _check_object(path: str, line: int, value) -> dict:
    if not isinstance(value, dict):
        raise _Bad(NOT_OBJECT, f"expected a JSON object, got {type(value).__name__}")
    if _has_surrogates(value):
        raise _Bad(BAD_ENCODING, "holds bytes that are not UTF-8; re-encode the file as UTF-8")
    return value


def _turns(items: list, field: str, role_key: str, content_key: str, roles: dict, hint: str) -> tuple:
    """Turns of a record's conversation list: each item an object whose ``role_key`` is a key
    of ``roles`` (mapped to our role) and whose ``content_key`` is a string."""
    turns = []
    for i, turn in enumerate(items):
        if not isinstance(turn, dict):
            raise _Bad(WRONG_TYPE, f"{field}[{i}] must be an object with '{role_key}' and '{content_key}'")
        role = _get(turn, role_key, str)
        if role not in roles:
            raise _Bad(BAD_VALUE, f"{field}[{i}].{role_key} is {role!r}; use {hint}")
        turns.append(Turn(roles[role], _get(turn, content_key, str)))
    return tuple(turns)


def _parse_text(path: str, line: int, obj: dict) -> TextRecord:
    raw_input = _get(obj, "input", (list, str))
    if isinstance(raw_input, str):  # convenience: a bare prompt is one user turn
        raw_input = [{"role": "user", "content": raw_input}]
    if not raw_input:
        raise _Bad(BAD_VALUE, "field 'input' is an empty list")
    turns = _turns(raw_input, "input", "role", "content", {r: r for r in TEXT_ROLES}, f"one of {TEXT_ROLES}")
    return TextRecord(path, line, turns, _get(obj, "output", str))


def _parse_af3(path: str, line: int, index: int, obj: dict) -> UnderstandingRecord:
    ident = _get(obj, "id", (str, int))
    sound = _get(obj, "sound", str)
    duration = _get(obj, "duration", (int, float), required=False)
    convs = _get(obj, "conversations", list)
    if not convs:
        raise _Bad(BAD_VALUE, "field 'conversations' is an empty list")
    turns = _turns(convs, "conversations", "from", "value", AF3_ROLES, "human or gpt")
    if duration is not None and duration <= 0:
        raise _Bad(BAD_VALUE, f"duration {duration} must be positive")
    return UnderstandingRecord(path, line, index, str(ident), _resolve(path, sound),
                               None if duration is None else float(duration), turns)


def _parse_etta(path: str, line: int, obj: dict) -> GenerationRecord:
    location = _get(obj, "location", str)
    caption = _get(obj, "caption", str)
    start = float(_get(obj, "start_time", (int, float), required=False, default=0.0))
    end = _get(obj, "end_time", (int, float), required=False)
    duration = _get(obj, "duration", (int, float), required=False)
    sample_rate = _get(obj, "sample_rate", int, required=False)
    if start < 0:
        raise _Bad(BAD_VALUE, f"start_time {start} is negative")
    if end is not None and end <= start:
        raise _Bad(BAD_VALUE, f"end_time {end} is not after start_time {start}")
    if not caption.strip():
        raise _Bad(BAD_VALUE, "caption is empty")
    return GenerationRecord(path, line, _resolve(path, location), start,
                            None if end is None else float(end),
                            None if duration is None else float(duration), caption, sample_rate)


def _reasoning_parts(path: str, where: str, role: str, content) -> tuple:
    if isinstance(content, str):
        content = [{"text": content}]
    if not isinstance(content, list) or not content:
        raise _Bad(WRONG_TYPE, f"{where}.content must be a string or a non-empty list of parts")
    parts = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        if not isinstance(part, dict) or len(part) != 1:
            raise _Bad(UNKNOWN_PART, f"{at} must be an object with exactly one of {PART_KEYS}")
        (key, value), = part.items()
        if key not in PART_KEYS:
            raise _Bad(UNKNOWN_PART, f"{at} has unknown key {key!r}; use one of {PART_KEYS}")
        if not isinstance(value, str):
            raise _Bad(WRONG_TYPE, f"{at}.{key} must be a string, got {type(value).__name__}")
        if key == "text" and not value.strip():
            raise _Bad(EMPTY_TEXT, f"{at} is an empty text part")
        if key != "text" and role == "system":
            raise _Bad(BAD_ROLE, f"{at}: a system turn holds text only, not {key}")
        if key == "audio_out" and role != "assistant":
            raise _Bad(BAD_ROLE, f"{at}: audio_out (a generation target) belongs in an assistant turn; "
                       "use audio_in for audio the model hears")
        parts.append((key, value if key == "text" else _resolve(path, value)))
    if role == "assistant" and all(k == "audio_in" for k, _ in parts):
        raise _Bad(BAD_VALUE, f"{where}: an assistant turn needs a text or audio_out part to learn from")
    return tuple(parts)


def _parse_reasoning(path: str, line: int, obj: dict) -> ReasoningRecord:
    ident = _get(obj, "id", (str, int), required=False, default=f"line{line}")
    messages = _get(obj, "messages", list)
    turns = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise _Bad(WRONG_TYPE, f"{where} must be an object with 'role' and 'content'")
        role = _get(msg, "role", str)
        if role not in TEXT_ROLES:
            raise _Bad(BAD_ROLE, f"{where}.role is {role!r}; use one of {TEXT_ROLES}")
        if role == "system" and i != 0:
            raise _Bad(BAD_ROLE, f"{where}: a system turn may only come first")
        if turns and turns[-1][0] == role:
            raise _Bad(BAD_ROLE, f"{where}: two {role} turns in a row; put both in one turn's parts")
        if "content" not in msg:
            raise _Bad(MISSING_FIELD, f"{where}: missing field 'content'")
        turns.append((role, _reasoning_parts(path, where, role, msg["content"])))
    if not any(role == "assistant" for role, _ in turns):
        raise _Bad(BAD_ROLE, "the conversation has no assistant turn")
    return ReasoningRecord(path, line, str(ident), tuple(turns))


def _starts_with_list(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    except OSError:
        return False
    return head[:1] == b"["


def _iter_jsonl_records(path, parse) -> Iterator:
    """One record (``parse(path, line, obj)``) or Reject per non-blank JSONL line, in file order."""
    path = os.path.abspath(path)
    for item in _iter_jsonl_objects(path):
        if isinstance(item, Reject):
            yield item
            continue
        line, value = item
        try:
            yield parse(path, line, _check_object(path, line, value))
        except _Bad as e:
            yield Reject(path, line, e.reason, e.message)


def iter_text(path: str | os.PathLike) -> Iterator[TextRecord | Reject]:
    """Text-only JSONL -> TextRecord / Reject, in file order."""
    return _iter_jsonl_records(path, _parse_text)


def iter_af3(path: str | os.PathLike) -> Iterator[UnderstandingRecord | Reject]:
    """Audio-Flamingo-3 JSON list (or JSONL) -> UnderstandingRecord / Reject, in file order."""
    path = os.path.abspath(path)
    source = _iter_json_list(path) if _starts_with_list(path) else _iter_jsonl_objects(path)
    for index, item in enumerate(source):
        if isinstance(item, Reject):
            yield Reject(item.file, item.line, item.reason, item.message, index=index)
            continue
        line, value = item
        try:
            yield _parse_af3(path, line, index, _check_object(path, line, value))
        except _Bad as e:
            yield Reject(path, line, e.reason, e.message, index=index)


def iter_etta(path: str | os.PathLike) -> Iterator[GenerationRecord | Reject]:
    """ETTA JSONL -> GenerationRecord / Reject, in file order."""
    return _iter_jsonl_records(path, _parse_etta)


def iter_reasoning(path: str | os.PathLike) -> Iterator[ReasoningRecord | Reject]:
    """Reasoning conversation JSONL -> ReasoningRecord / Reject, in file order."""
    return _iter_jsonl_records(path, _parse_reasoning)


def detect_kind(path: str | os.PathLike) -> str:
    """'af3' for a JSON list or objects with 'conversations', 'etta' for 'location', 'text' for
    'input'. Looks only at the first entry; raises ValueError when it cannot tell."""
    path = os.fspath(path)
    if _starts_with_list(path):
        return "af3"
    for item in _iter_jsonl_objects(path):
        if isinstance(item, Reject):
            continue
        _, value = item
        if isinstance(value, dict):
            if "conversations" in value or "sound" in value:
                return "af3"
            if "location" in value or "caption" in value:
                return "etta"
            if "input" in value and "output" in value:
                return "text"
            if "messages" in value:
                return "reasoning"
        break
    raise ValueError(f"{path}: cannot tell the manifest kind from its first entry; "
                     "pass the kind explicitly (text, af3, etta or reasoning)")


def iter_manifest(path: str | os.PathLike, kind: str = "auto") -> Iterator[Record | Reject]:
    """Records of one manifest of ``kind`` ('text', 'af3', 'etta', 'reasoning' or 'auto')."""
    if kind == "auto":
        kind = detect_kind(path)
    readers = {"text": iter_text, "af3": iter_af3, "etta": iter_etta, "reasoning": iter_reasoning}
    if kind not in readers:
        raise ValueError(f"unknown manifest kind {kind!r}; use one of {KINDS} or 'auto'")
    return readers[kind](path)


class Rejects:
    """Appends reject records to a JSONL file (one object per reject) and counts them by reason.

    The file is created even when nothing is rejected, so tools and people can always look.
    """

    def __init__(self, path: str | os.PathLike | None):
        self.path = None if path is None else os.fspath(path)
        self.counts: Counter = Counter()
        self._f = None
        if self.path is not None:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self._f = open(self.path, "w", encoding="utf-8")

    def add(self, reject: Reject | dict) -> None:
        obj = reject.to_json() if isinstance(reject, Reject) else dict(reject)
        self.counts[obj["reason"]] += 1
        if self._f is not None:
            self._f.write(json.dumps(obj, sort_keys=True, ensure_ascii=False) + "\n")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


DEFAULT_MAX_REJECT_FRACTION = 0.01


@dataclass
class RunSummary:
    """What a data tool did: kept count, rejects by reason, and free-form figures to print."""
    title: str
    kept: int = 0
    rejected: Counter = field(default_factory=Counter)
    figures: dict = field(default_factory=dict)  # label -> preformatted value, printed in order
    rejects_file: str | None = None

    @property
    def total_rejected(self) -> int:
        return sum(self.rejected.values())

    @property
    def reject_fraction(self) -> float:
        seen = self.kept + self.total_rejected
        return self.total_rejected / seen if seen else 0.0

    def exit_code(self, max_reject_fraction: float = DEFAULT_MAX_REJECT_FRACTION) -> int:
        """0 unless the rejected share of all entries is above ``max_reject_fraction``."""
        return 1 if self.reject_fraction > max_reject_fraction else 0

    def format(self, max_reject_fraction: float = DEFAULT_MAX_REJECT_FRACTION) -> str:
        lines = [f"== {self.title} ==", f"  kept      {self.kept:,}",
                 f"  rejected  {self.total_rejected:,} ({100 * self.reject_fraction:.2f}%, "
                 f"limit {100 * max_reject_fraction:.2f}%)"]
        for reason, n in sorted(self.rejected.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"    {reason:<20} {n:,}")
        for label, value in self.figures.items():
            lines.append(f"  {label:<9} {value}")
        if self.rejects_file and self.total_rejected:
            lines.append(f"  rejects listed in {self.rejects_file}")
        if self.exit_code(max_reject_fraction):
            lines.append(f"  FAILED: reject fraction {self.reject_fraction:.4f} is above "
                         f"{max_reject_fraction}; fix the inputs or raise --max-reject-fraction")
        return "\n".join(lines)

    def finish(self, max_reject_fraction: float = DEFAULT_MAX_REJECT_FRACTION,
               stream=None) -> int:
        """Print the summary and return the process exit code."""
        print(self.format(max_reject_fraction), file=stream or sys.stderr, flush=True)
        return self.exit_code(max_reject_fraction)
