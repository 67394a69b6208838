"""Check every file a run config names before the trainer builds the model.

A mistyped dataset path used to surface only when the datasets were opened, after the
model and optimizer were built (30-117 s into a large run). :func:`check_run_inputs` looks
at every path first: each dataset's ``.bin``/``.idx``/``.meta.json`` (and waveform store),
with the sidecar checked against the model's vocabulary and the listed task; the
``checkpoint.load`` checkpoint (when no checkpoint of the run itself is resumed); the
tokenizer, codec and audio encoder directories the config names. :func:`require_run_inputs`
runs it on every rank and makes all ranks raise the same error, so none is left waiting in
a collective for a rank that stopped.
"""
from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

import torch.distributed as dist

from megatron_ualm.data import indexed as I
from megatron_ualm.errors import UserError
from megatron_ualm.training import checkpoint_files
from megatron_ualm.training.checkpoint_files import CheckpointError, checkpoints_dir, find_latest_checkpoint

BUILD_DATA = "build it with data_tools/preprocess_text.py or data_tools/preprocess_audio.py, or fix the path"


def _unreadable(path: str) -> str | None:
    """Why the file ``path`` cannot be read, or None."""
    if not os.path.isfile(path):
        return "is missing" if not os.path.exists(path) else "is not a file"
    try:
        with open(path, "rb"):
            return None
    except OSError as e:
        return f"cannot be read ({e.strerror})"


def _dataset_problem(key: str, spec, vocab) -> str | None:
    if spec.task == "preference":  # two caption_to_audio sets and the pair count
        for side in ("chosen", "rejected"):
            problem = _dataset_problem(key, replace(spec, path=f"{spec.path}.{side}", task="caption_to_audio"), vocab)
            if problem:
                return problem
        why = _unreadable(f"{spec.path}.pairs.json")
        return f"{key}.path: {spec.path}.pairs.json {why}; build the set with the preference data tool" if why else None
    files = [I.bin_path(spec.path), I.idx_path(spec.path), I.meta_path(spec.path)]
    if not any(os.path.exists(f) for f in files):
        return f"{key}.path: no dataset at {spec.path} (no .bin, .idx or .meta.json); {BUILD_DATA}"
    for f in files:
        why = _unreadable(f)
        if why:
            return f"{key}.path: {f} {why}; {BUILD_DATA}"
    try:
        meta = I.read_meta(spec.path)
        I.check_meta(meta, spec.path, vocab, spec.task)
    except UserError as e:
        return f"{key}: {e}"
    if meta.get("counts", {}).get("clips"):  # understanding examples read their waveforms
        for f in (I.bin_path(I.audio_prefix(spec.path)), I.idx_path(I.audio_prefix(spec.path))):
            why = _unreadable(f)
            if why:
                return f"{key}.path: {f} (the waveform store) {why}; re-run the preprocessing"
    return None


def require_dataset(key: str, spec, vocab) -> None:
    """Raise UserError (one line naming the file) when the dataset ``spec`` cannot be read
    as ``spec.task`` with ``vocab``."""
    problem = _dataset_problem(key, spec, vocab)
    if problem:
        raise UserError(problem)


def _directory_problem(key: str, path: str | None, what: str, needs: tuple[str, ...]) -> str | None:
    """``path`` (when set) must be a directory holding one of the files ``needs``."""
    if path is None:
        return None
    if not os.path.isdir(path):
        return f"{key}: {path} is not a directory; point it at a local {what} directory (nothing is downloaded)"
    if not any(os.path.isfile(os.path.join(path, n)) for n in needs):
        return f"{key}: {path} has no {' or '.join(needs)}; point it at a local {what} directory"
    return None


