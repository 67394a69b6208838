"""Typed configuration of a UALM run: one dataclass per section, defaults defined only here.

A run is configured by a YAML file (examples/*.yaml; `base: other.yaml` inherits) plus dotted
`key=value` overrides on the command line, e.g.

    python -m megatron_ualm.train --config examples/qwen2.5-1.5b.yaml \\
        parallel.tensor_parallel=2 training.train_iters=1000 model.encoder.path=null

`python -m megatron_ualm.train --help` lists every setting with the trailing comment of its
field below (megatron_ualm.config_help), and `--print-config` prints the resolved YAML.
`load_config` / `parse_cli` return a validated `UALMConfig`; `save_config` writes the YAML
that is kept next to every checkpoint and loads back to an equal object. Dataclass defaults are
the published recipe (Qwen2.5-1.5B backbone, X-Codec 8 x 1024, Qwen2.5-Omni audio encoder).
"""
from __future__ import annotations

import sys
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from megatron_ualm.config_loader import (
    ConfigError, apply_overrides, dump_yaml, from_dict, parse_overrides, read_yaml, to_dict,
)
from megatron_ualm.formats.vocab import UnifiedVocab

__all__ = [
    "ConfigError", "EncoderConfig", "ModelConfig", "DatasetSpec", "DataConfig", "ParallelConfig",
    "OptimizerConfig", "TrainingConfig", "DPOConfig", "SchedulePoint", "CheckpointConfig", "PathsConfig", "LoggingConfig",
    "UALMConfig", "Task", "load_config", "parse_cli", "parse_overrides", "save_config",
    "from_dict", "to_dict", "validate", "tasks",
]

# The example kinds of SPEC section 4; each tokenized dataset holds one of them.
Task = Literal["text_only", "caption_to_audio", "audio_to_caption", "audio_to_conversation",
               "audio_only", "transcription_to_speech", "speech_to_transcription", "reasoning",
               "preference"]
# "preference": a paired caption_to_audio set for DPO (<P>.chosen, <P>.rejected, <P>.pairs.json).


@dataclass
class EncoderConfig:
    """The audio encoder for continuous (understanding) inputs."""
    kind: Literal["qwen2_5_omni", "whisper", "none"] = "qwen2_5_omni"  # "none": no audio inputs
    path: str | None = None          # local HF encoder directory (checkpoints_convert/prepare_pretrained.py)
    random_init: bool = False        # no pretrained weights: a random instance built from `tiny` (tests, demo); needs path null
    frozen: bool = True              # keep encoder weights fixed; the adapter always trains
    window_seconds: float = 30.0     # seconds of audio per encoder call; longer audio is windowed
    tiny: dict[str, Any] = field(default_factory=dict)  # HF config overrides for the random_init instance


@dataclass
class ModelConfig:
    """Decoder shapes (Qwen2 architecture) and the UALM audio heads."""
    num_layers: int = 28                   # transformer blocks
    hidden_size: int = 1536                # model width
    ffn_hidden_size: int = 8960            # SwiGLU inner width
    num_attention_heads: int = 12          # query heads
    num_query_groups: int = 2              # key/value heads (GQA)
    kv_channels: int | None = None         # per-head width; None -> hidden_size // num_attention_heads
    max_position_embeddings: int = 32768   # longest example in tokens (positions restart per example)
    rotary_base: float = 1_000_000.0       # RoPE theta
    norm_epsilon: float = 1e-6             # RMSNorm epsilon
    qkv_bias: bool = True                  # bias on the QKV projection only (Qwen2)
    text_vocab_size: int = 151936          # embedding rows of the text model, not the tokenizer length
    num_codebooks: int = 8                 # K: codec codebooks, one output stream each
    codebook_size: int = 1024              # C: codes per codebook
    audio_head: Literal["codebook", "all_audio"] = "codebook"  # softmax over own block or all audio rows
    init_method_std: float = 0.02          # std of the normal init of new weights
    attention_backend: Literal["auto", "sdpa", "flex", "te", "unfused"] = "auto"  # auto: best available
    recompute: Literal["none", "selective", "full"] = "none"  # activation recomputation
    loss_on: Literal["assistant", "all"] = "assistant"  # which messages carry the loss
    encoder: EncoderConfig = field(default_factory=EncoderConfig)

    @property
    def head_dim(self) -> int:
        """Per-head width: kv_channels, or hidden_size // num_attention_heads when unset."""
        return self.kv_channels if self.kv_channels is not None else self.hidden_size // self.num_attention_heads

    def vocab(self, pad_multiple: int = 1) -> UnifiedVocab:
        """The unified vocabulary; its padded size is a multiple of `pad_multiple` (e.g. 128 * TP)."""
        return UnifiedVocab(self.text_vocab_size, self.num_codebooks, self.codebook_size, pad_multiple)


