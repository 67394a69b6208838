"""Providers in Megatron-core's style: the model of this rank's pipeline stage(s) wrapped for
training, its optimizer and learning-rate schedule, and the datasets.

Kept apart from the loop so that the loop reads as the training algorithm alone.
"""
from __future__ import annotations

import fnmatch
import logging

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module

from megatron_ualm.config import ConfigError
from megatron_ualm.data.indexed import TokenizedDataset
from megatron_ualm.data.blending import BlendSchedule
from megatron_ualm.data.loader import PackedRows, RowSettings
from megatron_ualm.data.pair_rows import PairedRows, PairSource, load_reference
from megatron_ualm.formats.templates import TASKS
from megatron_ualm.model import fp8
from megatron_ualm.training import fast_optimizer
from megatron_ualm.training.cuda_graphs import enable_decoder_graph
from megatron_ualm.model.transformer_config import transformer_config_from
from megatron_ualm.model.ualm_model import build_ualm_model, padded_vocab

log = logging.getLogger(__name__)


def unwrap(module):
    """The UALMModel inside DDP / Float16Module wrappers."""
    while hasattr(module, "module"):
        module = module.module
    return module


def freeze(model, patterns) -> list[str]:
    """Turn off gradients for parameters whose name matches a glob in ``patterns``
    (``training.freeze``). Frozen parameters get no gradient buffer and no optimizer state."""
    frozen = []
    for name, param in model.named_parameters():
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            param.requires_grad_(False)
            frozen.append(name)
    for p in patterns:
        if not any(fnmatch.fnmatchcase(n, p) for n, _ in model.named_parameters()):
            raise ConfigError(f"training.freeze: pattern {p!r} matches no parameter; names look like "
                             f"{next(iter(dict(model.named_parameters())))!r}")
    return frozen


def build_model(cfg, runtime):
    """Model chunks of this rank (one per virtual pipeline stage), wrapped in Float16Module
    (bf16) and Megatron DDP with fp32 gradient buffers."""
    # every trainable weight gets a DDP main_grad below, so weight gradients accumulate into it
    if cfg.training.fp8 and (runtime.is_cpu or not fp8.supported()):
        where = "CPU" if runtime.is_cpu else torch.cuda.get_device_name()
        raise ConfigError(f"training.fp8: needs a GPU with FP8 tensor cores (compute capability >= 8.9, "
                          f"e.g. H100/H200), this run has {where}; set training.fp8=false")
    tconfig = transformer_config_from(cfg.model, cfg.parallel, cfg.training.precision,
                                      use_cpu_initialization=runtime.is_cpu, wgrad_fusion=True,
                                      fp8=cfg.training.fp8_scaling if cfg.training.fp8 else None)
    # The loss is a sum over targets divided once by the global target count (SPEC section 5):
    # megatron then scales gradients by 1 / (stream-0 targets across micro-batches and DP).
    tconfig.calculate_per_token_loss = True
    vpp = cfg.parallel.virtual_pipeline_parallel
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        check_for_nan_in_grad=False,  # NaN handling is the loop's explicit policy
        bucket_size=cfg.parallel.ddp_bucket_size,
    )
    chunks = []
    for vp_stage in range(vpp or 1):
        model = build_ualm_model(cfg.model, tconfig, vp_stage=vp_stage if vpp else None)
        frozen = freeze(model, cfg.training.freeze)
        if frozen and runtime.is_rank_zero:
            log.info("frozen by training.freeze: %d tensors", len(frozen))
        model.to(runtime.device)
        if tconfig.bf16 or tconfig.fp16:
            model = Float16Module(tconfig, model)
        chunks.append(DistributedDataParallel(config=tconfig, ddp_config=ddp_config, module=model,
                                              disable_bucketing=vp_stage > 0))
    if cfg.training.cuda_graphs and not runtime.is_cpu:
        blocker = (enable_decoder_graph(unwrap(chunks[0]), chunks[0]) if len(chunks) == 1
                   else "virtual pipeline stages")
        if runtime.is_rank_zero:
            print(f"[ualm] decoder CUDA graphs: {'on' if blocker is None else f'off ({blocker})'}", flush=True)
    return chunks, tconfig


