"""The results document as a one-screen table, and written as JSON."""
from __future__ import annotations

import json
import os

from megatron_ualm.fileutil import write_atomic

# generation scores shown in the table, in this order
SCORE_COLUMNS = (("wer", "WER"), ("cer", "CER"), ("exact_match", "EM"), ("f1", "F1"), ("clap", "CLAP"))


def _num(value, fmt: str = ".4f") -> str:
    return "-" if value is None else format(value, fmt)


def format_table(doc: dict) -> str:
    """One line per task: examples, loss, accuracy and the generation scores it has."""
    ck = doc["checkpoint"]
    it = f" (iteration {ck['iteration']})" if ck.get("iteration") is not None else ""
    lines = [f"checkpoint: {ck['path']} [{ck['kind']}]{it}  device: {doc['device']} {doc['precision']}"]
    header = f"{'task':<24} {'examples':>8} {'loss':>8} {'accuracy':>8}  generation"
    lines += [header, "-" * len(header)]
    for task, e in doc["tasks"].items():
        gen = e.get("generation")
        if gen is None:
            scores = "off"
        else:
            parts = [f"{label} {gen[k]:.4f}" for k, label in SCORE_COLUMNS if gen.get(k) is not None]
            if parts:
                parts.append(f"(n={gen.get('generated', 0)})")
            scores = "  ".join(parts) if parts else gen.get("note", "-")
        lines.append(f"{task:<24} {e['examples']:>8} {_num(e['loss']):>8} {_num(e['accuracy']):>8}  {scores}")
    return "\n".join(lines)


def write_json(doc: dict, path: str) -> None:
    """Write atomically (a partial file never replaces a good one)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomic(path, (json.dumps(doc, indent=2) + "\n").encode(), f"{path}.tmp")