@dataclass
class DatasetSpec:
    """One tokenized dataset of the training or validation mix."""
    path: str                        # IndexedDataset prefix (without .bin/.idx)
    task: Task                       # the example kind it holds
    weight: float = 1.0              # relative sampling weight in the blend (> 0)


@dataclass
class SchedulePoint:
    """A curriculum point: from `iteration` on, these blend weights (one per data.train entry,
    in its order; 0 leaves a dataset out)."""
    iteration: int                   # optimizer steps done before these weights apply (first point: 0)
    weights: list[float] = field(default_factory=list)


@dataclass
class DataConfig:
    train: list[DatasetSpec] = field(default_factory=list)  # the training blend; the trainer needs one
    valid: list[DatasetSpec] = field(default_factory=list)  # empty: no validation
    seq_length: int = 4096                    # tokens (rows) per packed sequence
    packing: bool = True                      # several examples per sequence, attention kept apart
    overlong: Literal["drop", "truncate"] = "drop"  # what happens to an example longer than seq_length
    cfg_dropout_prob: float = 0.05            # chance an audio-generation example loses its condition
    num_workers: int = 2                      # DataLoader worker processes per rank
    seed: int = 1234                          # blending and shuffling seed
    schedule: list[SchedulePoint] = field(default_factory=list)  # curriculum: blend weights over
    #                                           iterations, replacing data.train's weights; empty: fixed blend
    schedule_interpolation: Literal["constant", "linear"] = "constant"  # between schedule points
    pack_window: int = 1000                   # examples blended and packed together; with a schedule
    #                                           the weights change at window boundaries, so a smaller
    #                                           window follows the schedule more closely, a larger packs tighter


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1                  # TP size
    pipeline_parallel: int = 1                # PP size
    virtual_pipeline_parallel: int | None = None  # interleaved chunks per pipeline rank; None: off
    first_stage_layers: int | None = None     # decoder layers on the first pipeline stage, the rest
    #                                           split evenly over the other stages (the last one also
    #                                           runs the head); None: every stage the same
    context_parallel: int = 1                 # CP size (splits the sequence for attention)
    sequence_parallel: bool = False           # shard activations along the sequence inside TP
    use_distributed_optimizer: bool = True    # shard optimizer state across data parallel
    overlap_grad_reduce: bool = False         # overlap the gradient reduce with backward
    overlap_param_gather: bool = False        # overlap the parameter all-gather with forward
    ddp_bucket_size: int | None = None        # parameters per communication bucket; None: megatron's
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when available


@dataclass
class OptimizerConfig:
    """AdamW with linear warmup, then cosine decay from lr to min_lr at training.train_iters."""
    lr: float = 3e-4                 # peak learning rate
    min_lr: float = 3e-5             # final learning rate
    warmup_iters: int = 100          # iterations of linear warmup from 0
    weight_decay: float = 0.1        # decoupled weight decay (not on norms and biases)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0           # global gradient-norm clip; 0 disables


