"""A UALM Megatron checkpoint (any TP/PP it was saved at) -> an HF directory, and back into
a model for inference.

    <output>/config.json                      Qwen2ForCausalLM, vocab_size = 256 + V_text, untied,
                                              bos/eos/pad = <|bos|>, [<|eos|>, <|eot|>], <|pad|>
    <output>/model.safetensors                backbone (or model-0000i-of-0000n.safetensors +
                                              model.safetensors.index.json above max_shard_bytes)
    <output>/ualm_extras.safetensors          audio_embedding/audio_head [K*(C+1), H],
                                              head.stream_embeddings [K-1, H],
                                              audio_encoder.adapter.*, audio_encoder.encoder.*
    <output>/ualm_config.json                 vocabulary layout, K/C, the UALM ModelConfig,
                                              the encoder's HF config, tokenizer/codec paths
    <output>/tokenizer.json, tokenizer_config.json, chat_template.jinja, generation_config.json,
    <output>/text_tokenizer/, README.md       when a tokenizer is known (``hf_chat``, ``model_card``)

``transformers.Qwen2ForCausalLM.from_pretrained(output)`` loads the backbone as is: its ids
are the unified ids [0, 256 + V_text) (special and text rows), its logits the UALM stream-0
logits of those rows on text-only input, and the exported tokenizer and chat template
give the same ids, so stock transformers holds the UALM text conversation format.
TP padding rows are dropped. A tied HF source comes back untied (``tie_word_embeddings``
false, ``lm_head`` = the UALM head's text rows, which start equal to the embedding's).
Tensors keep the checkpoint's dtype unless ``dtype`` is given. Memory: one decoder layer
(read from the checkpoint per layer) plus one vocabulary table at a time.
"""
from __future__ import annotations

import json
import os
from typing import Iterator, Optional

import torch
from torch import Tensor

from megatron_ualm.config import EncoderConfig, ModelConfig, PathsConfig, UALMConfig, from_dict, load_config, to_dict
from megatron_ualm.convert import ckpt_layout as L
from megatron_ualm.convert.dist_format import DistCheckpointReader
from megatron_ualm.convert import hf_chat
from megatron_ualm.convert.errors import ConversionError
from megatron_ualm.convert.hf_io import HFCheckpoint, SafetensorsStreamWriter, TensorSpec, read_config, write_sharded
from megatron_ualm.convert.layout import (
    ADAPTER, AUDIO_EMBEDDING, AUDIO_HEAD, EMBEDDING, ENCODER_PREFIX, FINAL_NORM, HEAD, SPECIAL_EMBEDDING,
    SPECIAL_HEAD, STREAMS, hf_layer_names, hf_shapes, hf_to_ualm_layer, layer_suffixes, stacked_key, ualm_layer_shapes,
    ualm_to_hf_layer,
)
from megatron_ualm.convert.model_card import model_card
from megatron_ualm.convert.output import Report, atomic_output_dir, check_output_dir, progress
from megatron_ualm.fileutil import read_json
from megatron_ualm.formats.vocab import NUM_SPECIAL_SLOTS, SPECIAL_TOKENS, UnifiedVocab
from megatron_ualm.model.hf_adapter import qwen2_config_dict
from megatron_ualm.training.checkpoint_files import read_manifest
from megatron_ualm.training.checkpoint_shapes import table_rows_problem

EXTRAS_FILE = "ualm_extras.safetensors"
UALM_CONFIG = "ualm_config.json"
FORMAT_VERSION = 2  # 2: the backbone holds the special rows, the tokenizer is exported
MODEL_KEY_PREFIXES = ("embedding.", "decoder.", "head.", "audio_encoder.")


def _shape_of(m: ModelConfig) -> dict:
    return dict(num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
                num_attention_heads=m.num_attention_heads, num_query_groups=m.num_query_groups,
                kv_channels=m.head_dim, text_vocab_size=m.text_vocab_size)


def _encoder_config(enc: EncoderConfig) -> Optional[dict]:
    """The HF config dict of the model's encoder (from its directory, or the tiny one)."""
    if enc.kind == "none":
        return None
    if enc.path is not None:
        from megatron_ualm.convert.encoder_weights import _locate
        return _locate(enc.kind, enc.path)[0]
    from megatron_ualm.model.audio_encoder import build_hf_encoder
    model, _ = build_hf_encoder(enc.kind, None, enc.tiny, enc.window_seconds)
    return model.config.to_dict()


