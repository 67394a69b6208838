"""Lay out downloaded HF checkpoints as ``pretrained/`` the example configs expect.

    pretrained/qwen2.5-<size>/             the Qwen2.5 backbone + tokenizer (linked or copied)
    pretrained/xcodec-hubert-general/      the X-Codec (transformers ``XcodecModel``; linked or copied)
    pretrained/qwen2.5-omni-audio-encoder/ the Qwen2.5-Omni audio tower alone (extracted from a
                                           full Qwen2.5-Omni / thinker checkpoint, or linked)
    pretrained/whisper-encoder/            a Whisper encoder alone (extracted from a full Whisper, or
                                           AF-Whisper from an Audio Flamingo 3 checkpoint)

Nothing is downloaded: every input is a local directory. Each part is checked before
anything is written (model type and architecture, every tensor the config implies present
with its shape, float dtypes, index files naming existing shards, the backbone's tokenizer
files); a wrong or partial directory raises ``ConversionError`` naming it. A part appears
whole or not at all (``output.atomic_output_dir``). The backbone's name follows its shape
(``BACKBONE_SIZES``: the sizes of examples/qwen2.5-*.yaml). The encoder is extracted by
streaming: one tensor read from the source shards and written out at a time, and only the
audio tower's tensors are read.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from megatron_ualm.convert.encoder_weights import EncoderWeights, open_encoder, write_encoder_dir
from megatron_ualm.convert.errors import ConversionError
from megatron_ualm.convert.hf_io import INDEX_FILE, HFCheckpoint, read_config
from megatron_ualm.convert.output import Report, atomic_output_dir, check_output_dir, progress
from megatron_ualm.fileutil import read_json

# (hidden_size, num_hidden_layers) of the Qwen2.5 sizes with an example config
BACKBONE_SIZES = {(896, 24): "0.5b", (1536, 28): "1.5b", (2048, 36): "3b", (3584, 28): "7b"}
CODEC_NAME = "xcodec-hubert-general"
ENCODER_NAMES = {"qwen2_5_omni": "qwen2.5-omni-audio-encoder", "whisper": "whisper-encoder",
                 "af_whisper": "af-whisper-encoder"}
TOKENIZER_FILES = "tokenizer.json (or vocab.json + merges.txt) and tokenizer_config.json"
_REDO = "download or copy it again"


@dataclass
class PrepareOptions:
    """What ``prepare_pretrained`` lays out; every input is optional (a subset is prepared)."""
    backbone: Optional[str] = None        # local Qwen2.5 HF directory (base or instruct)
    codec: Optional[str] = None           # local X-Codec directory in transformers XcodecModel layout
    encoder: Optional[str] = None         # Qwen2.5-Omni (full/thinker/audio encoder) or Whisper directory
    out: str = "pretrained"               # where the parts go
    name: Optional[str] = None            # backbone directory name (default qwen2.5-<size> from its shape)
    copy: bool = False                    # copy files instead of symlinking them
    overwrite: bool = False               # replace existing parts
    max_shard_bytes: int = 5 << 30        # extracted encoder: shard size
    show_progress: Optional[bool] = None  # tqdm bar over tensors (None: when stderr is a terminal)


@dataclass
class Part:
    """One laid-out part, for the summary."""
    what: str
    source: str
    target: str
    how: str
    nbytes: int
    dtypes: dict[str, int] = field(default_factory=dict)  # dtype name -> tensor count
    values: int = 0                                      # weights (numbers) in the part


# --- checks ------------------------------------------------------------------------------------
def _open_checked(directory: str, prefix: str = "") -> HFCheckpoint:
    """``HFCheckpoint`` with the index's shard files checked first (one line naming the
    missing shard)."""
    index = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index):
        doc = read_json(index, _REDO, ConversionError)
        weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(weight_map, dict):
            raise ConversionError(f"{index}: no \"weight_map\" object; the directory is damaged: {_REDO}")
        for shard in sorted(set(weight_map.values())):
            if not os.path.isfile(os.path.join(directory, shard)):
                tensor = next(k for k, v in weight_map.items() if v == shard)
                raise ConversionError(f"{directory}: shard {shard} (tensor {tensor}, listed in {INDEX_FILE}) is "
                                      f"missing; the download is incomplete: fetch that file too")
    return HFCheckpoint(directory, prefix)


def _numel(shapes) -> int:
    total = 0
    for shape in shapes:
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


def _dtype_counts(directory: str, dtypes: dict[str, torch.dtype]) -> dict[str, int]:
    """Tensor count per dtype; refuses non-float weights."""
    counts: dict[str, int] = {}
    for name, dt in dtypes.items():
        if not dt.is_floating_point:
            raise ConversionError(f"{directory}: tensor {name} has dtype {dt} (quantized or not a weight); only "
                                  "float checkpoints (fp32/bf16/fp16) can be used: pass the unquantized model")
        key = str(dt).replace("torch.", "")
        counts[key] = counts.get(key, 0) + 1
    return counts


def _check_model_type(directory: str, config: dict, model_types: tuple[str, ...], arch: Optional[str],
                      what: str) -> None:
    where = os.path.join(directory, "config.json")
    model_type, archs = config.get("model_type"), config.get("architectures") or []
    if model_type not in model_types or (arch and archs and arch not in archs):
        raise ConversionError(f"{where}: model_type {model_type!r}, architectures {archs} is not {what}; "
                              "pass the right directory")


def _check_tokenizer(directory: str) -> None:
    has = lambda n: os.path.isfile(os.path.join(directory, n))  # noqa: E731
    if not (has("tokenizer_config.json") and (has("tokenizer.json") or (has("vocab.json") and has("merges.txt")))):
        missing = [n for n in ("tokenizer.json", "tokenizer_config.json") if not has(n)]
        raise ConversionError(f"{directory}: tokenizer files missing ({', '.join(missing)}; needs {TOKENIZER_FILES}); "
                              "download the tokenizer files of the model too")


def backbone_name(config: dict, directory: str) -> str:
    """``qwen2.5-<size>`` of a Qwen2 config; refuses a shape no example config uses."""
    key = (config.get("hidden_size"), config.get("num_hidden_layers"))
    if key not in BACKBONE_SIZES:
        known = ", ".join(f"{s}: hidden_size={h}, num_hidden_layers={n}" for (h, n), s in BACKBONE_SIZES.items())
        raise ConversionError(f"{directory}/config.json: hidden_size={key[0]}, num_hidden_layers={key[1]} is none of "
                              f"the Qwen2.5 sizes of examples/qwen2.5-*.yaml ({known}); pass --name to lay it out "
                              "under a name of your own (and write a config with its shape)")
    return f"qwen2.5-{BACKBONE_SIZES[key]}"


def check_backbone(directory: str) -> tuple[dict, dict[str, int], int]:
    """(config, dtype counts, values) of a valid Qwen2.5 causal-LM directory with its tokenizer."""
    from megatron_ualm.convert.hf_to_megatron import check_hf_tensors, check_qwen2
    from megatron_ualm.convert.layout import hf_shapes
    from megatron_ualm.model.hf_adapter import qwen2_shape
    config = read_config(directory)
    check_qwen2(config, directory)
    with _open_checked(directory) as ckpt:
        qkv_bias = "model.layers.0.self_attn.q_proj.bias" in ckpt.names
        tied = bool(config.get("tie_word_embeddings", False)) or "lm_head.weight" not in ckpt.names
        check_hf_tensors(ckpt, hf_shapes(qwen2_shape(config), qkv_bias, tied), tied)
        dtypes = _dtype_counts(directory, {n: ckpt.dtype(n) for n in ckpt.names})
        values = _numel(ckpt.shape(n) for n in ckpt.names)
    _check_tokenizer(directory)
    return config, dtypes, values


def _weight_norm_name(name: str) -> str:
    """Old (``weight_g``/``weight_v``) and new (parametrizations) weight-norm names as one."""
    return (name.replace(".parametrizations.weight.original0", ".weight_g")
            .replace(".parametrizations.weight.original1", ".weight_v"))


def check_codec(directory: str) -> tuple[dict, dict[str, int], int]:
    """(config, dtype counts, values) of a valid XcodecModel directory."""
    from transformers import XcodecConfig, XcodecModel
    config = read_config(directory)
    _check_model_type(directory, config, ("xcodec",), "XcodecModel",
                      "an X-Codec in transformers' XcodecModel layout (model_type 'xcodec')")
    try:
        with torch.device("meta"):
            reference = XcodecModel._from_config(XcodecConfig.from_pretrained(directory, local_files_only=True))
    except (ValueError, TypeError, KeyError, OSError) as e:
        raise ConversionError(f"{directory}/config.json: not a valid XcodecConfig ({e}); {_REDO}") from None
    expected = {_weight_norm_name(k): tuple(v.shape) for k, v in reference.state_dict().items()}
    with _open_checked(directory) as ckpt:
        found = {_weight_norm_name(n): tuple(ckpt.shape(n)) for n in ckpt.names}
        dtypes = _dtype_counts(directory, {n: ckpt.dtype(n) for n in ckpt.names})
    _check_tensors(directory, expected, found, "the XcodecModel its config.json describes")
    return config, dtypes, _numel(found.values())


def _check_tensors(directory: str, expected: dict, found: dict, what: str) -> None:
    missing = sorted(set(expected) - set(found))
    if missing:
        raise ConversionError(f"{directory}: tensor {missing[0]} (and {len(missing) - 1} more) of {what} is missing; "
                              f"the checkpoint is incomplete or does not match config.json: {_REDO}")
    wrong = sorted(n for n in expected if found[n] != expected[n])
    if wrong:
        n = wrong[0]
        raise ConversionError(f"{directory}: tensor {n} has shape {found[n]}, config.json implies {expected[n]} "
                              f"({len(wrong)} mismatched); config.json does not describe these weights: {_REDO}")


def encoder_kind(directory: str) -> tuple[str, bool, str]:
    """(encoder kind, whether the tensors must be extracted, target name) of an encoder directory."""
    config = read_config(directory)
    model_type = config.get("model_type")
    if model_type == "qwen2_5_omni_audio_encoder":
        return "qwen2_5_omni", False, ENCODER_NAMES["qwen2_5_omni"]
    if model_type in ("qwen2_5_omni", "qwen2_5_omni_thinker"):
        audio = (config.get("thinker_config") or {}) if model_type == "qwen2_5_omni" else config
        if "audio_config" not in audio:
            raise ConversionError(f"{directory}/config.json: model_type {model_type!r} without "
                                  f"{'thinker_config.' if model_type == 'qwen2_5_omni' else ''}audio_config; "
                                  f"the config is incomplete: {_REDO}")
        return "qwen2_5_omni", True, ENCODER_NAMES["qwen2_5_omni"]
    if model_type in ("audioflamingo3", "audioflamingo3_encoder"):
        return "whisper", True, ENCODER_NAMES["af_whisper"]  # its config is rewritten as a WhisperConfig
    if model_type == "whisper":
        with _open_checked(directory) as ckpt:
            prefixed = any(n.startswith(("model.encoder.", "encoder.")) for n in ckpt.names)
        return "whisper", prefixed, ENCODER_NAMES["whisper"]
    raise ConversionError(f"{directory}/config.json: model_type {model_type!r} is not an audio encoder we use "
                          "(expected a Qwen2.5-Omni model 'qwen2_5_omni' / thinker / 'qwen2_5_omni_audio_encoder', "
                          "a Whisper model 'whisper', or Audio Flamingo 3 'audioflamingo3' for AF-Whisper); pass the right "
                          "--encoder directory")


def open_checked_encoder(directory: str) -> tuple[str, bool, str, EncoderWeights, dict[str, int]]:
    """(kind, extract?, target name, weights, dtype counts) of a valid encoder directory."""
    kind, extract, name = encoder_kind(directory)
    _open_checked(directory).close()  # the index's shards exist
    encoder = open_encoder(kind, directory)
    try:
        dtypes = _dtype_counts(directory, encoder.dtypes)
    except ConversionError:
        encoder.close()
        raise
    return kind, extract, name, encoder, dtypes


# --- laying out --------------------------------------------------------------------------------
def _files(directory: str) -> list[str]:
    """Relative paths of the regular files of ``directory`` (hidden entries skipped)."""
    out = []
    for root, dirs, files in os.walk(directory, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = os.path.relpath(root, directory)
        out += [os.path.normpath(os.path.join(rel, f)) for f in sorted(files) if not f.startswith(".")]
    return out


def _link_dir(source: str, target: str, copy: bool, overwrite: bool) -> int:
    """Symlink (or copy) every file of ``source`` into a new ``target``; returns the bytes."""
    source = os.path.abspath(source)
    total = 0
    with atomic_output_dir(target, overwrite) as tmp:
        for rel in _files(source):
            src, dst = os.path.join(source, rel), os.path.join(tmp, rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            if copy:
                shutil.copy2(src, dst)
            else:
                os.symlink(os.path.realpath(src), dst)
            total += os.path.getsize(src)
    return total


def _dir_bytes(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(directory, f)) for f in _files(directory))


def prepare_pretrained(opts: PrepareOptions) -> tuple[Report, list[Part]]:
    """Check every given part, then lay each out under ``opts.out``. Returns (report, parts)."""
    if not (opts.backbone or opts.codec or opts.encoder):
        raise ConversionError("nothing to prepare: pass at least one of --backbone, --codec, --encoder")
    out = os.path.abspath(opts.out)
    # check everything first, so a refusal leaves nothing half laid out
    plans: list[tuple[str, str, str, Callable[[], Part]]] = []
    if opts.backbone:
        config, dtypes, values = check_backbone(opts.backbone)
        name = opts.name or backbone_name(config, opts.backbone)
        plans.append(("backbone", opts.backbone, os.path.join(out, name),
                      lambda t, d=dtypes, v=values: _linked("backbone + tokenizer", opts.backbone, t, d, v, opts)))
    if opts.codec:
        _, dtypes, values = check_codec(opts.codec)
        plans.append(("codec", opts.codec, os.path.join(out, CODEC_NAME),
                      lambda t, d=dtypes, v=values: _linked("codec (XcodecModel)", opts.codec, t, d, v, opts)))
    encoder = None
    try:
        if opts.encoder:
            kind, extract, name, encoder, dtypes = open_checked_encoder(opts.encoder)
            target = os.path.join(out, name)
            what = f"audio encoder ({kind})"
            if extract:
                plans.append(("encoder", opts.encoder, target,
                              lambda t, e=encoder, d=dtypes, w=what: _extracted(w, e, t, d, opts)))
            else:
                plans.append(("encoder", opts.encoder, target,
                              lambda t, d=dtypes, w=what, v=_numel(encoder.shapes.values()):
                              _linked(w, opts.encoder, t, d, v, opts)))
        for _, _, target, _ in plans:
            check_output_dir(target, opts.overwrite)
        parts = [make(target) for _, _, target, make in plans]
    finally:
        if encoder is not None:
            encoder.close()
    return _report(out, parts, opts), parts


def _linked(what: str, source: str, target: str, dtypes: dict, values: int, opts: PrepareOptions) -> Part:
    nbytes = _link_dir(source, target, opts.copy, opts.overwrite)
    return Part(what, os.path.abspath(source), target, "copied" if opts.copy else "linked", nbytes, dtypes,
                values)


def _extracted(what: str, encoder: EncoderWeights, target: str, dtypes: dict, opts: PrepareOptions) -> Part:
    bar = progress(len(encoder.shapes), "extract encoder", opts.show_progress)
    with atomic_output_dir(target, opts.overwrite) as tmp:
        os.rmdir(tmp)  # write_encoder_dir creates it
        write_encoder_dir(tmp, encoder, max_shard_bytes=opts.max_shard_bytes, on_tensor=lambda _: bar.update(1))
        nbytes = _dir_bytes(tmp)
    bar.close()
    return Part(what, encoder.source, target, "extracted", nbytes, dtypes, _numel(encoder.shapes.values()))


def _shown(path: str) -> str:
    """``path`` relative to the working directory when it lies below it, else absolute."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def _report(out: str, parts: list[Part], opts: PrepareOptions) -> Report:
    report = Report(f"pretrained parts -> {out}")
    for p in parts:
        report.tensor(p.what, p.values, sum(p.dtypes.values()))
    for p in parts:
        dts = ", ".join(f"{n} x {k}" for k, n in sorted(p.dtypes.items()))
        report.line(p.what, f"{_shown(p.target)}  ({p.how} from {p.source}; {p.nbytes / 2**20:,.1f} MiB; {dts})")
    backbone = next((p for p in parts if p.what.startswith("backbone")), None)
    encoder = next((p for p in parts if p.what.startswith("audio encoder")), None)
    whisper = encoder is not None and "whisper" in encoder.what
    if whisper:
        report.note(f"a Whisper encoder: train with model.encoder.kind=whisper "
                    f"model.encoder.path={_shown(encoder.target)}")
    present = set(os.listdir(out)) if os.path.isdir(out) else set()
    if not present & {f"qwen2.5-{s}" for s in BACKBONE_SIZES.values()} and backbone is None:
        report.note(f"no backbone in {_shown(out)} yet: add one with --backbone")
    if CODEC_NAME not in present:
        report.note(f"no {CODEC_NAME} in {_shown(out)} yet (paths.codec of the example configs): add it with --codec")
    if not present & set(ENCODER_NAMES.values()):
        report.note(f"no audio encoder in {_shown(out)} yet (model.encoder.path): add one with --encoder")
    if backbone is not None:
        name = os.path.basename(backbone.target)
        size = name[len("qwen2.5-"):] if name.startswith("qwen2.5-") else None
        config = f"examples/qwen2.5-{size}.yaml" if size in BACKBONE_SIZES.values() else "<your config>.yaml"
        enc = encoder.target if encoder is not None else os.path.join(out, ENCODER_NAMES["qwen2_5_omni"])
        report.line("next", f"python checkpoints_convert/hf_to_megatron.py --hf {_shown(backbone.target)} "
                            f"--config {config}{' --encoder whisper' if whisper else ''} --encoder-path {_shown(enc)} "
                            f"--out checkpoints/{name}-init")
    return report
