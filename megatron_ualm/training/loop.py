"""The training loop: one readable page.

    runtime -> model chunks (DDP) -> distributed optimizer + schedule -> resume
    for each iteration:
        fetch the iteration's micro-batches (DataLoader workers prefetch; the wait is logged)
        forward/backward over the micro-batches (megatron's schedule: no pipelining, 1F1B
            or interleaved, chosen by the parallel layout)
        agree on NaN across ranks -> optimizer step (clipped) -> lr schedule
        log, evaluate, checkpoint (periodic, on SIGTERM/SIGUSR1, at the end; periodic ones
            in the background with checkpoint.async_save, finished by a later step)

Rows consumed by iteration i are a pure function of i (see ``data/loader.py``), so a
restart from the checkpoint of iteration i continues exactly where the run was.
"""
from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import time
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_ualm.config import DataConfig, save_config
from megatron_ualm.data.loader import collate
from megatron_ualm.formats.templates import TASKS
from megatron_ualm.model import fp8
from megatron_ualm.model.batch import host_plan
from megatron_ualm.model.loss import loss_metrics, loss_sums
from megatron_ualm.runtime import init_runtime, shutdown_runtime
from megatron_ualm.runtime.helper_processes import loader_worker_init
from megatron_ualm.training import checkpoint as ckpt
from megatron_ualm.training.dpo import dpo_loss_func, summarise_dpo
from megatron_ualm.training.metrics import (
    MetricsLogger, batch_flops, dense_flops_per_token, format_console, model_flops_per_token, packed_lengths,
    peak_tflops,
)
from megatron_ualm.training.preflight import require_run_inputs
from megatron_ualm.training.providers import (build_datasets, build_model, build_optimizer, data_parallel_info,
                                              is_logging_rank, unwrap)
from megatron_ualm.training.signals import PreemptionHandler

log = logging.getLogger("megatron_ualm.train")

# The reduced numbers of one iteration, in this order (dense so every rank all-reduces the same).
BASE_KEYS = ("loss_sum", "targets", "text_ce_sum", "text_count", "text_correct",
             "audio_ce_sum", "audio_count", "audio_correct")
REPORT_KEYS = BASE_KEYS + tuple(f"task_loss_sum/{t}" for t in TASKS) + tuple(f"task_count/{t}" for t in TASKS)


class NonFiniteLossError(RuntimeError):
    pass


# --- one micro-batch ----------------------------------------------------------------------------
def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def report_vector(numerator, denominator, ce, correct, weights, task_ids) -> torch.Tensor:
    """Dense sums of one micro-batch: REPORT_KEYS, then per stream k (CE sum, targets)."""
    m = loss_metrics(ce, correct, weights, task_ids, num_tasks=len(TASKS))
    values = [numerator.detach(), denominator] + [m[k] for k in BASE_KEYS[2:]]
    for kind in ("loss_sum", "count"):
        for t in range(len(TASKS)):
            values.append(m.get(f"task{t}_{kind}", torch.zeros((), device=ce.device)))
    with torch.no_grad():
        targets = weights > 0
        values += list((ce.detach().float() * targets).sum(dim=(0, 1)))
        values += list(targets.sum(dim=(0, 1)).float())
    return torch.stack([v.float().reshape(()) for v in values])


def loss_func(batch, output):
    numerator, denominator = loss_sums(output.ce, batch["loss_weights"])
    vector = report_vector(numerator, denominator, output.ce, output.correct, batch["loss_weights"],
                           batch.get("task_ids"))
    return numerator, denominator.to(torch.int), {"report": vector}


def objective_loss(cfg):
    """The loss function of training.objective: the UALM loss, or DPO over pairs."""
    if cfg.training.objective == "dpo":
        return partial(dpo_loss_func, cfg.dpo.beta, cfg.dpo.sft_weight)
    return loss_func


def summarise_for(cfg, total: torch.Tensor) -> dict:
    return summarise_dpo(total) if cfg.training.objective == "dpo" else summarise(total)


