"""Per-GPU memory budget of a UALM training layout: will it fit, before any GPU hour is spent.

``memory_budget(cfg, world_size, gpu_bytes)`` returns, for every pipeline stage, the bytes one
rank of that stage holds at its peak, term by term, and the worst stage; ``search_layouts``
tries TP x PP x SP x recompute for a GPU count and keeps those that fit. This is a fit check
from the shapes, not a speed model: the order of ``search_layouts`` is a stated preference
(fewest model-parallel ranks, then no recompute), not a measured speed.

Notation (one rank): L layers of the model, Ls on a stage (L / PP, or with
``parallel.first_stage_layers`` = N: N on stage 0 and (L - N) / (PP - 1) on the others); H hidden, F ffn,
nq / ng query heads / key-value groups, d head width, Q = (nq + 2 ng) d the QKV width;
Vp the padded vocabulary (``ualm_model.padded_vocab``: special + text + K (C + 1) codebook
rows, padded to 128 * TP) of which a rank holds Vp / TP; K codec streams; T = micro-batch x
seq tokens of one micro-batch; a = 2 bytes per activation element (bf16; 4 with fp32);
s = TP when sequence parallel is on, else 1; DP = world / (TP PP).

Static terms (bytes):

* ``params``: the rank's trainable parameters P_t and frozen encoder P_f in the compute
  dtype, ``a (P_t + P_f)``. Per layer ``2H + (Q H + Q) / TP + nq d H / TP + 3 F H / TP``
  (norms replicated; QKV with bias, projection, fc1 = [gate; up], fc2 split over TP);
  stage 0 adds the embedding ``Vp H / TP``, the audio adapter ``W H + H`` (W the encoder
  width) and the encoder (counted from its HF config on the meta device); the last stage adds
  the final norm ``H``, the head ``Vp H / TP`` and the stream embeddings ``(K - 1) H``.
* ``grad_buffer``: megatron DDP's main_grad buffer, float32 for every trainable parameter
  (``providers.build_model``: ``grad_reduce_in_fp32=True``), ``4 P_t``, not sharded.
* ``optimizer``: Adam m and v in float32 plus, in bf16, the float32 master copy:
  ``12 P_t / DP`` with the distributed optimizer (8 with fp32 weights: no master copy),
  without it ``12 P_t``. The frozen encoder has neither gradient nor optimizer state.

Activations: what one decoder layer keeps for backward (measured against a real layer by
``tests/test_memory_budget.py``; with the GPU kernels of norm, SwiGLU and RoPE):

* ``recompute=none``: ``a T H (2 + 2) / s`` (input and output of each RMSNorm: the output
  is the next linear's saved input, sequence-sharded under SP) ``+ 4 T 2 / s`` (float32
  1/rms per row of each norm) ``+ a T (Q + nq d + ng d + nq d) / TP`` (the QKV output,
  whose storage the value view keeps whole; rotated q and k; the attention output, which
  is also the projection's input) ``+ 4 T nq / TP`` (float32 log-sum-exp)
  ``+ a T (2F + F) / TP`` (fc1's output, kept by the SwiGLU backward; SwiGLU's output,
  fc2's input). FlexAttention (packed batches on GPU) returns its output in the query's
  layout, so the projection's input is a view of it; a kernel that returns another layout
  (plain SDPA on unpacked batches of micro-batch > 1) adds a copy, ``a T nq d / TP``.
* ``recompute=selective``: with fused attention kernels (sdpa / flex / te) the SwiGLU MLP is
  recomputed (``transformer_config.py``): the none figure less ``a T 3F / TP`` (the MLP
  checkpoint keeps its input, the norm output already counted). ``attention_backend=unfused``
  (the float32 reference, whose score matrices are not modelled) recomputes core attention
  instead, which leaves about the fused-kernel none figure: that is what is counted.
* ``recompute=full``: the layer input only, ``a T H / s``.
* Held layers: ``Ls`` layers x the micro-batches in flight: 1 without pipelining; with the
  1F1B schedule stage ``i`` holds ``min(PP - i, M)`` (M micro-batches per step), so stage 0
  holds the most. Interleaved (virtual) pipelining is refused.
* ``embedding``: per micro-batch in flight on stage 0, what ``embedding_bag`` saves: the
  int64 ids and (CUDA) their bag index, the per-sample weights, and three int64 per-row
  vectors (offsets, bag sizes, max indices): ``T K (8 + 8 + a) + 24 T``.
* ``pipeline_output``: a non-last stage keeps each in-flight micro-batch's output, the
  tensor it sent on, until that micro-batch's backward (megatron's
  ``deallocate_pipeline_outputs`` is off): ``a T H / s`` per micro-batch in flight.
* ``final_norm``: the last stage's final RMSNorm input and 1/rms, ``(a T H + 4 T) / s``.
* ``head``: the fused cross entropy (``fused_ce.py``) keeps its input rows and, per stream,
  ``softmax - onehot`` in the compute dtype: ``a T K H`` (rows of every stream, the worst
  case where every position carries all K losses) ``+ a T (Vp / TP + sum_k w_k)`` (stream
  0 over the rank's whole shard, streams 1..K-1 over their codebook block's local rows
  w_k <= C + 1) ``+ 4 T K 2`` (the float32 dense CE and loss).

Transients (the table's ``transient`` row: the peak adds the larger of the two):

* ``head_backward``: the head weight's gradient in the compute dtype ``a Vp H / TP`` and the
  rows' gradient ``a T K H`` while all activations are still held (start of backward).
* ``layer_backward``: one layer's backward working set once the head is freed: the
  gradients of fc1's and SwiGLU's outputs ``a T 3F / TP``, plus the recomputed part of one
  layer (selective: ``a T 3F / TP``; full: the whole none figure).

``reserve``: ``RESERVE_BYTES``, an allowance for the CUDA context, NCCL's buffers and the
caching allocator's fragmentation; a round figure, not derived from the model.

``fp8_weights`` (``training.fp8``): every decoder linear weight's FP8 copy and its transpose,
one byte each, ``2 (Q H + nq d H + 3 F H) / TP`` per layer of the stage; activations stay as
above (the FP8 layers keep their bf16 input for the weight gradient, the FP8 input is freed
after the forward).

Not modelled: context parallelism, CUDA graph pools (the
trainer captures graphs only at TP = PP = 1 without recompute), the frozen encoder's forward
transients (run under no_grad, before the decoder), ``training.freeze`` (counted trainable).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass, field
from typing import Optional

from megatron_ualm.config import ConfigError, UALMConfig, validate

GiB = 1024 ** 3
#: An allowance, not derived: CUDA context (~0.5-1 GiB on H100), NCCL communicator buffers and
#: the caching allocator's fragmentation. Compare with benchmarks/memory_7b.py's reserved-vs-allocated.
RESERVE_BYTES = 3 * GiB

TENSOR_PARALLEL = (1, 2, 4, 8)
PIPELINE_PARALLEL = (1, 2, 4)
RECOMPUTE = ("none", "selective", "full")


@dataclass(frozen=True)
class Layout:
    """The parallel layout and batch shape one budget is for."""
    tp: int
    pp: int
    sp: bool
    recompute: str
    dp: int
    micro_batch: int
    seq_length: int
    microbatches: int          # micro-batches per optimizer step on one DP rank
    distributed_optimizer: bool
    first_stage_layers: Optional[int] = None  # parallel.first_stage_layers (None: equal stages)

    def label(self) -> str:
        sp = "+SP" if self.sp else ""
        pp = f"PP={self.pp}" + (f"({self.first_stage_layers} first)" if self.first_stage_layers else "")
        return f"TP={self.tp}{sp} {pp} DP={self.dp} recompute={self.recompute}"


@dataclass
class StageBudget:
    """Peak bytes of one rank of pipeline stage ``stage``: ``terms`` add up to ``total``."""
    stage: int
    terms: dict = field(default_factory=dict)
    in_flight: int = 1

    @property
    def total(self) -> int:
        return sum(self.terms.values())


@dataclass
class Budget:
    layout: Layout
    gpu_bytes: int
    stages: list
    notes: list = field(default_factory=list)

    @property
    def worst(self) -> StageBudget:
        return max(self.stages, key=lambda s: s.total)

    @property
    def margin(self) -> int:
        """gpu_bytes - the worst rank's peak (negative: does not fit)."""
        return self.gpu_bytes - self.worst.total

    @property
    def fits(self) -> bool:
        return self.margin >= 0