@dataclass
class TrainingConfig:
    train_iters: int = 100_000       # optimizer steps
    micro_batch_size: int = 1        # sequences per forward pass per data-parallel rank
    global_batch_size: int = 8       # sequences per optimizer step, all ranks together
    precision: Literal["bf16", "fp32"] = "bf16"  # compute dtype (master weights are fp32)
    seed: int = 1234                 # parameter init and dropout seed
    freeze: list[str] = field(default_factory=list)  # glob patterns of parameter names kept fixed
    eval_interval: int = 1000        # iterations between validations
    eval_iters: int = 10             # batches per validation; 0 disables
    nan_policy: Literal["skip", "stop"] = "stop"  # on a non-finite loss: skip the step or stop the run
    log_interval: int = 10           # iterations between log lines
    gc_freeze: bool = True           # after the first step, exclude the objects alive then (model,
    #                                  optimizer, compiled code) from Python's GC scans: shorter pauses
    objective: Literal["lm", "dpo"] = "lm"  # lm: the UALM loss; dpo: preference alignment on
    #                                  "preference" datasets (see the dpo section)
    cuda_graphs: bool = True         # replay the decoder layers as CUDA graphs (GPU, TP=PP=CP=1, no
    #                                  recompute or dropout; else eager, and the log says why)
    fp8: bool = False                # FP8 GEMMs (torch._scaled_mm) in the decoder's QKV, output
    #                                  projection, fc1 and fc2: e4m3 activations/weights, e5m2
    #                                  gradients, per-tensor scales; the rest stays bf16. Needs
    #                                  precision=bf16 and a GPU with FP8 tensor cores (Hopper);
    #                                  elsewhere the run stops with a one-line error
    fp8_scaling: Literal["delayed", "current"] = "delayed"  # activations and weights: delayed =
    #                                  scale from the largest amax of the last 16 steps (one pass
    #                                  per cast), current = from the tensor's own amax (an extra
    #                                  read per cast); gradients always use current


@dataclass
class DPOConfig:
    """Direct preference optimisation of text-to-audio (SPEC section 9), training.objective=dpo."""
    beta: float = 0.1                # strength of the preference margin (> 0)
    sft_weight: float = 0.0          # lambda: + lambda * the ordinary loss of the chosen example
    reference_checkpoint: str | None = None  # checkpoint the stored reference log-probs must come
    #                                  from; None: checkpoint.load (the starting checkpoint). Score it
    #                                  once with `python -m megatron_ualm.score_reference`


@dataclass
class CheckpointConfig:
    experiment_dir: str = "runs/ualm"  # checkpoints, saved config and logs go here
    save_interval: int = 1000        # iterations between checkpoints
    keep_last: int = 3               # checkpoints kept; older ones are deleted
    save_at_end: bool = True         # also save after the last iteration (off for benchmarks)
    load: str | None = None          # initial checkpoint directory (e.g. converted from HF)
    auto_resume: bool = True         # continue from the newest intact checkpoint in experiment_dir
    expand_vocab: bool = False       # `load` may have fewer text rows than model.text_vocab_size: add
    #                                  the new ones (normal(0, model.init_method_std), seeded by
    #                                  training.seed) and move each codebook block up; existing rows
    #                                  keep their ids. Off: any vocabulary difference is refused
    async_save: bool = False         # write interval checkpoints in a background process while
    #                                  training goes on; the next save, the end of training and a
    #                                  preemption exit wait for it (the end and preemption saves
    #                                  themselves are synchronous)
    hash_threads: int | None = None  # threads per rank hashing (sha256) the files it just saved;
    #                                  None: the rank's share of the node's CPUs


@dataclass
class PathsConfig:
    """Local HuggingFace-layout directories; nothing is downloaded. None: tiny random/demo ones."""
    tokenizer: str | None = None
    codec: str | None = None         # XcodecModel
    backbone: str | None = None      # Qwen2.5 causal LM, for HF -> Megatron conversion


@dataclass
class LoggingConfig:
    tensorboard: bool = True         # write events under experiment_dir/tensorboard
    wandb_project: str | None = None  # None: no Weights & Biases


