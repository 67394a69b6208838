"""Evaluate one checkpoint on tokenized datasets: teacher-forced loss and accuracy per task,
and (``generate="on"``) greedy answers scored against the references.

    checkpoint -> run config, model (``inference.loading``)
    datasets (``--data PATH:TASK`` or the config's ``data.valid``), checked first
    per task: trainer's validation rows -> ``teacher_forced.evaluate_rows``
              examples -> ``references`` -> engine -> ``generation.score_task``

Single process: one CPU or one GPU (the model is loaded whole, TP = PP = 1).
"""
from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

from megatron_ualm.errors import UserError
from megatron_ualm.formats.templates import TASKS

log = logging.getLogger(__name__)


@dataclass
class EvaluateOptions:
    """Settings of ``python -m megatron_ualm.evaluate`` (its --help is built from these)."""
    checkpoint: str = field(metadata={"help": "Megatron experiment / checkpoints / iter_NNNNNNN dir, "
                                              "or an HF export dir"})
    data: list = field(default_factory=list, metadata={
        "help": "tokenized dataset as PATH:TASK (repeat the option); default: the config's data.valid"})
    out: Optional[str] = field(default=None, metadata={"help": "write the results to this JSON file"})
    max_examples: Optional[int] = field(default=None, metadata={"help": "first N examples of each dataset"})
    micro_batch_size: Optional[int] = field(default=None, metadata={
        "help": "rows per forward pass (default: the config's training.micro_batch_size)"})
    generate: str = field(default="off", metadata={"help": "on: also generate greedily and score the "
                                                           "answers (WER, exact match / F1, CLAP)",
                                                   "choices": ("off", "on")})
    max_new_tokens: int = field(default=256, metadata={"help": "rows generated per answer at most"})
    max_audio_seconds: float = field(default=10.0, metadata={"help": "length of a generated audio answer at most"})
    batch_size: int = field(default=8, metadata={"help": "prompts per generation batch"})
    clap: Optional[str] = field(default=None, metadata={
        "help": "local CLAP model dir (transformers ClapModel + ClapProcessor) for caption_to_audio; "
                "without it the CLAP score is skipped"})
    tokenizer: Optional[str] = field(default=None, metadata={"help": "HF tokenizer dir (default: the config's)"})
    codec: Optional[str] = field(default=None, metadata={"help": "codec dir (default: the config's)"})
    device: str = field(default="auto", metadata={"help": "auto: cuda when visible, else cpu",
                                                  "choices": ("auto", "cpu", "cuda")})
    precision: str = field(default="auto", metadata={"help": "auto: bf16 on cuda, fp32 on cpu",
                                                     "choices": ("auto", "fp32", "bf16")})

    def __post_init__(self):
        for name in ("max_examples", "micro_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name.replace('_', '-')}: expected a positive integer, got {value}")
        for name in ("max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(self, name)}")


def parse_data_arg(item: str):
    """``PATH:TASK`` -> DatasetSpec (the task after the last colon)."""
    from megatron_ualm.config import DatasetSpec
    path, sep, task = item.rpartition(":")
    if not sep or not path:
        raise UserError(f"--data {item}: expected PATH:TASK, e.g. data/tok/asr:speech_to_transcription")
    if task not in TASKS:
        raise UserError(f"--data {item}: task {task!r} is not one of {', '.join(TASKS)}")
    return DatasetSpec(path=path, task=task)


def checkpoint_identity(source) -> dict:
    """What was evaluated: the path given and loaded, its kind and training iteration."""
    match = re.search(r"iter_(\d+)", os.path.basename(os.path.normpath(source.path)))
    m = source.cfg.model
    return {"given": os.path.abspath(source.given), "path": os.path.abspath(source.path),
            "kind": "hf_export" if source.hf_export else "megatron",
            "iteration": int(match.group(1)) if match else None,
            "model": {"num_layers": m.num_layers, "hidden_size": m.hidden_size,
                      "text_vocab_size": m.text_vocab_size, "num_codebooks": m.num_codebooks}}


