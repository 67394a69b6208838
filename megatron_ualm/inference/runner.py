"""Run a manifest of requests through an Engine and write answer records and WAVs.

``run_requests`` is what ``python -m megatron_ualm.generate`` calls on every rank; tests and
scripts may call it directly with an in-memory model.

Answer record (one JSON object per line of ``answers.jsonl``, in manifest order):

    {"index": 3, "id": "q3", "task": "text_only", "status": "ok",
     "text": "...",                            # the text segments joined
     "segments": [{"modality": "text", "text": "...", "tokens": 12},
                  {"modality": "audio", "frames": 250, "rows": 257, "complete": true,
                   "wav": "<out>/wavs/000003_q3_1.wav", "duration_s": 5.0}],
     "wavs": ["<out>/wavs/000003_q3_1.wav"], "finish_reason": "eos",   # or "length"
     "prompt_rows": 40, "generated_rows": 270,
     "timing": {"prefill_s": .., "decode_s": .., "batch_size": 16, "steps": 300, "guided": true},
     "settings": {...GenerationSettings..., "request_seed": 1234}, "rank": 0}

A ``"mode": "reasoning"`` request's record adds ``"transcript"`` (every text part, clip and
listening in order, ``outputs`` module doc) and ``"rounds"`` (clips generated);
``finish_reason`` may then be ``"max_rounds"``. Reasoning needs the codec.

A request that cannot run gets ``"status": "error"`` and
``"error": {"reason": "missing_file" | "unreadable" | "empty_prompt" | "prompt_too_long" |
"bad_request" | ..., "message": "..."}`` instead of the answer fields; the others complete.
"""
from __future__ import annotations

import json
import logging
import os
import re
from typing import Callable, Optional

from megatron_ualm.errors import UserError
from megatron_ualm.fileutil import read_json
from megatron_ualm.inference.engine import Engine
from megatron_ualm.inference.outputs import describe
from megatron_ualm.inference.prompts import RequestError, build_prompt, infer_task
from megatron_ualm.inference.sampling import GenerationSettings, request_seed

logger = logging.getLogger(__name__)


def read_requests(path: str) -> list[dict]:
    """A JSONL manifest (or a JSON list) of request objects. A line that is not a JSON
    object becomes {"_invalid": reason} so it still gets an error record; a file that cannot
    be read (or a malformed JSON list) raises UserError."""
    fix = "pass a JSONL file (or a JSON list) of requests, see megatron_ualm/inference/prompts.py"
    if not os.path.isfile(path):
        raise UserError(f"--requests: {path}: no such file; {fix}")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--requests: {path}: cannot be read ({e}); {fix}") from None
    if text.lstrip().startswith("["):
        records = read_json(path, fix)
        return [r if isinstance(r, dict) else {"_invalid": "not a JSON object"} for r in records]
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            obj = {"_invalid": f"line {n}: {e}"}
        records.append(obj if isinstance(obj, dict) else {"_invalid": f"line {n}: not a JSON object"})
    return records


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:64] or "request"


def run_requests(engine: Engine, records: list[tuple[int, dict]], out_dir: str,
                 settings: GenerationSettings, tokenize: Callable[[str], list],
                 decode: Callable[[list], str], codec=None, base_dir: str = ".",
                 max_prompt_rows: Optional[int] = None, rank: int = 0) -> list[dict]:
    """Answer ``records`` ([(manifest index, request)]); returns their answer records.

    settings: the run's settings; a request's ``"settings"`` object overrides them for it.
    codec: ``audio.codec.Codec`` used to write WAVs under ``out_dir/wavs`` (None: no WAVs).
    max_prompt_rows: longer prompts get a ``prompt_too_long`` error (default: the model's
    positions minus one, so at least one row can be generated).
    """
    vocab = engine.vocab
    window = engine.model.model_cfg.encoder.window_seconds
    limit = max_prompt_rows if max_prompt_rows is not None else engine.max_positions - 1
    results: dict[int, dict] = {}
    groups: dict[str, list] = {}
    for index, record in records:
        rid = str(record.get("id", index))
        base = {"index": index, "id": rid, "rank": rank}
        try:
            if "_invalid" in record:
                raise RequestError("bad_request", record["_invalid"])
            base["task"] = infer_task(record)
            overrides = record.get("settings") or {}
            if not isinstance(overrides, dict):
                raise RequestError("bad_request", "settings must be an object")
            try:
                req_settings = GenerationSettings.from_overrides(overrides, settings)
            except (TypeError, ValueError) as e:
                raise RequestError("bad_request", str(e)) from None
            seed = request_seed(req_settings.seed, rid)
            base["settings"] = {**req_settings.to_dict(), "request_seed": seed}
            prompt = build_prompt(record, vocab, tokenize, base_dir, window, seed)
            n = int(prompt.rows.shape[0])
            if n > limit:
                raise RequestError("prompt_too_long", f"the prompt is {n} rows; at most {limit} fit")
            base["prompt_rows"] = n
        except RequestError as e:
            results[index] = {**base, "status": "error", "error": {"reason": e.reason, "message": str(e)}}
            continue
        key = json.dumps(req_settings.to_dict(), sort_keys=True)
        groups.setdefault(key, []).append((index, base, prompt, req_settings))

    for items in groups.values():
        group_settings = items[0][3]
        items.sort(key=lambda it: it[2].rows.shape[0])  # similar lengths share a batch: less padding
        for start in range(0, len(items), group_settings.batch_size):
            batch = items[start:start + group_settings.batch_size]
            try:
                gens = engine.generate([p for _, _, p, _ in batch], group_settings, codec)
            except Exception as e:  # noqa: BLE001 -- one failing batch must not stop the run
                logger.exception("generation failed for %d requests", len(batch))
                for index, base, _, _ in batch:
                    results[index] = {**base, "status": "error",
                                      "error": {"reason": "generation_failed", "message": repr(e)}}
                continue
            for (index, base, _, _), gen in zip(batch, gens):
                prefix = os.path.join(out_dir, "wavs", f"{index:06d}_{_safe(base['id'])}")
                answer = describe(gen, vocab, decode, codec, prefix if codec is not None else None)
                results[index] = {**base, "status": "ok", **answer, "timing": gen.timing}
    return [results[i] for i, _ in records]


def write_jsonl(path: str, records: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def merge_rank_files(out_dir: str, world_size: int, name: str = "answers.jsonl") -> list[dict]:
    """Merge ``answers.rank{r}.jsonl`` of every rank into ``name``, in manifest order."""
    merged = []
    for r in range(world_size):
        part = os.path.join(out_dir, f"answers.rank{r}.jsonl")
        with open(part, encoding="utf-8") as f:
            merged.extend(json.loads(line) for line in f if line.strip())
    merged.sort(key=lambda rec: rec["index"])
    write_jsonl(os.path.join(out_dir, name), merged)
    for r in range(world_size):
        os.remove(os.path.join(out_dir, f"answers.rank{r}.jsonl"))
    return merged