def forward_step(device, data_iterator, model, loss=loss_func):
    batch = next(data_iterator)
    plan = host_plan(batch["document_ids"], batch["loss_weights"], batch["audio_num_samples"],
                     batch["audio_rows"]).to(device)  # so the forward makes no host sync
    batch = to_device(batch, device)
    output = model(batch["tokens"], batch["position_ids"], batch["document_ids"], batch["labels"],
                   loss_weights=batch["loss_weights"], audio_waveforms=batch["audio_waveforms"],
                   audio_num_samples=batch["audio_num_samples"], audio_rows=batch["audio_rows"], plan=plan)
    return output, partial(loss, batch)


def reduce_reports(reports: list) -> torch.Tensor | None:
    """Sum the micro-batch report vectors, then over data-parallel ranks (last stage only)."""
    if not reports:
        return None
    total = torch.stack([r["report"] for r in reports]).sum(0)
    dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    return total


def summarise(total: torch.Tensor) -> dict:
    values = total.tolist()
    v = dict(zip(REPORT_KEYS, values))
    streams = values[len(REPORT_KEYS):]
    k_streams = len(streams) // 2
    out = {"loss": v["loss_sum"] / max(v["targets"], 1.0), "targets": v["targets"]}
    if v["text_count"]:
        out["text_loss"] = v["text_ce_sum"] / v["text_count"]
        out["text_acc"] = v["text_correct"] / v["text_count"]
    if v["audio_count"]:
        out["audio_loss"] = v["audio_ce_sum"] / v["audio_count"]
        out["audio_acc"] = v["audio_correct"] / v["audio_count"]
    for t in TASKS:
        if v[f"task_count/{t}"]:
            out[f"loss/{t}"] = v[f"task_loss_sum/{t}"] / v[f"task_count/{t}"]
    for k in range(k_streams):  # mean CE of each stream over its targets (stream 0: text + audio)
        if streams[k_streams + k]:
            out[f"stream_loss/{k}"] = streams[k] / streams[k_streams + k]
    return out


