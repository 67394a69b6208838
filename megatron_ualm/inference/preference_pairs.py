"""Preference pairs from a model's own samples (SPEC section 9): N clips per caption, scored
by a scorer the user supplies; the best clip is ``chosen``, the worst ``rejected``.

Scorer: ``score(captions: list[str], waveforms: list[float32 [n] at 16 kHz], sample_rate)
-> list[float]``, higher is better, named as ``module:function`` or given as a local CLAP
model directory (:func:`load_directory_scorer`).

Captions file: JSONL with ``"caption"`` (and optionally ``"id"``), or plain text lines.
Output: a preference JSONL that ``data/preferences.py`` reads, one line per kept caption,

    {"id": "c0", "prompt": "...", "chosen": "<stem>.codes/000000_c0_2.npy",
     "rejected": "<stem>.codes/000000_c0_0.npy", "chosen_score": .9, "rejected_score": .1,
     "scores": [.1, .5, .9, .3]}

with the chosen and rejected codec codes (int [K, T]) written as .npy beside it. Clip j of a
caption is sampled with the seed ``request_seed(seed, f"{id}#{j}")``, so the result does not
depend on the batching; captions finished by an interrupted run (``<out>.parts/``) are not
generated again. Captions that give fewer than two non-empty clips, or only equal scores,
are skipped and listed in ``<out>.rejects.jsonl``.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import numpy as np

from megatron_ualm.errors import UserError

Scorer = Callable[[list, list, int], list]
SAMPLE_RATE = 16000


@dataclass
class PairSamplingConfig:
    checkpoint: str                 # Megatron checkpoint/experiment dir or exported HF dir
    captions: str                   # JSONL with "caption" [and "id"], or text lines
    out: str                        # output preference JSONL; codes in <out stem>.codes/
    scorer: str                     # module:function, or a local CLAP model directory
    clips_per_caption: int = 4
    seed: int = 0
    temperature: float = 0.8        # audio sampling temperature
    top_k: int = 20                 # audio top-k per stream
    guidance_scale: float = 3.0
    max_audio_seconds: float = 10.0
    batch_size: int = 16            # requests (clips) per engine batch
    tokenizer: Optional[str] = None  # default: the checkpoint's
    codec: Optional[str] = None      # default: the checkpoint's
    device: Optional[str] = None     # default: cuda when available
    precision: Optional[str] = None  # default: bf16 on cuda, fp32 on cpu
    progress: bool = True

    def __post_init__(self):
        if self.clips_per_caption < 2:
            raise UserError(f"--clips-per-caption {self.clips_per_caption}: need at least 2 to make a pair")

    def settings(self, frame_rate: float):
        from megatron_ualm.inference.sampling import GenerationSettings
        return GenerationSettings(audio_temperature=self.temperature, audio_top_k=self.top_k,
                                  guidance_scale=self.guidance_scale, max_audio_seconds=self.max_audio_seconds,
                                  max_new_rows=int(self.max_audio_seconds * frame_rate) + 64,
                                  frame_rate=frame_rate, seed=self.seed, batch_size=self.batch_size)


# --- scorers ------------------------------------------------------------------------------------
def load_directory_scorer(path: str, device: str = "cpu") -> Scorer:
    """A local CLAP model directory (transformers ClapModel + ClapProcessor) -> a scorer giving
    the cosine similarity of each caption's text embedding and its clip's audio embedding
    (``evaluation.clap.ClapScorer``, the one ``megatron_ualm.evaluate --clap`` uses)."""
    import torch

    from megatron_ualm.evaluation.clap import SOURCE_RATE, ClapScorer
    clap = ClapScorer(path, torch.device(device), option="--scorer")

    def score(captions, waveforms, sample_rate):
        if sample_rate != SOURCE_RATE:
            raise ValueError(f"CLAP scorer: clips at {sample_rate} Hz, expected {SOURCE_RATE}")
        return clap.scores(captions, waveforms)
    return score


def load_scorer(spec: str, device: str = "cpu") -> Scorer:
    """``module:function`` (imported; the current directory is importable) or a CLAP directory."""
    if os.path.isdir(spec):
        return load_directory_scorer(spec, device)
    module, _, name = spec.partition(":")
    if not module or not name:
        raise UserError(f"--scorer {spec!r}: pass module:function (a Python callable) or a local "
                        "CLAP model directory")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"--scorer {spec!r}: cannot import it ({e})") from None
    if not callable(fn):
        raise UserError(f"--scorer {spec!r}: {name} is not callable")
    return fn


# --- captions -----------------------------------------------------------------------------------
def read_captions(path: str) -> tuple[list[tuple[str, str]], list[dict]]:
    """([(id, caption)], rejects). Lines starting with '{' are JSON with "caption" [and "id"];
    others are captions as they are. Ids default to the 0-based caption number."""
    if not os.path.isfile(path):
        raise UserError(f"--captions: {path}: no such file")
    captions, rejects, seen = [], [], set()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            ident, text = str(len(captions) + len(rejects)), line.strip()
            if text.startswith("{"):
                try:
                    obj = json.loads(text)
                    text = obj["caption"]
                    ident = str(obj.get("id", ident))
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    rejects.append({"file": path, "line": lineno, "reason": "bad_json",
                                    "message": f"need a JSON object with 'caption' ({e!r})"})
                    continue
            if not isinstance(text, str) or not text.strip():
                rejects.append({"file": path, "line": lineno, "reason": "empty_text", "message": "empty caption"})
            elif ident in seen:
                rejects.append({"file": path, "line": lineno, "reason": "duplicate_id", "message": f"id {ident!r}"})
            else:
                seen.add(ident)
                captions.append((ident, text.strip()))
    return captions, rejects


# --- the run ------------------------------------------------------------------------------------
def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:48] or "c"


def codes_dir(out: str) -> str:
    return os.path.splitext(out)[0] + ".codes"


def sample_pairs(engine, tokenize, codec, captions: list[tuple[str, str]], cfg: PairSamplingConfig,
                 scorer: Scorer, fingerprint: str = "") -> tuple[list[dict], list[dict]]:
    """Generate, score and pick for every caption; returns (pair lines, rejects) in caption
    order. Finished captions are kept under ``<out>.parts/`` and reused by a re-run."""
    from tqdm import tqdm

    from megatron_ualm.inference.outputs import segment_codes
    from megatron_ualm.inference.prompts import build_prompt
    from megatron_ualm.inference.sampling import request_seed

    settings = cfg.settings(codec.info.frame_rate)
    parts, cdir = cfg.out + ".parts", codes_dir(cfg.out)
    os.makedirs(parts, exist_ok=True)
    os.makedirs(cdir, exist_ok=True)
    n = cfg.clips_per_caption
    done: dict[int, dict] = {}
    for i in range(len(captions)):
        part = _read(os.path.join(parts, f"{i:06d}.json"))
        if part is not None and part.get("fingerprint") == fingerprint:
            done[i] = part
    todo = [i for i in range(len(captions)) if i not in done]
    per_step = max(1, cfg.batch_size // n)  # captions per engine batch
    bar = tqdm(total=len(captions), initial=len(done), desc="sampling pairs", unit=" captions",
               disable=not cfg.progress, dynamic_ncols=True)
    for start in range(0, len(todo), per_step):
        group = todo[start:start + per_step]
        prompts = [build_prompt({"caption": captions[i][1]}, engine.vocab, tokenize,
                                seed=request_seed(cfg.seed, f"{captions[i][0]}#{j}"))
                   for i in group for j in range(n)]
        gens = engine.generate(prompts, settings)
        clips = []
        for g in gens:
            audio = [s for s in g.segments if s.modality != "text"]
            codes = segment_codes(audio[0], engine.vocab) if audio else np.zeros((engine.vocab.num_codebooks, 0))
            clips.append(codes)
        usable = [k for k, c in enumerate(clips) if c.shape[1] > 0]
        waves = [np.clip(codec.decode(clips[k]), -1.0, 1.0).astype(np.float32) for k in usable]
        scores = [float(s) for s in scorer([captions[group[k // n]][1] for k in usable], waves, SAMPLE_RATE)]
        if len(scores) != len(usable):
            raise UserError(f"--scorer {cfg.scorer}: returned {len(scores)} scores for {len(usable)} clips")
        by_clip = dict(zip(usable, scores))
        for g_i, i in enumerate(group):
            ident, caption = captions[i]
            own = [by_clip.get(g_i * n + j) for j in range(n)]
            part = {"fingerprint": fingerprint, "scores": own}
            valid = [j for j in range(n) if own[j] is not None]
            if len(valid) < 2:
                part["reject"] = {"reason": "too_few_clips", "message": f"{len(valid)} of {n} clips hold audio"}
            elif max(own[j] for j in valid) == min(own[j] for j in valid):
                part["reject"] = {"reason": "tied_scores", "message": f"all {len(valid)} clips score the same"}
            else:
                best = max(valid, key=lambda j: (own[j], -j))   # first of the best
                worst = min(valid, key=lambda j: (own[j], j))   # first of the worst
                names = {}
                for side, j in (("chosen", best), ("rejected", worst)):
                    name = f"{i:06d}_{_safe(ident)}_{j}.npy"
                    _save_npy(os.path.join(cdir, name), clips[g_i * n + j])
                    names[side] = os.path.join(os.path.basename(cdir), name)
                part["pair"] = {"id": ident, "prompt": caption, "chosen": names["chosen"],
                                "rejected": names["rejected"], "chosen_score": own[best],
                                "rejected_score": own[worst], "scores": own}
            _write_json(os.path.join(parts, f"{i:06d}.json"), part)
            done[i] = part
        bar.update(len(group))
    bar.close()
    lines, rejects = [], []
    for i in range(len(captions)):
        part = done[i]
        if "pair" in part:
            lines.append(part["pair"])
        else:
            rejects.append({"id": captions[i][0], "caption_index": i, **part["reject"]})
    return lines, rejects


def _read(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def _write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, sort_keys=True)
    os.replace(tmp, path)


def _save_npy(path: str, codes: np.ndarray) -> None:
    tmp = f"{path}.tmp{os.getpid()}.npy"
    np.save(tmp, np.asarray(codes, np.int32))
    os.replace(tmp, path)


def fingerprint_of(cfg: PairSamplingConfig, captions_sha: str) -> str:
    keys = {k: v for k, v in asdict(cfg).items() if k not in ("out", "progress", "batch_size", "device")}
    keys["checkpoint"] = os.path.abspath(cfg.checkpoint)
    keys["captions"] = captions_sha
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()


def make_preference_pairs(cfg: PairSamplingConfig):
    """Load the checkpoint, sample, score, write ``cfg.out`` (and its codes); returns the
    manifests.RunSummary."""
    import torch

    from megatron_ualm.data.manifests import Rejects, RunSummary
    from megatron_ualm.fileutil import sha256_file
    from megatron_ualm.inference.engine import Engine
    from megatron_ualm.inference.loading import load_codec_for, load_model, load_tokenizer_for, open_checkpoint
    from megatron_ualm.runtime import init_runtime, shutdown_runtime

    t0 = time.perf_counter()
    captions, bad_lines = read_captions(cfg.captions)
    if not captions:
        raise UserError(f"--captions: {cfg.captions} holds no usable caption")
    source = open_checkpoint(cfg.checkpoint)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but no CUDA GPU is visible; pass --device cpu")
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    scorer = load_scorer(cfg.scorer, device)
    rt = init_runtime(device=device, seed=0)
    try:
        precision = cfg.precision or ("bf16" if rt.device.type == "cuda" else "fp32")
        tokenizer = load_tokenizer_for(source, cfg.tokenizer)
        codec = load_codec_for(source, rt.device, cfg.codec)
        engine = Engine(load_model(source, rt.device, precision), tokenizer_size=len(tokenizer))
        fp = fingerprint_of(cfg, sha256_file(cfg.captions))
        lines, skipped = sample_pairs(engine, tokenizer.encode, codec, captions, cfg, scorer, fp)
    finally:
        shutdown_runtime()
    tmp = f"{cfg.out}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(line, sort_keys=True, ensure_ascii=False) + "\n" for line in lines)
    os.replace(tmp, cfg.out)
    summary = RunSummary(f"preference pairs from samples -> {cfg.out}", kept=len(lines),
                         rejects_file=f"{cfg.out}.rejects.jsonl")
    with Rejects(summary.rejects_file) as rejects:
        for r in bad_lines + skipped:
            rejects.add(r)
    summary.rejected.update(rejects.counts)
    summary.figures["clips"] = f"{len(captions) * cfg.clips_per_caption:,} sampled ({cfg.clips_per_caption} per caption)"
    summary.figures["codes"] = codes_dir(cfg.out)
    summary.figures["time"] = f"{time.perf_counter() - t0:.1f} s"
    shutil.rmtree(cfg.out + ".parts", ignore_errors=True)
    return summary


def main(argv=None) -> int:
    import argparse

    from megatron_ualm.cli import ArgumentParser, exit_on_user_error
    from megatron_ualm.data.manifests import DEFAULT_MAX_REJECT_FRACTION

    defaults = PairSamplingConfig.__dataclass_fields__
    p = ArgumentParser(description="Preference pairs from a model's own text-to-audio samples.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="Megatron checkpoint/experiment dir or exported HF dir")
    p.add_argument("--captions", required=True, help='JSONL with "caption" [and "id"], or one caption a line')
    p.add_argument("--out", required=True, help="output preference JSONL (codes go to <out stem>.codes/)")
    p.add_argument("--scorer", required=True, help="module:function (score(captions, waveforms, sample_rate) "
                                                   "-> list[float], higher is better) or a local CLAP directory")
    for name, kind, text in (("clips_per_caption", int, "clips sampled per caption"),
                             ("seed", int, "sampling seed (clip j of caption id uses request_seed(seed, 'id#j'))"),
                             ("temperature", float, "audio sampling temperature"),
                             ("top_k", int, "audio top-k per stream"),
                             ("guidance_scale", float, "classifier-free guidance scale (1: none)"),
                             ("max_audio_seconds", float, "longest clip generated"),
                             ("batch_size", int, "clips per engine batch")):
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=defaults[name].default, help=text)
    p.add_argument("--tokenizer", help="local HF tokenizer directory (None: the checkpoint's)")
    p.add_argument("--codec", help="local HF XcodecModel directory (None: the checkpoint's)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="None: cuda when a GPU is visible")
    p.add_argument("--precision", choices=("fp32", "bf16"), help="None: bf16 on cuda, fp32 on cpu")
    p.add_argument("--max-reject-fraction", type=float, default=max(DEFAULT_MAX_REJECT_FRACTION, 0.5),
                   help="fail when more captions than this share give no pair")
    p.add_argument("--no-progress", action="store_true")
    args = vars(p.parse_args(argv))
    limit = args.pop("max_reject_fraction")
    args["progress"] = not args.pop("no_progress")

    @exit_on_user_error
    def run() -> int:
        return make_preference_pairs(PairSamplingConfig(**args)).finish(limit)
    return run()