@dataclass
class UALMConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)


# --- loading and saving ---------------------------------------------------------------------

def load_config(yaml_path: str | None = None, overrides: list[str] | None = None,
                world_size: int | None = None) -> UALMConfig:
    """Defaults <- YAML file (with its `base:` chain) <- dotted overrides, then `validate`."""
    data = read_yaml(yaml_path) if yaml_path else {}
    data = apply_overrides(data, parse_overrides(overrides or [], UALMConfig))
    cfg = from_dict(UALMConfig, data)
    validate(cfg, world_size)
    return cfg


def save_config(cfg: UALMConfig, path: str) -> None:
    """Write `cfg` as YAML; `load_config(path)` gives back an equal config."""
    dump_yaml(to_dict(cfg), path, header="# UALM run configuration (megatron_ualm.config.save_config)")


def parse_cli(argv: list[str] | None = None, world_size: int | None = None) -> UALMConfig:
    """`[--config PATH.yaml] key=value ...` (argv without the program name) -> UALMConfig."""
    args = list(sys.argv[1:] if argv is None else argv)
    yaml_path, overrides = None, []
    while args:
        arg = args.pop(0)
        if arg in ("--config", "-c"):
            if not args:
                raise ConfigError("--config: expected a path to a YAML file")
            yaml_path = args.pop(0)
        elif arg.startswith("--config="):
            yaml_path = arg.split("=", 1)[1]
        elif "=" in arg and not arg.startswith("-"):
            overrides.append(arg)
        else:
            raise ConfigError(f"{arg}: unexpected argument; usage: [--config PATH.yaml] key=value ...")
    return load_config(yaml_path, overrides, world_size)


# --- validation -----------------------------------------------------------------------------