# --- data -------------------------------------------------------------------------------------
class IterationBatches:
    """Micro-batches of each iteration for this data-parallel rank, from DataLoader workers.

    Iteration i uses global rows [i * G, (i + 1) * G) (G = global batch); micro-batch m of DP
    rank r takes rows i*G + m*(b*D) + r*b + [0, b) (b = micro-batch, D = DP size).
    """

    def __init__(self, dataset, cfg, start_iteration: int, num_workers: int, pin_memory: bool):
        dp_rank, dp_size = data_parallel_info()
        t = cfg.training
        self.num_microbatches = t.global_batch_size // (t.micro_batch_size * dp_size)
        g, b = t.global_batch_size, t.micro_batch_size

        def index_batches():
            for i in range(start_iteration, t.train_iters):
                for m in range(self.num_microbatches):
                    first = i * g + m * b * dp_size + dp_rank * b
                    yield list(range(first, first + b))

        self.loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=index_batches(), collate_fn=getattr(dataset, "collate", collate), num_workers=num_workers,
            pin_memory=pin_memory, persistent_workers=False,
            prefetch_factor=4 if num_workers > 0 else None,
            worker_init_fn=loader_worker_init() if num_workers > 0 else None)
        self._it = iter(self.loader)

    def __enter__(self) -> "IterationBatches":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers now (sentinel, then join). Left to interpreter exit, they would be
        stopped with SIGTERM, which they ignore (``helper_processes``: they must outlive a
        preemption signal sent to the whole job step), and the exit would wait on them."""
        shutdown = getattr(self._it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self._it = None

    def next_iteration(self) -> tuple[list, float]:
        start = time.perf_counter()
        batches = [next(self._it) for _ in range(self.num_microbatches)]
        return batches, time.perf_counter() - start


# --- the loop ---------------------------------------------------------------------------------
def train_step(cfg, chunks, optimizer, scheduler, batches, device, seq_length):
    for c in chunks:
        c.zero_grad_buffer()
    optimizer.zero_grad()
    iters = [iter(batches) for _ in chunks]
    reports = get_forward_backward_func()(
        forward_step_func=partial(forward_step, device, loss=objective_loss(cfg)),
        data_iterator=iters if len(chunks) > 1 else iters[0],
        model=chunks, num_microbatches=len(batches), seq_length=seq_length,
        micro_batch_size=cfg.training.micro_batch_size, forward_only=False)
    total = reduce_reports(reports)
    # Every rank must agree on skipping: only the last stage saw the loss.
    bad = torch.zeros(1, device=device)
    if total is not None and not math.isfinite(total[0].item()):
        bad.fill_(1.0)
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad.item() > 0:
        optimizer.zero_grad()
        return total, None, "nonfinite"
    ok, grad_norm, _ = optimizer.step()
    fp8.end_step(*chunks)  # training.fp8, delayed scaling: this step's amax joins the history
    if ok:
        scheduler.step(increment=1)
    return total, grad_norm, "ok" if ok else "overflow"


@contextlib.contextmanager
def params_in_sync(chunks):
    """With ``overlap_param_gather`` the distributed optimizer's updated shards reach the
    model lazily, in the forward pre-hooks of the next training step. Checkpointing and
    evaluation must see the updated weights: force the all-gather, and put the hooks back
    afterwards."""
    hooked = [c for c in chunks if getattr(c, "use_forward_hook", False)]
    for c in hooked:
        c.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        for c in hooked:
            c.enable_forward_pre_hook()


def evaluate(cfg, chunks, valid_sets: dict, device) -> dict:
    """Loss per validation task over up to ``training.eval_iters`` global batches each:
    {"loss/<task>": value}, and for DPO also {"dpo/<metric>/<task>": value}."""
    for c in chunks:
        c.eval()
    results = {}
    dp_rank, dp_size = data_parallel_info()
    b = cfg.training.micro_batch_size
    for task, ds in valid_sets.items():
        rows = list(range(dp_rank * b, len(ds), b * dp_size))[: cfg.training.eval_iters]
        collate_rows = getattr(ds, "collate", collate)
        batches = [collate_rows([ds[j] for j in range(r, min(r + b, len(ds)))]) for r in rows]
        # Every DP rank must run the same number of micro-batches.
        n = torch.tensor([len(batches)], device=device)
        dist.all_reduce(n, op=dist.ReduceOp.MIN, group=parallel_state.get_data_parallel_group())
        batches = batches[: int(n.item())]
        if not batches:
            continue
        with torch.no_grad():
            reports = get_forward_backward_func()(
                forward_step_func=partial(forward_step, device, loss=objective_loss(cfg)),
                data_iterator=[iter(batches) for _ in chunks] if len(chunks) > 1 else iter(batches),
                model=chunks, num_microbatches=len(batches), seq_length=cfg.data.seq_length,
                micro_batch_size=b, forward_only=True)
        total = reduce_reports(reports)
        if total is not None:
            s = summarise_for(cfg, total)
            results[f"loss/{task}"] = s["loss"]
            results.update({f"{k}/{task}": v for k, v in s.items() if k.startswith("dpo/")})
    for c in chunks:
        c.train()
    return results


def _data_key(cfg) -> str:
    """What the data plan depends on, to tell whether a saved plan anchor still applies."""
    d = cfg.data
    key = [[(s.path, s.task, s.weight) for s in d.train], d.seq_length, d.seed, d.packing,
           d.overlong, cfg.model.num_codebooks]
    if d.schedule or d.pack_window != DataConfig.pack_window:  # keys of fixed-blend runs saved before these settings stay valid
        key += [[(p.iteration, p.weights) for p in d.schedule], d.schedule_interpolation, d.pack_window,
                cfg.training.global_batch_size]
    return json.dumps(key)


def pretrain(cfg) -> ckpt.TrainState:
    """Run (or resume) the training described by ``cfg`` (a ``UALMConfig``)."""
    p = cfg.parallel
    runtime = init_runtime(p.tensor_parallel, p.pipeline_parallel, p.virtual_pipeline_parallel,
                           p.context_parallel, seed=cfg.training.seed,
                           device=None if p.device == "auto" else p.device)
    try:
        require_run_inputs(cfg)  # every path the config names, before anything is built
        with contextlib.ExitStack() as closing:
            return _pretrain(cfg, runtime, closing)
    finally:
        gc.unfreeze()  # training.gc_freeze: let a later run in this process collect this one
        shutdown_runtime()


def _pretrain(cfg, runtime, closing: contextlib.ExitStack) -> ckpt.TrainState:
    t = cfg.training
    exp = cfg.checkpoint.experiment_dir
    logger_rank = is_logging_rank()
    if runtime.is_rank_zero:
        os.makedirs(exp, exist_ok=True)
        save_config(cfg, os.path.join(exp, "config.yaml"))
    metrics = MetricsLogger(os.path.join(exp, "logs"), enabled=logger_rank,
                            tensorboard=cfg.logging.tensorboard, wandb_project=cfg.logging.wandb_project)

    log.info("building the model")
    chunks, tconfig = build_model(cfg, runtime)
    optimizer, scheduler = build_optimizer(cfg, chunks, tconfig)
    state = ckpt.TrainState()
    ckpt_dir = os.path.join(exp, "checkpoints")
    if cfg.checkpoint.auto_resume and ckpt.has_checkpoint(ckpt_dir):
        # the newest intact one; a corrupt newer one is skipped with a warning, and if none is
        # intact the run stops rather than start afresh over them. expand_vocab is passed on so
        # that a grown vocabulary is refused with why (optimizer state), not as a mismatch.
        state = ckpt.load_checkpoint(ckpt_dir, chunks, optimizer, scheduler,
                                     expand_vocab=cfg.checkpoint.expand_vocab)
        if runtime.is_rank_zero:
            print(f"[ualm] resumed from {os.path.join(ckpt_dir, ckpt.checkpoint_name(state.iteration))} "
                  f"at iteration {state.iteration}", flush=True)
    elif cfg.checkpoint.load:
        ckpt.load_checkpoint(cfg.checkpoint.load, chunks, optimizer, None, strict=False,
                             load_optimizer=False, load_rng=False,
                             expand_vocab=cfg.checkpoint.expand_vocab, new_rows_seed=t.seed)
        if runtime.is_rank_zero:
            print(f"[ualm] initialised weights from {cfg.checkpoint.load}", flush=True)

    # The data plan's anchor travels with the checkpoint; a checkpoint of another data setup
    # (different datasets, weights, seed or row length) must not reuse it.
    data_key = _data_key(cfg)
    saved = state.extra.get("data_anchor") if state.extra.get("data_key") == data_key else None
    train_set, valid_sets = build_datasets(cfg, t.train_iters * t.global_batch_size,
                                           anchor=tuple(saved) if saved else (0, 0))
    if runtime.is_rank_zero:
        print(f"[ualm] packing, first window of the stream: {train_set.stats.summary()}", flush=True)
        if cfg.data.schedule:
            names = [os.path.basename(s.path) for s in cfg.data.train]
            points = "; ".join(f"from iteration {p.iteration}: " + ", ".join(
                f"{n} {w:g}" for n, w in zip(names, p.weights)) for p in cfg.data.schedule)
            print(f"[ualm] blend schedule ({cfg.data.schedule_interpolation}): {points}", flush=True)
    data = closing.enter_context(IterationBatches(train_set, cfg, state.iteration, cfg.data.num_workers,
                                                  pin_memory=runtime.device.type == "cuda"))

    m = cfg.model
    shape = (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads, m.num_query_groups,
             m.head_dim, unwrap(chunks[0]).vocab.size)
    flops_per_token = model_flops_per_token(*shape, cfg.data.seq_length)  # full rows (older convention)
    dense_per_token = dense_flops_per_token(*shape)
    packed = [0, 0]  # this rank's real tokens and sum of squared document lengths since the last log
    peak = peak_tflops(torch.cuda.get_device_name() if runtime.device.type == "cuda" else None)
    tokens_per_iteration = t.global_batch_size * cfg.data.seq_length
    preemption = PreemptionHandler()
    background = ckpt.AsyncSaves() if cfg.checkpoint.async_save else None
    if background is not None:
        # A save still pending on leaving was cut short by an error, after which the ranks may
        # not meet again: its writer is killed and the next save removes its .tmp- directory.
        closing.callback(background.abort)

    def finish_background_saves(block: bool):
        if background is None or not background.pending:
            return
        for path in background.wait() if block else background.poll():
            if runtime.is_rank_zero:
                print(f"[ualm] checkpoint {path} complete (written in the background)", flush=True)

    def save(reason: str, in_background: bool = False):
        state.extra["data_key"] = data_key
        state.extra["data_anchor"] = list(train_set.anchor_for(state.consumed_rows))
        finish_background_saves(block=True)  # one save at a time
        with params_in_sync(chunks):
            ckpt.save_checkpoint(ckpt_dir, state.iteration, chunks, optimizer, scheduler,
                                 state, cfg, keep_last=cfg.checkpoint.keep_last,
                                 async_saves=background if in_background else None,
                                 hash_threads=cfg.checkpoint.hash_threads)
        if runtime.is_rank_zero:
            done = "started saving checkpoint" if in_background else "saved checkpoint"
            print(f"[ualm] {done} at iteration {state.iteration} ({reason})", flush=True)

    window_time, window_wait, window_steps = 0.0, 0.0, 0
    first_iteration = state.iteration
    while state.iteration < t.train_iters:
        step_start = time.perf_counter()
        batches, wait = data.next_iteration()
        for b in batches:
            packed = [a + n for a, n in zip(packed, packed_lengths(b["document_ids"]))]
        total, grad_norm, status = train_step(cfg, chunks, optimizer, scheduler, batches, runtime.device,
                                              cfg.data.seq_length)
        window_time += time.perf_counter() - step_start
        if status == "nonfinite":
            if cfg.training.nan_policy == "stop":
                finish_background_saves(block=True)  # every rank stops here: keep the last save
                raise NonFiniteLossError(
                    f"non-finite loss at iteration {state.iteration + 1}; training.nan_policy=stop. Resume "
                    "from the last checkpoint with a lower optimizer.lr, or set training.nan_policy=skip")
            state.skipped_iterations += 1
        state.iteration += 1
        state.consumed_rows += t.global_batch_size
        if t.gc_freeze and state.iteration == first_iteration + 1:
            gc.collect()  # once, after the first step: what lives now lives for the whole run
            gc.freeze()
        window_wait += wait
        window_steps += 1

        if state.iteration % t.log_interval == 0 or state.iteration == t.train_iters:
            counted = torch.tensor(packed, dtype=torch.float64, device=runtime.device)
            dist.all_reduce(counted, group=parallel_state.get_data_parallel_group())  # every DP rank's rows
            tokens, squares = counted.tolist()
            packed = [0, 0]
            if total is not None and logger_rank:
                s = summarise_for(cfg, total)
                tps = tokens_per_iteration * window_steps / window_time
                s.update(lr=scheduler.get_lr(optimizer.param_groups[0]),
                         grad_norm=float(grad_norm) if grad_norm is not None else None,
                         tokens_per_s=tps,
                         tflops=batch_flops(dense_per_token, m.num_layers, m.num_attention_heads, m.head_dim,
                                            tokens, squares) / window_time / runtime.world_size / 1e12,
                         tflops_full_rows=tps * flops_per_token / runtime.world_size / 1e12,
                         data_wait_s=window_wait / window_steps, skipped=state.skipped_iterations)
                if runtime.device.type == "cuda":  # MFU means nothing on a CPU
                    s["mfu"] = s["tflops"] / peak
                    s["mfu_full_rows"] = s.pop("tflops_full_rows") / peak
                else:
                    s.pop("tflops")
                    s.pop("tflops_full_rows")
                if runtime.device.type == "cuda":
                    s["mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
                metrics.log(state.iteration, s)
                print("[ualm] " + format_console(state.iteration, t.train_iters, s), flush=True)
            window_time, window_wait, window_steps = 0.0, 0.0, 0

        if valid_sets and t.eval_interval and state.iteration % t.eval_interval == 0:
            with params_in_sync(chunks):
                results = evaluate(cfg, chunks, valid_sets, runtime.device)
            if logger_rank and results:
                metrics.log(state.iteration, results, kind="valid")
                print("[ualm] valid " + " ".join(f"{k}={v:.4f}" for k, v in results.items()), flush=True)

        finish_background_saves(block=False)
        if preemption.should_stop():
            save("preemption signal")  # after the background save in flight, if any
            metrics.close()
            preemption.exit_for_requeue()
        if cfg.checkpoint.save_interval and state.iteration % cfg.checkpoint.save_interval == 0:
            save("interval", in_background=cfg.checkpoint.async_save)
    if cfg.checkpoint.save_at_end and state.iteration % cfg.checkpoint.save_interval:
        save("end of training")
    finish_background_saves(block=True)
    metrics.close()
    return state