class _Held(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def resolve_named_checkpoint(path: str, key: str, error: type[UserError] = UserError) -> Path:
    """``checkpoint_files.resolve_checkpoint(path)`` for a path the user passed as ``key``.

    A refusal raises ``error`` as one line that also says why newer checkpoints were skipped
    (otherwise warnings of their own; they are still logged when an older valid one is taken)."""
    if not os.path.exists(path):
        raise error(f"{key}: {path} does not exist; pass a checkpoint (iter_NNNNNNN), checkpoints or experiment "
                    "directory, e.g. the output of checkpoints_convert/hf_to_megatron.py")
    log = logging.getLogger(checkpoint_files.__name__)
    held, propagate = _Held(), log.propagate
    log.addHandler(held)
    log.propagate = False
    try:
        found = checkpoint_files.resolve_checkpoint(path)
    except CheckpointError as e:
        skipped = "; ".join(r.getMessage() for r in held.records)
        hint = f" ({skipped}); delete the damaged checkpoints or pass another one" if skipped else ""
        raise error(f"{key}: {e}{hint}") from None
    finally:
        log.removeHandler(held)
        log.propagate = propagate
    for record in held.records:
        log.handle(record)
    return found


def _checkpoint_problem(cfg) -> str | None:
    load = cfg.checkpoint.load
    if load is None:
        return None
    if cfg.checkpoint.auto_resume and find_latest_checkpoint(checkpoints_dir(cfg.checkpoint.experiment_dir)):
        return None  # the run resumes from its own checkpoint; checkpoint.load is not read
    try:
        resolve_named_checkpoint(load, "checkpoint.load")
    except UserError as e:
        return str(e)
    return None


def _random_encoder_problem(cfg) -> str | None:
    """A run built from scratch (nothing to load or resume) with a real encoder kind but no
    encoder weights must ask for the random one explicitly."""
    enc = cfg.model.encoder
    if enc.path is not None or enc.random_init or cfg.checkpoint.load is not None:
        return None
    if cfg.checkpoint.auto_resume and find_latest_checkpoint(checkpoints_dir(cfg.checkpoint.experiment_dir)):
        return None
    return (f"model.encoder.path: null with model.encoder.kind={enc.kind} and nothing to load: set it to a "
            "local encoder directory (checkpoints_convert/prepare_pretrained.py --encoder lays one out), or "
            "model.encoder.random_init=true for a random tiny encoder (tests, demos)")


def check_run_inputs(cfg) -> list[str]:
    """The problems of the files ``cfg`` names, one line each (empty: all usable)."""
    problems = []
    if not cfg.data.train:
        problems.append("data.train: empty; list the tokenized datasets to train on "
                        "(e.g. data.train='[{path: data/tok/tta, task: caption_to_audio, weight: 1}]')")
    vocab = cfg.model.vocab()
    for split in ("train", "valid"):
        for i, spec in enumerate(getattr(cfg.data, split)):
            problems.append(_dataset_problem(f"data.{split}[{i}]", spec, vocab))
    problems.append(_checkpoint_problem(cfg))
    problems.append(_directory_problem("paths.tokenizer", cfg.paths.tokenizer, "HF tokenizer",
                                       ("tokenizer.json", "tokenizer_config.json")))
    if cfg.paths.codec != "tiny":
        problems.append(_directory_problem("paths.codec", cfg.paths.codec, "HF XcodecModel", ("config.json",)))
    if cfg.model.encoder.kind != "none":
        problems.append(_directory_problem("model.encoder.path", cfg.model.encoder.path, "HF audio encoder",
                                           ("config.json",)))
        problems.append(_random_encoder_problem(cfg))
    return [p for p in problems if p]


def require_run_inputs(cfg) -> None:
    """Raise UserError on every rank when any rank found a problem (call on all ranks)."""
    problems = check_run_inputs(cfg)
    where = ""
    if dist.is_initialized() and dist.get_world_size() > 1:
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, problems)
        rank = next((r for r, p in enumerate(per_rank) if p), None)
        problems = per_rank[rank] if rank is not None else []
        where = f" (found on rank {rank} of {len(per_rank)})"
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise UserError(problems[0] + more + where)