# --- parameters ---------------------------------------------------------------------------------
def linear_weight_elements(m, tp: int) -> int:
    """Weight elements of one decoder layer's four linear layers (QKV, projection, fc1 = [gate;
    up], fc2) on one TP rank."""
    h, d = m.hidden_size, m.head_dim
    q = (m.num_attention_heads + 2 * m.num_query_groups) * d
    return q * h // tp + m.num_attention_heads * d * h // tp + 3 * m.ffn_hidden_size * h // tp


def layer_params(m, tp: int) -> int:
    """Parameters of one decoder layer on one TP rank: the linear weights, the QKV bias and
    the two norms."""
    q = (m.num_attention_heads + 2 * m.num_query_groups) * m.head_dim
    return 2 * m.hidden_size + linear_weight_elements(m, tp) + (q // tp if m.qkv_bias else 0)


@functools.lru_cache(maxsize=16)
def _encoder_counts(kind: str, path: Optional[str], tiny_items: tuple, window_seconds: float) -> tuple[int, int, bool]:
    """(encoder parameters, output width, whether the config came from ``path``), built on the
    meta device: from the local config at ``path``, the tiny random one when path is None,
    transformers' defaults (the full-size encoder) when the path does not exist here."""
    import torch
    from megatron_ualm.model.audio_encoder import build_hf_encoder
    tiny = dict(tiny_items)
    with torch.device("meta"):
        if path is None:
            model, width = build_hf_encoder(kind, None, tiny, window_seconds)
            from_path = True
        else:
            if kind == "qwen2_5_omni":
                from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import (
                    Qwen2_5OmniAudioEncoderConfig as cfg_cls)
                from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniAudioEncoder as cls
            else:
                from transformers import WhisperConfig as cfg_cls
                from transformers.models.whisper.modeling_whisper import WhisperEncoder as cls
            from_path = os.path.isdir(path)
            config = cfg_cls.from_pretrained(path, local_files_only=True) if from_path else cfg_cls()
            model = cls._from_config(config)
            width = config.output_dim if kind == "qwen2_5_omni" else config.d_model
    return sum(p.numel() for p in model.parameters()), width, from_path


def encoder_params(m, notes: Optional[list] = None) -> tuple[int, int]:
    """(frozen, trainable) parameters of the audio encoder + adapter (first stage only)."""
    enc = m.encoder
    if enc.kind == "none":
        return 0, 0
    n, width, from_path = _encoder_counts(enc.kind, enc.path, tuple(sorted(enc.tiny.items())),
                                          float(enc.window_seconds))
    if not from_path and notes is not None:
        notes.append(f"model.encoder.path {enc.path} not found here: counted the {enc.kind} encoder "
                     f"of transformers' default config ({n / 1e6:.0f}M parameters)")
    adapter = width * m.hidden_size + m.hidden_size
    return (n, adapter) if enc.frozen else (0, n + adapter)


def stage_layers(num_layers: int, pp: int, stage: int, first: Optional[int] = None) -> int:
    """Decoder layers on pipeline ``stage``: ``first`` on stage 0 (``parallel.first_stage_layers``)
    and the rest shared evenly by the others, or ``num_layers / pp`` each."""
    if first is None or pp == 1:
        return num_layers // pp
    return first if stage == 0 else (num_layers - first) // (pp - 1)


def stage_params(m, tp: int, pp: int, stage: int, notes: Optional[list] = None,
                 first: Optional[int] = None) -> dict:
    """Parameters of one rank of pipeline ``stage`` by part: embedding, encoder_frozen,
    encoder_trainable (adapter, and the encoder when not frozen), decoder (its layers, plus the
    final norm on the last stage), head (output layer + stream embeddings)."""
    from megatron_ualm.model.ualm_model import padded_vocab
    vocab = padded_vocab(m, tp)
    h = m.hidden_size
    parts = dict(embedding=0, encoder_frozen=0, encoder_trainable=0,
                 decoder=layer_params(m, tp) * stage_layers(m.num_layers, pp, stage, first), head=0)
    if stage == 0:
        parts["embedding"] = vocab.padded_size // tp * h
        parts["encoder_frozen"], parts["encoder_trainable"] = encoder_params(m, notes)
    if stage == pp - 1:
        parts["decoder"] += h
        parts["head"] = vocab.padded_size // tp * h + (vocab.num_codebooks - 1) * h
    return parts


# --- activations --------------------------------------------------------------------------------
def layer_activation_terms(m, tp: int, sp: bool, recompute: str, tokens: int, batch: int,
                           act_bytes: int = 2) -> dict:
    """Bytes one decoder layer keeps for backward for one micro-batch of ``tokens`` rows
    (= micro-batch x seq; ``batch`` the micro-batch), by what keeps them. See the module
    docstring for the formulas."""
    a, T, h, d = act_bytes, tokens, m.hidden_size, m.head_dim
    s = tp if sp else 1
    nq, ng, f = m.num_attention_heads, m.num_query_groups, m.ffn_hidden_size
    if recompute == "full":
        return {"layer_input": a * T * h // s}
    terms = {
        "norm_inputs": 2 * a * T * h // s,
        "norm_outputs": 2 * a * T * h // s,
        "norm_rstd": 2 * 4 * T // s,
        "qkv_output": a * T * (nq + 2 * ng) * d // tp,
        "rotated_q_k": a * T * (nq + ng) * d // tp,
        "attention_output": a * T * nq * d // tp,
        "attention_lse": 4 * T * nq // tp,
        "fc1_output": a * T * 2 * f // tp,
        "swiglu_output": a * T * f // tp,
    }
    if recompute == "selective" and m.attention_backend != "unfused":
        del terms["fc1_output"], terms["swiglu_output"]
    elif recompute != "none":
        raise ConfigError(f"model.recompute: {recompute!r} not in {RECOMPUTE}")
    return terms


def layer_activation_bytes(m, tp: int, sp: bool, recompute: str, tokens: int, batch: int,
                           act_bytes: int = 2) -> int:
    return sum(layer_activation_terms(m, tp, sp, recompute, tokens, batch, act_bytes).values())


def final_norm_bytes(m, tp: int, sp: bool, tokens: int, act_bytes: int = 2) -> int:
    s = tp if sp else 1
    return (act_bytes * tokens * m.hidden_size + 4 * tokens) // s


def head_terms(m, tp: int, tokens: int, act_bytes: int = 2) -> tuple[int, int]:
    """(held, backward transient) bytes of the fused-CE head for one micro-batch."""
    from megatron_ualm.model.head import _Sharding
    from megatron_ualm.model.ualm_model import padded_vocab
    vocab = padded_vocab(m, tp)
    shard = _Sharding(vocab.padded_size, tp, 0)
    K, h, a, T = vocab.num_codebooks, m.hidden_size, act_bytes, tokens
    if m.audio_head == "all_audio":
        widths = [shard.width(vocab.audio_start, vocab.size)] * (K - 1)
    else:
        widths = [shard.width(*vocab.codebook_range(k)) for k in range(1, K)]
    rows = a * T * K * h
    held = rows + a * T * (shard.per_rank + sum(widths)) + 4 * T * K * 2
    transient = a * shard.per_rank * h + rows
    return held, transient


# --- the budget ---------------------------------------------------------------------------------
def layout_of(cfg: UALMConfig, world_size: int) -> Layout:
    p, t = cfg.parallel, cfg.training
    if p.virtual_pipeline_parallel is not None:
        raise ConfigError("parallel.virtual_pipeline_parallel: the memory budget models the 1F1B schedule "
                          "only; set it to null to check the layout")
    if p.context_parallel != 1:
        raise ConfigError("parallel.context_parallel: the memory budget needs 1 (the model has no CP)")
    validate(cfg, world_size)
    dp = world_size // (p.tensor_parallel * p.pipeline_parallel)
    return Layout(tp=p.tensor_parallel, pp=p.pipeline_parallel, sp=bool(p.sequence_parallel and p.tensor_parallel > 1),
                  recompute=cfg.model.recompute, dp=dp, micro_batch=t.micro_batch_size,
                  seq_length=cfg.data.seq_length, microbatches=t.global_batch_size // (t.micro_batch_size * dp),
                  distributed_optimizer=p.use_distributed_optimizer,
                  first_stage_layers=p.first_stage_layers if p.pipeline_parallel > 1 else None)


def memory_budget(cfg: UALMConfig, world_size: int, gpu_bytes: int) -> Budget:
    """Per-rank peak bytes of ``cfg``'s layout on ``world_size`` GPUs of ``gpu_bytes`` each."""
    lay = layout_of(cfg, world_size)
    m = cfg.model
    bf16 = cfg.training.precision == "bf16"
    a = 2 if bf16 else 4
    T = lay.micro_batch * lay.seq_length
    notes = []
    if m.attention_backend == "unfused":
        notes.append("model.attention_backend=unfused: its float32 score matrices are not modelled")
    if cfg.training.freeze:
        notes.append("training.freeze is not modelled: the frozen parameters are counted trainable")
    if not m.encoder.frozen and m.encoder.kind != "none":
        notes.append("model.encoder.frozen=false: the encoder's own activations are not modelled")
    layer = layer_activation_bytes(m, lay.tp, lay.sp, lay.recompute, T, lay.micro_batch, a)
    none_layer = layer_activation_bytes(m, lay.tp, lay.sp, "none", T, lay.micro_batch, a)
    mlp_grads = a * T * 3 * m.ffn_hidden_size // lay.tp
    recomputed = {"none": 0, "selective": none_layer - layer, "full": none_layer}[lay.recompute]
    head_held, head_transient = head_terms(m, lay.tp, T, a)
    stages = []
    for stage in range(lay.pp):
        parts = stage_params(m, lay.tp, lay.pp, stage, notes, lay.first_stage_layers)
        layers = stage_layers(m.num_layers, lay.pp, stage, lay.first_stage_layers)
        trainable = parts["embedding"] + parts["encoder_trainable"] + parts["decoder"] + parts["head"]
        opt_per_param = 12 if bf16 else 8
        in_flight = 1 if lay.pp == 1 else min(lay.pp - stage, lay.microbatches)
        last = stage == lay.pp - 1
        terms = {
            "params": a * (trainable + parts["encoder_frozen"]),
            "grad_buffer": 4 * trainable,
            "optimizer": -(-opt_per_param * trainable // lay.dp) if lay.distributed_optimizer
            else opt_per_param * trainable,
            "activations": layer * layers * in_flight,
            "embedding": (T * m.num_codebooks * (16 + a) + 24 * T) * in_flight if stage == 0 else 0,
            "pipeline_output": 0 if last else a * T * m.hidden_size // (lay.tp if lay.sp else 1) * in_flight,
            # training.fp8: each linear weight's FP8 copy and its transpose (model/fp8.py WeightCast)
            "fp8_weights": 2 * linear_weight_elements(m, lay.tp) * layers if cfg.training.fp8 else 0,
            "final_norm": final_norm_bytes(m, lay.tp, lay.sp, T, a) if last else 0,
            "head": head_held if last else 0,
            "transient": max(head_transient if last else 0, mlp_grads + recomputed),
            "reserve": RESERVE_BYTES,
        }
        stages.append(StageBudget(stage, terms, in_flight))
    return Budget(lay, gpu_bytes, stages, list(dict.fromkeys(notes)))


def with_layout(cfg: UALMConfig, tp: int, pp: int, sp: bool, recompute: str) -> UALMConfig:
    """A copy of ``cfg`` with this parallel layout (equal pipeline stages) and recomputation."""
    return dataclasses.replace(
        cfg, parallel=dataclasses.replace(cfg.parallel, tensor_parallel=tp, pipeline_parallel=pp,
                                          sequence_parallel=sp, virtual_pipeline_parallel=None,
                                          first_stage_layers=None),
        model=dataclasses.replace(cfg.model, recompute=recompute))


def search_layouts(cfg: UALMConfig, gpus: int, gpu_bytes: int, fitting_only: bool = True) -> list:
    """Budgets of TP in {1,2,4,8} x PP in {1,2,4} x SP x recompute that divide the model
    (heads, query groups, layers), the GPU count and the global batch, and fit (all of them
    with ``fitting_only=False``). Order, a preference and not a speed model: fewest
    model-parallel ranks (TP x PP) first, then less recomputation (none, selective, full),
    then the smaller PP (no pipeline bubble), then SP on (less memory, same traffic)."""
    out = []
    for tp in TENSOR_PARALLEL:
        for pp in PIPELINE_PARALLEL:
            for sp in ((False, True) if tp > 1 else (False,)):
                for recompute in RECOMPUTE:
                    candidate = with_layout(cfg, tp, pp, sp, recompute)
                    try:
                        budget = memory_budget(candidate, gpus, gpu_bytes)
                    except ConfigError:
                        continue  # does not divide the model, the GPUs or the batch
                    if budget.fits or not fitting_only:
                        out.append(budget)
    order = {r: i for i, r in enumerate(RECOMPUTE)}
    out.sort(key=lambda b: (b.layout.tp * b.layout.pp, order[b.layout.recompute], b.layout.pp, not b.layout.sp))
    return out


# --- printing -----------------------------------------------------------------------------------
def gib(n: int) -> str:
    return f"{n / GiB:7.2f}"


def format_budget(b: Budget) -> str:
    """A one-screen table: terms per stage (GiB), the worst rank, FITS / DOES NOT FIT."""
    lay = b.layout
    lines = [f"layout: {lay.label()}, micro-batch {lay.micro_batch} x seq {lay.seq_length}, "
             f"{lay.microbatches} micro-batches per step, distributed optimizer "
             f"{'on' if lay.distributed_optimizer else 'off'}"]
    head = f"{'GiB per rank':16s}" + "".join(f"{'stage ' + str(s.stage):>10s}" for s in b.stages)
    lines.append(head)
    for name in b.stages[0].terms:
        lines.append(f"{name:16s}" + "".join(f"{s.terms[name] / GiB:10.2f}" for s in b.stages))
    lines.append(f"{'total':16s}" + "".join(f"{s.total / GiB:10.2f}" for s in b.stages))
    if lay.pp > 1:
        lines.append(f"{'in flight':16s}" + "".join(f"{s.in_flight:10d}" for s in b.stages))
    w = b.worst
    verdict = "FITS" if b.fits else "DOES NOT FIT"
    lines.append(f"{verdict}: worst rank (stage {w.stage}) {w.total / GiB:.2f} GiB of {b.gpu_bytes / GiB:.2f} GiB, "
                 f"margin {b.margin / GiB:+.2f} GiB (reserve {RESERVE_BYTES / GiB:.0f} GiB included)")
    lines.extend(f"note: {n}" for n in b.notes)
    return "\n".join(lines)


def format_search(budgets: list, gpus: int, gpu_bytes: int) -> str:
    lines = [f"layouts that fit {gpus} x {gpu_bytes / GiB:.0f} GiB (order: fewest TP x PP ranks, then less "
             "recompute, smaller PP, SP on; a fit check, not a speed model)",
             f"{'layout':48s}{'worst GiB':>10s}{'margin':>9s}"]
    for b in budgets:
        lines.append(f"{b.layout.label():48s}{b.worst.total / GiB:10.2f}{b.margin / GiB:+9.2f}")
    if not budgets:
        lines.append("none: more GPUs, a smaller micro-batch or a shorter sequence")
    notes = list(dict.fromkeys(n for b in budgets for n in b.notes))
    lines.extend(f"note: {n}" for n in notes)
    return "\n".join(lines)
