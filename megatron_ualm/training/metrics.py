"""Training metrics: what a step cost and what it learned, to console, JSONL and TensorBoard.

Model FLOPs (forward + backward, no recomputation counted; H = heads * head_dim):
* dense: 6 * (non-embedding parameters + head parameters) per token;
* causal attention over a document of n tokens: 6 * L * H * n^2 (a query at position p
  attends p keys: 4 * H * p forward, times 3 with the backward, summed over p).
The trainer's MFU counts the tokens and documents actually packed in each row (``batch_flops``):
padding costs nothing and short documents attend over fewer positions, so many short
documents cannot inflate it. ``model_flops_per_token`` is the older full-row convention (every
position a token of one S-long document), kept for the benchmarks and logged beside it.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
DEFAULT_PEAK_TFLOPS = 989.0


def dense_flops_per_token(num_layers: int, hidden_size: int, ffn_hidden_size: int, num_heads: int,
                          num_query_groups: int, head_dim: int, vocab_rows: int) -> float:
    """Training FLOPs per token of a Qwen2-style decoder with an untied head of vocab_rows,
    attention scores excluded. Non-embedding parameters count QKV (with its bias), the output
    projection, the SwiGLU MLP and the norms."""
    qkv_width = (num_heads + 2 * num_query_groups) * head_dim
    attention_params = hidden_size * qkv_width + qkv_width + num_heads * head_dim * hidden_size
    mlp = 3 * hidden_size * ffn_hidden_size
    per_layer = attention_params + mlp + 2 * hidden_size  # + input and pre-MLP norms
    params = num_layers * per_layer + hidden_size + vocab_rows * hidden_size  # + final norm, head
    return 6.0 * params


def attention_flops(num_layers: int, num_heads: int, head_dim: int, sum_squared_lengths: float) -> float:
    """Causal attention FLOPs of documents whose lengths squared sum to ``sum_squared_lengths``."""
    return 6.0 * num_layers * num_heads * head_dim * sum_squared_lengths


def model_flops_per_token(num_layers: int, hidden_size: int, ffn_hidden_size: int, num_heads: int,
                          num_query_groups: int, head_dim: int, vocab_rows: int, seq_length: int) -> float:
    """Full-row convention: every position a token attending as in one ``seq_length`` document."""
    dense = dense_flops_per_token(num_layers, hidden_size, ffn_hidden_size, num_heads, num_query_groups,
                                  head_dim, vocab_rows)
    return dense + attention_flops(num_layers, num_heads, head_dim, seq_length)


def packed_lengths(document_ids) -> tuple[int, int]:
    """(tokens, sum of squared document lengths) of micro-batch rows ``document_ids`` [B, S]
    (slot per position, -1 for padding), as the batch contract lays them out."""
    import torch
    ids = torch.as_tensor(document_ids).long()
    offsets = torch.arange(ids.shape[0]).unsqueeze(1) * (ids.shape[1] + 1)
    real = ids >= 0
    counts = torch.bincount((ids + offsets)[real])
    return int(real.sum()), int((counts.double() ** 2).sum())


def batch_flops(dense_per_token: float, num_layers: int, num_heads: int, head_dim: int,
                tokens: float, sum_squared_lengths: float) -> float:
    """Training FLOPs of what was packed: dense work per real token plus each document's attention."""
    return dense_per_token * tokens + attention_flops(num_layers, num_heads, head_dim, sum_squared_lengths)


def peak_tflops(device_name: str | None) -> float:
    if device_name:
        for key, value in PEAK_TFLOPS.items():
            if key in device_name:
                return value
    return DEFAULT_PEAK_TFLOPS


@dataclass
class MetricsLogger:
    """Writes one JSON object a log step to ``metrics.jsonl`` and the same scalars to
    TensorBoard (when installed and enabled) and W&B (when a project is set). Rank 0 only."""

    directory: str
    enabled: bool = True
    tensorboard: bool = True
    wandb_project: str | None = None
    _tb: object = field(default=None, repr=False)
    _wandb: object = field(default=None, repr=False)
    _file: object = field(default=None, repr=False)

    def __post_init__(self):
        if not self.enabled:
            return
        os.makedirs(self.directory, exist_ok=True)
        self._file = open(os.path.join(self.directory, "metrics.jsonl"), "a", encoding="utf-8")
        if self.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(os.path.join(self.directory, "tensorboard"))
            except ImportError:
                self._tb = None
        if self.wandb_project:
            import wandb  # an explicit request: fail loudly if missing
            self._wandb = wandb.init(project=self.wandb_project, dir=self.directory, resume="allow")

    def log(self, step: int, scalars: dict, kind: str = "train"):
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in scalars.items()}
        self._file.write(json.dumps({"kind": kind, "step": step, "time": time.time(), **clean}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in scalars.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"{kind}/{k}", v, step)
        if self._wandb is not None:
            self._wandb.log({f"{kind}/{k}": v for k, v in scalars.items()}, step=step)

    def close(self):
        if self._file:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def format_console(step: int, total: int, s: dict) -> str:
    """One console line per log step."""
    fields = [("loss", "loss {:.4f}"), ("dpo/reward_margin", "margin {:.4f}"), ("dpo/accuracy", "pair acc {:.1%}"),
              ("dpo/chosen_logratio", "chosen {:+.4f}"), ("dpo/rejected_logratio", "rejected {:+.4f}"),
              ("grad_norm", "grad {:.3f}"), ("lr", "lr {:.2e}"),
              ("tokens_per_s", "{:,.0f} tok/s"), ("tflops", "{:.1f} TFLOP/s"), ("mfu", "MFU {:.1%}"),
              ("data_wait_s", "data wait {:.3f}s"), ("mem_gb", "mem {:.1f} GB")]
    parts = [f"step {step}/{total}"] + [fmt.format(s[k]) for k, fmt in fields if s.get(k) is not None]
    tasks = {k[5:]: v for k, v in s.items() if k.startswith("loss/") and v is not None}
    if tasks:
        parts.append("tasks " + " ".join(f"{k}={v:.3f}" for k, v in sorted(tasks.items())))
    return " | ".join(parts)