def validate(cfg: UALMConfig, world_size: int | None = None) -> None:
    """Raise ConfigError (one line, naming the key) if the config cannot describe a run.
    With `world_size`, also check the data-parallel size and the batch split across it."""
    m, d, p, o, t = cfg.model, cfg.data, cfg.parallel, cfg.optimizer, cfg.training

    for section, names in (
        ("model", ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                   "num_query_groups", "kv_channels", "max_position_embeddings", "text_vocab_size",
                   "num_codebooks", "codebook_size", "rotary_base", "norm_epsilon", "init_method_std")),
        ("model.encoder", ("window_seconds",)),
        ("data", ("seq_length", "pack_window")),
        ("parallel", ("tensor_parallel", "pipeline_parallel", "virtual_pipeline_parallel",
                      "context_parallel")),
        ("optimizer", ("lr", "adam_eps")),
        ("training", ("train_iters", "micro_batch_size", "global_batch_size", "eval_interval",
                      "log_interval")),
        ("checkpoint", ("save_interval", "keep_last", "hash_threads")),
    ):
        obj = _section(cfg, section)
        for name in names:
            value = getattr(obj, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{section}.{name}: must be > 0, got {value}")
    for key, value in (("data.num_workers", d.num_workers), ("optimizer.min_lr", o.min_lr),
                       ("optimizer.warmup_iters", o.warmup_iters),
                       ("optimizer.weight_decay", o.weight_decay),
                       ("optimizer.clip_grad", o.clip_grad), ("training.eval_iters", t.eval_iters)):
        if value < 0:
            raise ConfigError(f"{key}: must be >= 0, got {value}")

    # Model shapes.
    if m.num_attention_heads % m.num_query_groups:
        raise ConfigError(f"model.num_query_groups: must divide model.num_attention_heads="
                          f"{m.num_attention_heads}, got {m.num_query_groups} "
                          f"(allowed: {_divisors(m.num_attention_heads)})")
    if m.kv_channels is None and m.hidden_size % m.num_attention_heads:
        raise ConfigError(f"model.num_attention_heads: must divide model.hidden_size={m.hidden_size} "
                          f"when model.kv_channels is null, got {m.num_attention_heads} "
                          f"(allowed: {_divisors(m.hidden_size)})")
    if m.encoder.random_init and m.encoder.path is not None:
        raise ConfigError(f"model.encoder.random_init: true builds a random encoder, but model.encoder.path="
                          f"{m.encoder.path} names pretrained weights; set one of them (random_init=false to use "
                          "the path, or path=null for a random encoder)")
    if d.seq_length > m.max_position_embeddings:
        raise ConfigError(f"data.seq_length: must be <= model.max_position_embeddings="
                          f"{m.max_position_embeddings}, got {d.seq_length}")

    # Probabilities, weights, learning rates.
    if not 0.0 <= d.cfg_dropout_prob < 1.0:
        raise ConfigError(f"data.cfg_dropout_prob: must be in [0, 1), got {d.cfg_dropout_prob}")
    for split in ("train", "valid"):
        for i, spec in enumerate(getattr(d, split)):
            if spec.weight <= 0:
                raise ConfigError(f"data.{split}[{i}].weight: must be > 0, got {spec.weight}")
    _validate_schedule(d)
    _validate_dpo(cfg)
    if o.min_lr > o.lr:
        raise ConfigError(f"optimizer.min_lr: must be <= optimizer.lr={o.lr}, got {o.min_lr}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(o, name) < 1.0:
            raise ConfigError(f"optimizer.{name}: must be in [0, 1), got {getattr(o, name)}")

    # Parallel layout.
    tp, pp, cp = p.tensor_parallel, p.pipeline_parallel, p.context_parallel
    for name, total in (("num_attention_heads", m.num_attention_heads),
                        ("num_query_groups", m.num_query_groups)):
        if total % tp:
            raise ConfigError(f"parallel.tensor_parallel: must divide model.{name}={total}, "
                              f"got {tp} (allowed: {_divisors(total)})")
    if p.virtual_pipeline_parallel is not None and pp == 1:
        raise ConfigError("parallel.virtual_pipeline_parallel: needs parallel.pipeline_parallel > 1; "
                          "allowed with pipeline_parallel=1: null")
    stages = pp * (p.virtual_pipeline_parallel or 1)
    first = p.first_stage_layers
    if first is not None:
        if pp == 1 or p.virtual_pipeline_parallel is not None:
            raise ConfigError(f"parallel.first_stage_layers: needs parallel.pipeline_parallel > 1 without "
                              f"virtual_pipeline_parallel, got pipeline_parallel={pp}, "
                              f"virtual_pipeline_parallel={p.virtual_pipeline_parallel}; set it to null")
        rest = m.num_layers - first
        if not 0 < first < m.num_layers or rest % (pp - 1):
            allowed = [n for n in range(1, m.num_layers) if (m.num_layers - n) % (pp - 1) == 0]
            raise ConfigError(f"parallel.first_stage_layers: with model.num_layers={m.num_layers} and "
                              f"pipeline_parallel={pp} the other {pp - 1} stage(s) must share the rest evenly, "
                              f"got {first} (allowed: {allowed})")
    elif m.num_layers % stages:
        raise ConfigError(f"parallel.pipeline_parallel: pipeline_parallel * virtual_pipeline_parallel "
                          f"= {stages} must divide model.num_layers={m.num_layers} "
                          f"(allowed products: {_divisors(m.num_layers)})")
    if p.sequence_parallel and tp == 1:
        raise ConfigError("parallel.sequence_parallel: needs parallel.tensor_parallel > 1; "
                          "allowed with tensor_parallel=1: false")
    if cp > 1 and d.seq_length % (2 * cp):
        raise ConfigError(f"data.seq_length: must be a multiple of 2 * parallel.context_parallel="
                          f"{2 * cp}, got {d.seq_length}")
    if p.overlap_param_gather and not (p.use_distributed_optimizer and p.overlap_grad_reduce):
        raise ConfigError("parallel.overlap_param_gather: needs parallel.use_distributed_optimizer "
                          "and parallel.overlap_grad_reduce both true; allowed otherwise: false")

    # FP8 (the GPU itself is checked when the model is built: providers.build_model).
    if t.fp8 and t.precision != "bf16":
        raise ConfigError(f"training.fp8: needs training.precision=bf16, got {t.precision}")
    if t.fp8_scaling not in ("delayed", "current"):
        raise ConfigError(f"training.fp8_scaling: must be delayed or current, got {t.fp8_scaling!r}")

    # Batch split.
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(f"training.global_batch_size: must be a multiple of training.micro_batch_size="
                          f"{t.micro_batch_size}, got {t.global_batch_size}")
    if world_size is not None:
        model_parallel = tp * pp * cp
        if world_size <= 0 or world_size % model_parallel:
            raise ConfigError(f"parallel: world size {world_size} is not a multiple of tensor_parallel * "
                              f"pipeline_parallel * context_parallel = {model_parallel}")
        dp = world_size // model_parallel
        if t.global_batch_size % (t.micro_batch_size * dp):
            raise ConfigError(f"training.global_batch_size: must be a multiple of micro_batch_size * "
                              f"data_parallel = {t.micro_batch_size} * {dp} = {t.micro_batch_size * dp}, "
                              f"got {t.global_batch_size}")


def _validate_schedule(d: DataConfig) -> None:
    previous = None
    for i, point in enumerate(d.schedule):
        key = f"data.schedule[{i}]"
        if previous is None and point.iteration != 0:
            raise ConfigError(f"{key}.iteration: the first point must be at iteration 0, got {point.iteration}")
        if previous is not None and point.iteration <= previous:
            raise ConfigError(f"{key}.iteration: must be > the previous point's {previous}, got {point.iteration}")
        previous = point.iteration
        if len(point.weights) != len(d.train):
            raise ConfigError(f"{key}.weights: needs one weight per data.train entry ({len(d.train)}), "
                              f"got {len(point.weights)}")
        if any(not (w >= 0 and w < float("inf")) for w in point.weights) or not any(w > 0 for w in point.weights):
            raise ConfigError(f"{key}.weights: must be finite and >= 0 with at least one > 0, got {point.weights}")


def _validate_dpo(cfg: UALMConfig) -> None:
    dpo = cfg.training.objective == "dpo"
    for split in ("train", "valid"):
        for i, spec in enumerate(getattr(cfg.data, split)):
            if dpo and spec.task != "preference":
                raise ConfigError(f"data.{split}[{i}].task: training.objective=dpo trains on preference "
                                  f"datasets only, got {spec.task!r}")
            if not dpo and spec.task == "preference":
                raise ConfigError(f"data.{split}[{i}].task: a preference dataset needs "
                                  "training.objective=dpo (got lm)")
    if not dpo:
        return
    if not cfg.dpo.beta > 0:
        raise ConfigError(f"dpo.beta: must be > 0, got {cfg.dpo.beta}")
    if cfg.dpo.sft_weight < 0:
        raise ConfigError(f"dpo.sft_weight: must be >= 0, got {cfg.dpo.sft_weight}")
    if cfg.data.overlong != "drop":
        raise ConfigError("data.overlong: training.objective=dpo compares whole examples; allowed: drop")
    if cfg.dpo.reference_checkpoint is None and cfg.checkpoint.load is None:
        raise ConfigError("dpo.reference_checkpoint: training.objective=dpo needs the reference (starting) "
                          "checkpoint: set checkpoint.load or dpo.reference_checkpoint")


def _section(cfg: UALMConfig, dotted: str):
    obj = cfg
    for name in dotted.split("."):
        obj = getattr(obj, name)
    return obj


def _divisors(n: int) -> str:
    return ", ".join(str(k) for k in range(1, n + 1) if n % k == 0)


def tasks() -> tuple[str, ...]:
    """The task names a DatasetSpec accepts."""
    return typing.get_args(Task)