def run_evaluation(opts: EvaluateOptions, show_progress: bool = True) -> dict:
    """Evaluate ``opts.checkpoint`` (see the module docstring); returns the results document
    (the JSON written to ``opts.out``). Every path is checked before the model is built."""
    import torch
    from tqdm import tqdm

    from megatron_ualm.data.indexed import TokenizedDataset
    from megatron_ualm.evaluation.teacher_forced import FirstDocuments, evaluate_rows
    from megatron_ualm.inference.loading import load_codec_for, load_model, load_tokenizer_for, open_checkpoint
    from megatron_ualm.model.ualm_model import padded_vocab
    from megatron_ualm.runtime import init_runtime, shutdown_runtime
    from megatron_ualm.training.preflight import require_dataset
    from megatron_ualm.training.providers import valid_rows

    source = open_checkpoint(opts.checkpoint)
    cfg = source.cfg
    specs = [parse_data_arg(d) for d in opts.data]
    key = "--data"
    if not specs:
        specs, key = list(cfg.data.valid), "data.valid"
    if not specs:
        raise UserError("--data: none given and the checkpoint's config has no data.valid; "
                        "pass --data PATH:TASK (repeatable)")
    vocab = padded_vocab(cfg.model, 1)
    for i, spec in enumerate(specs):
        require_dataset(f"{key}[{i}]", spec, vocab)
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible; pass --device cpu")
    by_task: dict = {}
    for spec in specs:
        by_task.setdefault(spec.task, []).append(spec)

    generate = opts.generate == "on"
    tokenizer = codec = clap = None
    if generate:
        tokenizer = load_tokenizer_for(source, opts.tokenizer)
    device_name = opts.device if opts.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    rt = init_runtime(device=device_name, seed=0)
    try:
        precision = opts.precision if opts.precision != "auto" else ("bf16" if rt.device.type == "cuda" else "fp32")
        if generate and "caption_to_audio" in by_task and opts.clap:
            from megatron_ualm.evaluation.clap import ClapScorer
            clap = ClapScorer(opts.clap, rt.device)
            codec = load_codec_for(source, rt.device, opts.codec)
        t0 = time.perf_counter()
        model = load_model(source, rt.device, precision)
        engine = settings = None
        if generate:
            from megatron_ualm.inference.engine import Engine
            from megatron_ualm.inference.sampling import GenerationSettings
            engine = Engine(model, tokenizer_size=len(tokenizer))
            settings = GenerationSettings.from_overrides({
                "text_temperature": 0.0, "audio_temperature": 0.0, "max_new_rows": opts.max_new_tokens,
                "max_audio_seconds": opts.max_audio_seconds, "batch_size": opts.batch_size,
                **({"frame_rate": codec.info.frame_rate} if codec is not None else {})})
        load_s = time.perf_counter() - t0
        micro = opts.micro_batch_size or cfg.training.micro_batch_size

        results = {}
        for task, task_specs in by_task.items():
            sources = [FirstDocuments(TokenizedDataset(s.path, vocab=vocab, task=task), opts.max_examples)
                       for s in task_specs]
            rows = valid_rows(cfg, task, sources, vocab)
            packed = sum(len(rows.row_plan(i)) for i in range(len(rows)))
            with tqdm(total=packed, desc=f"{task} loss", unit="ex", disable=not show_progress) as bar:
                entry = evaluate_rows(model, rows, task, micro, rt.device, bar)
            entry = {"examples": sum(len(s) for s in sources), "scored_examples": packed,
                     "datasets": [s.path for s in task_specs], **entry}
            if rows.stats.dropped_overlong:
                entry["dropped_overlong"] = rows.stats.dropped_overlong
            if generate:
                entry["generation"] = _generation_entry(task, sources, vocab, tokenizer, engine, settings,
                                                        codec, clap, show_progress)
            results[task] = entry
        return {"checkpoint": checkpoint_identity(source), "settings": asdict(opts),
                "device": str(rt.device), "precision": precision,
                "generation_settings": settings.to_dict() if settings is not None else None,
                "load_s": load_s, "tasks": results}
    finally:
        shutdown_runtime()


def _generation_entry(task, sources, vocab, tokenizer, engine, settings, codec, clap, show_progress) -> dict:
    """Greedy answers to every example of ``sources`` with a reference, scored."""
    from tqdm import tqdm

    from megatron_ualm.evaluation import generation as G
    from megatron_ualm.evaluation.references import build_reference
    if task not in G.scored_tasks():
        return {"note": f"no generation score for {task}"}
    if task in G.CLAP_TASKS and clap is None:
        return {"note": "clap skipped: no --clap DIR given"}
    refs = [r for s in sources for d in range(len(s))
            if (r := build_reference(s, d, task, vocab, tokenizer.decode)) is not None]
    with tqdm(total=len(refs), desc=f"{task} generate", unit="ex", disable=not show_progress) as bar:
        pairs, too_long = G.generate_answers(engine, refs, settings, bar)
    entry = G.score_task(task, pairs, vocab, tokenizer.decode, codec, clap)
    if too_long:
        entry["prompt_too_long"] = too_long
    return entry
