"""Paired preference datasets for DPO: rows that hold whole (chosen, rejected) pairs.

A preference set at prefix ``P`` is two ordinary caption_to_audio datasets, ``P.chosen`` and
``P.rejected``, whose document i is pair i, plus ``P.pairs.json`` ({"pairs": N, ...}).

Rows are planned like any training rows (``loader.PackedRows``: blend, then pack), but the
unit is a pair: its length is the two examples' positions together, so a pair never
straddles two rows or two micro-batches. In a row, pair j's chosen example is document
2j and its rejected example document 2j + 1; both get the same classifier-free-guidance
decision (one draw per pair).

Extra batch keys (``collate_pairs``; P = most pairs in a row of the micro-batch):
    pair_index [B, P] int64 (pair number in its dataset; -1: no pair in that slot),
    pair_dataset [B, P] int64 (position of the dataset in the blend),
    reference_logps [B, P, 2] float64 (log pi_ref of chosen, rejected; 0 when not loaded).

Reference log-probabilities are stored beside the dataset as
``P.reference.<key>.npy`` (float64 [N, 2]) and ``P.reference.<key>.json``, where key is a
short hash of the reference checkpoint's identity and the dataset's fingerprint.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os

import numpy as np
import torch

from megatron_ualm.data.indexed import TokenizedDataset, bin_path, idx_path
from megatron_ualm.data.loader import PackedRows, collate
from megatron_ualm.errors import UserError
from megatron_ualm.fileutil import read_json, sha256_file
from megatron_ualm.formats import templates as T

SIDES = ("chosen", "rejected")


class PreferenceError(UserError, ValueError):
    """A preference set or its reference log-probabilities do not fit the run."""


def pairs_json(prefix: str) -> str:
    return f"{prefix}.pairs.json"


class PairSource:
    """A preference set at ``prefix``: ``pair(i)`` -> (chosen segments, rejected segments).

    ``reference``: float64 [N, 2] reference log-probs, or None (scoring). A view over pairs
    [start, stop) (``subset``) reports pair numbers of the whole set."""

    def __init__(self, prefix: str, vocab=None, reference: np.ndarray | None = None):
        self.prefix = os.fspath(prefix)
        self.sides = [TokenizedDataset(f"{self.prefix}.{s}", vocab=vocab, task="caption_to_audio") for s in SIDES]
        meta = read_json(pairs_json(self.prefix), "write it with the preference data tool", PreferenceError)
        n = [len(s) for s in self.sides]
        if n[0] != n[1] or meta.get("pairs") != n[0]:
            raise PreferenceError(f"{self.prefix}: {pairs_json(self.prefix)} says {meta.get('pairs')} pairs, "
                                  f".chosen holds {n[0]} and .rejected {n[1]} documents; rebuild the set")
        self.start, self.stop = 0, n[0]
        self.reference = reference
        self._rows = None

    def subset(self, start: int, stop: int) -> "PairSource":
        view = object.__new__(PairSource)
        view.__dict__.update(self.__dict__)
        view.start, view.stop, view._rows = start, min(stop, self.stop), None
        return view

    def __len__(self) -> int:
        return self.stop - self.start

    def rows(self) -> np.ndarray:
        """int64 [N]: rows of the two examples together minus one, so that the planner's
        "rows - 1" is the pair's training positions."""
        if self._rows is None:
            c, r = (s.rows()[self.start:self.stop] for s in self.sides)
            self._rows = c + r - 1
        return self._rows

    def pair(self, i: int) -> tuple[list, list]:
        return tuple(s.segments(self.start + i) for s in self.sides)

    def clip(self, clip_index: int):
        raise PreferenceError(f"{self.prefix}: preference examples hold no continuous audio")

    def fingerprint(self) -> str:
        """sha256 over both sides' index files, the .bin sizes and pairs.json."""
        h = hashlib.sha256()
        for s in SIDES:
            p = f"{self.prefix}.{s}"
            h.update(sha256_file(idx_path(p)).encode())
            h.update(str(os.path.getsize(bin_path(p))).encode())
        h.update(sha256_file(pairs_json(self.prefix)).encode())
        return h.hexdigest()