class _CheckpointView:
    """The model tensors of a UALM checkpoint, checked against its config.yaml.

    saved_tp: the TP the checkpoint was saved at (its manifest), which its vocabulary tables
    are padded for; their rows must be exactly config.yaml's vocabulary so padded, or the
    exported special/text/audio rows would be cut at the wrong offsets."""

    def __init__(self, iter_dir: str, cfg: UALMConfig, saved_tp: Optional[int]):
        self.reader = DistCheckpointReader(iter_dir)
        self.cfg, m = cfg, cfg.model
        tensors = self.reader.tensors
        self.vocab = UnifiedVocab(m.text_vocab_size, m.num_codebooks, m.codebook_size)
        s = _shape_of(m)
        H, nl = m.hidden_size, m.num_layers
        self.fc1_split = stacked_key("mlp.linear_fc1.weight") not in tensors and \
            stacked_key("mlp.linear_fc1.weight_w") in tensors
        expected = {FINAL_NORM: (H,), STREAMS: (m.num_codebooks - 1, H)}
        for suffix, shp in ualm_layer_shapes(s, m.qkv_bias).items():
            if suffix == "mlp.linear_fc1.weight" and self.fc1_split:
                half = (nl, shp[0] // 2, *shp[1:])
                expected[stacked_key(suffix + "_w")] = expected[stacked_key(suffix + "_v")] = half
            else:
                expected[stacked_key(suffix)] = (nl, *shp)
        if m.encoder.kind != "none":
            expected.update({k: None for k in ADAPTER})
            expected.update({k: None for k in tensors if k.startswith(ENCODER_PREFIX)})
        where = iter_dir
        missing = sorted(k for k in list(expected) + [EMBEDDING, HEAD] if k not in tensors)
        extra = sorted(k for k in tensors if k.startswith(MODEL_KEY_PREFIXES) and k not in expected
                       and k not in (EMBEDDING, HEAD))
        if missing:
            raise ConversionError(f"{where}: model tensors missing from the checkpoint: {missing[:6]}; it does not "
                                  "match its config.yaml (or is not a UALM checkpoint)")
        if extra:
            raise ConversionError(f"{where}: the checkpoint has model tensors its config.yaml does not describe: "
                                  f"{extra[:6]}; convert with the config the run used")
        wrong = [f"{k}: {self.reader.shape(k)} vs {v}" for k, v in expected.items()
                 if v is not None and self.reader.shape(k) != tuple(v)]
        if wrong:
            raise ConversionError(f"{where}: shape mismatch with config.yaml: {wrong[:4]}")
        for key in (EMBEDDING, HEAD):
            problem = table_rows_problem(key, self.reader.shape(key), self.vocab, H, saved_tp, "config.yaml's")
            if problem:
                raise ConversionError(f"{where}: {problem}; config.yaml does not describe this checkpoint (the "
                                      "export would cut its rows at the wrong offsets): put the config.yaml "
                                      "of the run that saved it there")
        self.skipped = sorted(k for k in tensors if not k.startswith(MODEL_KEY_PREFIXES))
        self.encoder_keys = sorted(k for k in tensors if k.startswith(ENCODER_PREFIX))

    def layer(self, i: int, dtype) -> dict[str, Tensor]:
        suffixes = layer_suffixes(self.cfg.model.qkv_bias)
        keys = []
        for s in suffixes:
            keys += [stacked_key(s + "_w"), stacked_key(s + "_v")] if self.fc1_split and "fc1" in s else [stacked_key(s)]
        values = dict(zip(keys, self.reader.read([(k, i) for k in keys], dtype)))
        out = {}
        for s in suffixes:
            if self.fc1_split and "fc1" in s:
                out[s] = torch.cat([values.pop(stacked_key(s + "_w")), values.pop(stacked_key(s + "_v"))])
            else:
                out[s] = values.pop(stacked_key(s))
        return out

    def dtype(self, key: str, override) -> torch.dtype:
        return override or self.reader.dtype(key if not (self.fc1_split and "fc1" in key) else key + "_w")


def load_checkpoint_config(iter_dir: str) -> UALMConfig:
    path = os.path.join(iter_dir, L.CONFIG)
    if not os.path.isfile(path):
        raise ConversionError(f"{iter_dir}: no {L.CONFIG} beside the checkpoint; the model shape is unknown "
                              "(copy the run's config.yaml there)")
    return load_config(path)


def convert_megatron_to_hf(checkpoint: str, output: str, *, dtype: Optional[torch.dtype] = None,
                           max_shard_bytes: int = 5 * 1024 ** 3, overwrite: bool = False,
                           tokenizer: Optional[str] = None, codec: Optional[str] = None,
                           show_progress: Optional[bool] = None) -> Report:
    """Export ``checkpoint`` (an iter_XXXXXXX dir, a checkpoints dir or an experiment dir)
    to the HF directory ``output`` (see the module docstring). Returns the report."""
    output = check_output_dir(output, overwrite)
    iter_dir = L.resolve_complete(checkpoint)
    cfg = load_checkpoint_config(iter_dir)
    m = cfg.model
    view = _CheckpointView(iter_dir, cfg, read_manifest(iter_dir)["layout"].get("tp"))
    vocab, s, nl, H = view.vocab, _shape_of(m), m.num_layers, m.hidden_size
    rows = slice(0, vocab.audio_start)  # special + text rows: the HF ids are the unified ids
    report = Report(f"Megatron -> HF: {iter_dir} -> {output}")
    chat = hf_chat.prepare_tokenizer(tokenizer, cfg.paths.tokenizer, vocab)  # checked before writing
    if chat.missing:
        report.line("tokenizer", chat.missing)

    # backbone tensors in file order, with their dtypes
    layer_dtype = view.dtype(stacked_key("self_attention.linear_proj.weight"), dtype)
    norm_dtype = view.dtype(stacked_key("input_layernorm.weight"), dtype)
    specs = [TensorSpec("model.embed_tokens.weight", (vocab.audio_start, H), view.dtype(EMBEDDING, dtype))]
    for i in range(nl):
        for name in hf_layer_names(i, m.qkv_bias):
            specs.append(TensorSpec(name, (), norm_dtype if "norm" in name else layer_dtype))
    specs.append(TensorSpec("model.norm.weight", (H,), view.dtype(FINAL_NORM, dtype)))
    specs.append(TensorSpec("lm_head.weight", (vocab.audio_start, H), view.dtype(HEAD, dtype)))
    hf_layer_shapes = hf_shapes({**s, "text_vocab_size": vocab.audio_start}, m.qkv_bias, tied=False)
    specs = [TensorSpec(sp.name, hf_layer_shapes[sp.name], sp.dtype) for sp in specs]

    kept: dict[str, Tensor] = {}

    def backbone() -> Iterator[tuple[str, Tensor]]:
        emb = view.reader.read([(EMBEDDING, None)], dtype)[0]
        kept[AUDIO_EMBEDDING] = emb[vocab.audio_start:vocab.size].clone()
        yield "model.embed_tokens.weight", emb[rows]
        del emb
        for i in range(nl):
            hf = ualm_to_hf_layer(view.layer(i, dtype), i, s)
            for name in hf_layer_names(i, m.qkv_bias):
                yield name, hf.pop(name)
        yield "model.norm.weight", view.reader.read([(FINAL_NORM, None)], dtype)[0]
        head = view.reader.read([(HEAD, None)], dtype)[0]
        kept[AUDIO_HEAD] = head[vocab.audio_start:vocab.size].clone()
        yield "lm_head.weight", head[rows]

    extra_keys = [STREAMS] + (list(ADAPTER) + view.encoder_keys if m.encoder.kind != "none" else [])
    extra_specs = [TensorSpec(AUDIO_EMBEDDING, (vocab.size - vocab.audio_start, H), view.dtype(EMBEDDING, dtype)),
                   TensorSpec(AUDIO_HEAD, (vocab.size - vocab.audio_start, H), view.dtype(HEAD, dtype))]
    extra_specs += [TensorSpec(k, view.reader.shape(k), view.dtype(k, dtype)) for k in extra_keys]

    padded = view.reader.shape(EMBEDDING)[0]
    with atomic_output_dir(output, overwrite) as tmp:
        bar = progress(len(specs) + len(extra_specs), "megatron -> hf", show_progress)
        files = write_sharded(tmp, specs, backbone(), max_shard_bytes, on_tensor=lambda n: bar.update(1))
        writer = SafetensorsStreamWriter(os.path.join(tmp, EXTRAS_FILE), extra_specs)
        for spec in extra_specs:
            value = kept.pop(spec.name) if spec.name in kept else view.reader.read([(spec.name, None)], dtype)[0]
            writer.write(spec.name, value)
            bar.update(1)
        writer.close()
        bar.close()
        _write_hf_config(tmp, m, vocab, specs[0].dtype)
        _write_ualm_config(tmp, cfg, vocab, iter_dir, tokenizer, codec)
        text_length = hf_chat.write_chat_files(tmp, chat, vocab, m.max_position_embeddings)
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
            f.write(model_card(cfg, vocab, L.iteration_of(iter_dir), text_length is not None))

    for sp in specs:
        report.tensor("backbone (Qwen2)", _numel(sp.shape))
    for sp in extra_specs:
        report.tensor("UALM extras", _numel(sp.shape))
    report.line("layers", f"{nl} layers -> {len(hf_layer_names(0, m.qkv_bias))} HF tensors each "
                          f"(QKV split per query group, fc1 -> gate/up), dtype {layer_dtype}")
    report.line("vocabulary", f"unified [0, {vocab.audio_start}) (special + text) -> embed_tokens / lm_head "
                             f"({vocab.audio_start} rows, untied; HF ids = unified ids)")
    report.line("UALM rows", f"audio [{vocab.audio_start}, {vocab.size}) -> {EXTRAS_FILE}")
    if text_length is not None:
        report.line("tokenizer", f"{chat.path}: {text_length} text ids shifted by {vocab.text_offset}, "
                                 f"{NUM_SPECIAL_SLOTS} special tokens at [0, {NUM_SPECIAL_SLOTS}), chat template, "
                                 f"generation_config.json (eos {hf_chat.END_IDS})")
    report.line("dropped", f"{padded - vocab.size} TP padding rows per table (checkpoint has {padded})"
                + (f"; {len(view.skipped)} non-model tensors (optimizer state, ...)" if view.skipped else ""))
    report.line("output", f"{output}: {', '.join(files)}, {EXTRAS_FILE}, config.json, {UALM_CONFIG}, README.md"
                + (", tokenizer files, generation_config.json" if text_length is not None else ""))
    return report


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _write_hf_config(directory: str, m: ModelConfig, vocab: UnifiedVocab, dtype: torch.dtype) -> None:
    from transformers import Qwen2Config
    config = Qwen2Config(**{**qwen2_config_dict(m), "vocab_size": vocab.audio_start, **hf_chat.token_ids()},
                         architectures=["Qwen2ForCausalLM"])
    config.dtype = dtype
    config.to_json_file(os.path.join(directory, "config.json"))


def _write_ualm_config(directory: str, cfg: UALMConfig, vocab: UnifiedVocab, iter_dir: str,
                       tokenizer: Optional[str], codec: Optional[str]) -> None:
    m = cfg.model
    doc = {
        "format_version": FORMAT_VERSION,
        "vocab": {"num_special": NUM_SPECIAL_SLOTS, "special_tokens": list(SPECIAL_TOKENS),
                  "backbone_rows": vocab.audio_start, "text_offset": vocab.text_offset, "text_vocab_size": vocab.text_vocab_size,
                  "audio_start": vocab.audio_start, "num_codebooks": vocab.num_codebooks,
                  "codebook_size": vocab.codebook_size, "block_size": vocab.block_size, "size": vocab.size},
        "model": to_dict(m),
        "encoder_config": _encoder_config(m.encoder),
        "extras_file": EXTRAS_FILE,
        "paths": {"tokenizer": tokenizer or cfg.paths.tokenizer, "codec": codec or cfg.paths.codec},
        "source": {"checkpoint": iter_dir, "iteration": L.iteration_of(iter_dir)},
    }
    with open(os.path.join(directory, UALM_CONFIG), "w") as f:
        json.dump(doc, f, indent=2)


# --- back to a model ---------------------------------------------------------------------------------
def read_export_config(directory: str) -> tuple[dict, UALMConfig]:
    """(the parsed ualm_config.json, the UALMConfig the exported model is rebuilt from) of an
    exported directory; reads no tensor."""
    path = os.path.join(directory, UALM_CONFIG)
    if not os.path.isfile(path):
        raise ConversionError(f"{directory}: no {UALM_CONFIG}; not a UALM export (see megatron_to_hf)")
    fix = "export the checkpoint again with checkpoints_convert/megatron_to_hf.py"
    doc = read_json(path, fix, ConversionError)
    if not isinstance(doc, dict) or doc.get("format_version") != FORMAT_VERSION:
        version = doc.get("format_version") if isinstance(doc, dict) else None
        raise ConversionError(f"{path}: format_version {version} is not {FORMAT_VERSION}; {fix}")
    if not isinstance(doc.get("model"), dict) or not isinstance(doc.get("paths"), dict):
        raise ConversionError(f"{path}: no \"model\" and \"paths\" objects; {fix}")
    m = from_dict(ModelConfig, doc["model"], prefix=f"{path}: model")
    if m.encoder.kind != "none":  # build the encoder from the stored config, weights come from the extras
        m.encoder = EncoderConfig(kind=m.encoder.kind, path=None, frozen=m.encoder.frozen,
                                  window_seconds=m.encoder.window_seconds,
                                  tiny={k: v for k, v in doc["encoder_config"].items()
                                        if k not in ("architectures", "transformers_version")})
    cfg = UALMConfig(model=m, paths=PathsConfig(**{**to_dict(PathsConfig()),
                                                   **{k: v for k, v in doc["paths"].items() if v}}))
    return doc, cfg


def load_ualm_from_hf(directory: str, precision: str = "fp32"):
    """(UALMModel at TP=1/PP=1 in eval mode, UALMConfig) from an exported directory.

    Single process: initialises the runtime (world of 1, CPU unless CUDA is there) when
    torch.distributed is not initialised; refuses a runtime with TP or PP > 1.
    precision: "fp32" | "bf16" | "fp16" (parameter dtype of the model).
    """
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron_ualm.model.hf_adapter import ualm_tables_from_parts
    from megatron_ualm.model.transformer_config import transformer_config_from
    from megatron_ualm.model.ualm_model import UALMModel
    from megatron_ualm.runtime import init_runtime

    doc, cfg = read_export_config(directory)
    m = cfg.model
    if not dist.is_initialized():
        init_runtime(device=None if torch.cuda.is_available() else "cpu")
    elif parallel_state.get_tensor_model_parallel_world_size() != 1 or \
            parallel_state.get_pipeline_model_parallel_world_size() != 1:
        raise ConversionError("load_ualm_from_hf builds a TP=1/PP=1 model; the running runtime has TP or PP > 1")
    s = _shape_of(m)
    # the files (headers) are checked before the model is built
    with HFCheckpoint(directory) as ckpt, HFCheckpoint(directory, files=[doc["extras_file"]]) as ualm:
        _check_exported_rows(directory, m, ckpt, ualm)
        model = UALMModel(m, transformer_config_from(m, None, precision))
        get = ckpt.get
        hf_emb, hf_head = get("model.embed_tokens.weight"), get("lm_head.weight")
        extras = {AUDIO_EMBEDDING: ualm.get(AUDIO_EMBEDDING), AUDIO_HEAD: ualm.get(AUDIO_HEAD),
                  SPECIAL_EMBEDDING: hf_emb[:NUM_SPECIAL_SLOTS], SPECIAL_HEAD: hf_head[:NUM_SPECIAL_SLOTS]}
        emb, head = ualm_tables_from_parts(hf_emb[NUM_SPECIAL_SLOTS:], hf_head[NUM_SPECIAL_SLOTS:], extras,
                                           model.vocab, m.init_method_std)
        state = {EMBEDDING: emb, HEAD: head, FINAL_NORM: get("model.norm.weight"), STREAMS: ualm.get(STREAMS)}
        for i in range(m.num_layers):
            for suffix in layer_suffixes(m.qkv_bias):
                state[f"decoder.layers.{i}.{suffix}"] = hf_to_ualm_layer(get, i, suffix, s)
        for name in ualm.names:
            if name.startswith("audio_encoder."):
                state[name] = ualm.get(name)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ConversionError(f"{directory}: the exported tensors do not fit the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    return model.eval(), cfg


def _check_exported_rows(directory: str, m: ModelConfig, backbone: HFCheckpoint, extras: HFCheckpoint) -> None:
    """Refuse (one line) an export whose vocabulary tensors do not have the rows its
    ualm_config.json gives: the unified tables would be put together with shifted rows."""
    vocab = m.vocab()
    audio = vocab.size - vocab.audio_start
    for files, name, rows, what in (
            (backbone, "model.embed_tokens.weight", vocab.audio_start,
             f"{NUM_SPECIAL_SLOTS} special + model.text_vocab_size={m.text_vocab_size} rows"),
            (backbone, "lm_head.weight", vocab.audio_start,
             f"{NUM_SPECIAL_SLOTS} special + model.text_vocab_size={m.text_vocab_size} rows"),
            (extras, AUDIO_EMBEDDING, audio, f"model.num_codebooks={m.num_codebooks} x (1 + model.codebook_size="
                                             f"{m.codebook_size}) = {audio} audio rows"),
            (extras, AUDIO_HEAD, audio, f"{audio} audio rows")):
        if files.shape(name)[0] != rows:
            raise ConversionError(f"{directory}: {name} has {files.shape(name)[0]} rows but {UALM_CONFIG} says "
                                  f"{what}; the files do not belong together: export the checkpoint again")