def build_optimizer(cfg, chunks, tconfig):
    o = cfg.optimizer
    opt_config = OptimizerConfig(
        optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, clip_grad=o.clip_grad,
        bf16=tconfig.bf16, fp16=tconfig.fp16, params_dtype=tconfig.params_dtype,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, chunks)
    # without apex/TE: fused torch AdamW on CUDA, foreach grad norm / clipping (fast_optimizer.py)
    fast_optimizer.speed_up(optimizer)
    # The schedules call these through the config.
    tconfig.finalize_model_grads_func = finalize_model_grads
    tconfig.grad_scale_func = optimizer.scale_loss
    no_sync = [c.no_sync for c in chunks]
    tconfig.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    if cfg.parallel.overlap_param_gather and cfg.parallel.use_distributed_optimizer:
        tconfig.param_sync_func = [c.start_param_sync for c in chunks]
        if len(chunks) == 1:
            tconfig.param_sync_func = tconfig.param_sync_func[0]
    # Linear warmup from 0, then cosine decay to min_lr at train_iters (steps are iterations).
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr,
        lr_warmup_steps=min(o.warmup_iters, max(cfg.training.train_iters - 1, 0)),
        lr_decay_steps=cfg.training.train_iters, lr_decay_style="cosine",
        start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=cfg.training.train_iters,
        wd_incr_style="constant", use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True)
    return optimizer, scheduler


def row_settings(cfg, seed_offset: int = 0) -> RowSettings:
    d = cfg.data
    return RowSettings(seq_length=d.seq_length, loss_on=cfg.model.loss_on, cfg_dropout_prob=d.cfg_dropout_prob,
                       seed=d.seed + seed_offset, overlong=d.overlong, packing=d.packing,
                       pack_window=d.pack_window)


def blend_schedule(cfg) -> BlendSchedule | None:
    """data.schedule as the loader's BlendSchedule; None for a fixed blend."""
    d = cfg.data
    if not d.schedule:
        return None
    return BlendSchedule(tuple(p.iteration for p in d.schedule), tuple(tuple(p.weights) for p in d.schedule),
                         d.schedule_interpolation, cfg.training.global_batch_size)


def open_sources(specs, vocab, references: dict | None = None):
    """The stored datasets of ``specs``; preference sets with their reference log-probs when
    ``references`` (``reference_identity``) is given."""
    out = []
    for s in specs:
        if s.task != "preference":
            out.append(TokenizedDataset(s.path, vocab=vocab, task=s.task))
            continue
        src = PairSource(s.path, vocab)
        if references is not None:
            src.reference = load_reference(src, references["checkpoint"], references["hint"])
        out.append(src)
    return out


def reference_identity(cfg) -> dict | None:
    """For training.objective=dpo: the identity of the checkpoint whose stored log-probs the run reads."""
    if cfg.training.objective != "dpo":
        return None
    from megatron_ualm.training.dpo import checkpoint_identity, reference_checkpoint, score_hint
    return {"checkpoint": checkpoint_identity(reference_checkpoint(cfg)), "hint": score_hint(cfg)}


def task_id(task: str) -> int:
    """The logged task of a dataset spec (a preference set is text-to-audio)."""
    return TASKS.index("caption_to_audio" if task == "preference" else task)


def rows_class(cfg):
    return PairedRows if cfg.training.objective == "dpo" else PackedRows


def build_datasets(cfg, num_train_rows: int, anchor=(0, 0)):
    """The blended, packed training rows and one validation set per task.

    anchor: (window, first row[, counts]) saved with the checkpoint being resumed (``PackedRows.anchor_for``),
    so planning starts there instead of at the beginning of the run."""
    vocab = padded_vocab(cfg.model, 1)
    if not cfg.data.train:
        raise ValueError("data.train is empty: list the tokenized datasets to train on "
                         "(e.g. data.train='[{path: data/tok/tta, task: caption_to_audio, weight: 1}]')")
    references = reference_identity(cfg)
    rows = rows_class(cfg)
    train = rows(open_sources(cfg.data.train, vocab, references), [s.weight for s in cfg.data.train],
                 [task_id(s.task) for s in cfg.data.train], vocab, row_settings(cfg), num_train_rows,
                 anchor=tuple(anchor), schedule=blend_schedule(cfg))
    valid = {}
    by_task = {}
    for s in cfg.data.valid:
        by_task.setdefault(s.task, []).append(s)
    for task, specs in by_task.items():
        valid[task] = valid_rows(cfg, task, open_sources(specs, vocab, references), vocab)
    return train, valid


def valid_rows(cfg, task: str, sources, vocab) -> PackedRows:
    """The validation rows of one task: every example of ``sources`` once, packed in order,
    no CFG dropout (``python -m megatron_ualm.evaluate`` reads the same rows)."""
    settings = row_settings(cfg, seed_offset=1)
    settings = RowSettings(**{**settings.__dict__, "cfg_dropout_prob": 0.0})
    return rows_class(cfg)(sources, [1.0] * len(sources), [task_id(task)] * len(sources),
                           vocab, settings, num_rows=0, blend=False)


def data_parallel_info():
    return (parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size())


def is_logging_rank() -> bool:
    """The rank that holds the reduced loss: last pipeline stage, first TP and DP rank."""
    return (parallel_state.is_pipeline_last_stage(ignore_virtual=True)
            and parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_data_parallel_rank() == 0)