class PairedRows(PackedRows):
    """``PackedRows`` whose planning unit is a pair (see the module docstring)."""

    def __getitem__(self, index: int) -> dict:
        s = self.settings
        S, K = s.seq_length, self.vocab.num_codebooks
        out = {"tokens": np.zeros((S, K), np.int64), "labels": np.zeros((S, K), np.int64),
               "loss_weights": np.zeros((S, K), np.float32), "position_ids": np.zeros(S, np.int64),
               "document_ids": np.full(S, -1, np.int32), "task_ids": np.full(S, -1, np.int64),
               "clips": [], "clip_rows": []}
        plan = self.row_plan(index)
        pair_index = np.full(len(plan), -1, np.int64)
        pair_dataset = np.full(len(plan), -1, np.int64)
        reference = np.zeros((len(plan), 2), np.float64)
        at = 0
        for slot, (d, i, n) in enumerate(plan):
            src = self.sources[d]
            examples = [T.layout(seg, self.vocab, s.loss_on) for seg in src.pair(i)]
            if s.cfg_dropout_prob > 0 and np.random.default_rng([s.seed, index, slot]).random() < s.cfg_dropout_prob:
                examples = [T.cfg_dropout(ex) for ex in examples]  # one decision for both sides
            if sum(ex.num_rows - 1 for ex in examples) != n:
                raise PreferenceError(f"{src.prefix}: pair {src.start + i} does not fit its planned length "
                                      "(a pair is never truncated; data.overlong must be drop)")
            for side, ex in enumerate(examples):
                m = ex.num_rows - 1
                out["tokens"][at:at + m] = ex.tokens[:m]
                out["labels"][at:at + m] = ex.tokens[1:]
                out["loss_weights"][at:at + m] = ex.weights[1:]
                out["position_ids"][at:at + m] = np.arange(m)
                out["document_ids"][at:at + m] = 2 * slot + side
                out["task_ids"][at:at + m] = self.tasks[d]
                at += m
            pair_index[slot], pair_dataset[slot] = src.start + i, d
            if src.reference is not None:
                reference[slot] = src.reference[src.start + i]
        out.update(pair_index=pair_index, pair_dataset=pair_dataset, reference_logps=reference)
        return out

    @staticmethod
    def collate(rows: list[dict]) -> dict:
        return collate_pairs(rows)


def collate_pairs(rows: list[dict]) -> dict:
    """``loader.collate`` plus the pair keys, padded to the most pairs in a row."""
    batch = collate(rows)
    P = max(1, max(len(r["pair_index"]) for r in rows))
    index = torch.full((len(rows), P), -1, dtype=torch.int64)
    dataset = torch.full((len(rows), P), -1, dtype=torch.int64)
    reference = torch.zeros((len(rows), P, 2), dtype=torch.float64)
    for b, r in enumerate(rows):
        n = len(r["pair_index"])
        index[b, :n] = torch.from_numpy(r["pair_index"])
        dataset[b, :n] = torch.from_numpy(r["pair_dataset"])
        reference[b, :n] = torch.from_numpy(r["reference_logps"])
    batch.update(pair_index=index, pair_dataset=dataset, reference_logps=reference)
    return batch


# --- stored reference log-probabilities -------------------------------------------------------
def reference_key(checkpoint: dict, fingerprint: str) -> str:
    """Short hash naming the reference file of (checkpoint identity, dataset fingerprint)."""
    blob = json.dumps({"checkpoint": checkpoint["files_sha256"], "dataset": fingerprint}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def reference_paths(prefix: str, key: str) -> tuple[str, str]:
    return f"{prefix}.reference.{key}.npy", f"{prefix}.reference.{key}.json"


def _describe(info: dict) -> str:
    c = info["checkpoint"]
    return f"checkpoint {c['path']} (iteration {c['iteration']}) on dataset {info['dataset'][:12]}"


def load_reference(source: PairSource, checkpoint: dict, score_hint: str) -> np.ndarray:
    """The stored float64 [N, 2] reference log-probs of ``source`` scored with ``checkpoint``
    (``checkpoint_identity``); PreferenceError (one line, naming both) when only numbers of
    another checkpoint or dataset version are stored, or none."""
    fingerprint = source.fingerprint()
    npy, meta = reference_paths(source.prefix, reference_key(checkpoint, fingerprint))
    wanted = {"checkpoint": checkpoint, "dataset": fingerprint}
    if os.path.exists(npy) and os.path.exists(meta):
        values = np.load(npy)
        if values.shape != (len(source), 2):
            raise PreferenceError(f"{npy}: holds {values.shape[0]} pairs, the set {len(source)}; {score_hint}")
        return values
    others = sorted(glob.glob(f"{glob.escape(source.prefix)}.reference.*.json"))
    if others:
        info = read_json(others[-1], score_hint, PreferenceError)
        raise PreferenceError(f"{source.prefix}: the stored reference log-probs {others[-1]} were scored with "
                              f"{_describe(info)}, but this run's reference is {_describe(wanted)}; {score_hint}")
    raise PreferenceError(f"{source.prefix}: no reference log-probs scored with {_describe(wanted)}; {score_hint}")


__all__ = ["PairSource", "PairedRows", "PreferenceError", "collate_pairs", "load_reference", "reference_key",
           "reference_paths", "pairs_json"]
