#!/usr/bin/env python
"""Training-step throughput of UALMModel vs transformers Qwen2ForCausalLM on one device.

    python benchmarks/train_throughput.py                      # Qwen2.5-1.5B shape, seq 4096, mb 2, bf16, GPU
    python benchmarks/train_throughput.py --tiny               # CPU smoke run (CI)
    python benchmarks/train_throughput.py --only ualm --attention-backend sdpa

Shape (default): Qwen2.5-1.5B decoder (28 layers, 1536 wide, 8960 FFN, 12 query / 2 KV
heads of 128) with the UALM vocabulary: 256 + 151,936 + 8 x 1025 = 160,392 rows (UALM pads
to a multiple of 128), untied head, K = 8 streams, C = 1024; no audio encoder (continuous
audio is a small, frozen side cost; see ENVIRONMENT.md for the encoder's throughput).

One step = forward + backward (of ``--accumulate`` micro-batches) + AdamW update.
* UALM: megatron's Float16Module (bf16 weights), DDP with fp32 gradient buffers and the
  distributed optimizer (fp32 master weights), as training runs it. Synthetic packed rows:
  examples of 256..2048 rows, ~75% text rows (stream-0 loss) and ~25% discrete audio rows
  (all K streams, weight 1/K), positions restart per example (packed attention).
  ``--optimizer torch`` instead keeps bf16 weights and uses torch's fused AdamW, like the
  HF baseline. ``--reference`` turns off the speed-ups (fused head CE, compiled fusions,
  fast optimizer paths, weight gradients accumulated in the GEMM; also one at a time with
  ``--no-*``) to measure what they give.
* HF: Qwen2ForCausalLM, sdpa attention, bf16 weights, fused torch AdamW, the same vocabulary
  size, one causal sequence per row, next-token CE.

Model FLOPs per token (the same formula for both, ENVIRONMENT.md's):
    6 * (non-embedding parameters + head parameters) + 6 * L * hidden * S   (causal attention)
TFLOP/s = FLOPs/token * tokens/s; MFU against 989 TFLOP/s (H100/H200 dense bf16).
Peak memory is torch.cuda.max_memory_allocated over the timed steps (GPU only); the two
models run one after the other in one process, use ``--only`` for separate processes.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from typing import Callable, NamedTuple

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PEAK_TFLOPS = 989.0

FULL = dict(num_layers=28, hidden_size=1536, ffn_hidden_size=8960, num_attention_heads=12, num_query_groups=2,
            kv_channels=128, text_vocab_size=151_936, num_codebooks=8, codebook_size=1024)
SHAPE_7B = dict(num_layers=28, hidden_size=3584, ffn_hidden_size=18944, num_attention_heads=28, num_query_groups=4,
                kv_channels=128, text_vocab_size=152_064, num_codebooks=8, codebook_size=1024)
TINY = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
            kv_channels=16, text_vocab_size=300, num_codebooks=4, codebook_size=16)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_flops_per_token(shape: dict, vocab_rows: int, seq_len: int) -> float:
    """The trainer's formula (training/metrics.py) for a shape dict of this script."""
    from megatron_ualm.training.metrics import model_flops_per_token as flops
    return flops(shape["num_layers"], shape["hidden_size"], shape["ffn_hidden_size"], shape["num_attention_heads"],
                 shape["num_query_groups"], shape["kv_channels"], vocab_rows, seq_len)


class MarkovSource:
    """Learnable synthetic content: every stream (text, and each codebook) is a fixed random
    Markov chain over ``states`` symbols in which each symbol has ``branches`` equally likely
    successors, so a model can learn it down to ln(branches) nats per prediction and its loss
    falls smoothly (uniform random tokens can only be memorised)."""

    def __init__(self, vocab, states: int = 512, branches: int = 4, seed: int = 1234):
        g = torch.Generator().manual_seed(seed)
        self.branches = branches
        self.text_ids = 256 + torch.randperm(vocab.text_vocab_size, generator=g)[:states]
        self.text_next = torch.randint(0, states, (states, branches), generator=g)
        self.code_states = min(states, vocab.codebook_size - 1)
        self.code_next = torch.randint(0, self.code_states, (vocab.num_codebooks, self.code_states, branches),
                                       generator=g)

    @staticmethod
    def _walk(table: torch.Tensor, n: int, generator) -> torch.Tensor:
        picks = torch.randint(0, table.shape[1], (n,), generator=generator).tolist()
        s = int(torch.randint(0, table.shape[0], (1,), generator=generator))
        out = []
        for r in picks:
            out.append(s)
            s = int(table[s, r])
        return torch.tensor(out, dtype=torch.long)

    def text(self, n: int, generator) -> torch.Tensor:
        return self.text_ids[self._walk(self.text_next, n, generator)]

    def codes(self, k: int, lo: int, n: int, generator) -> torch.Tensor:
        return lo + 1 + self._walk(self.code_next[k], n, generator)


def synthetic_ualm_batch(vocab, batch: int, seq_len: int, device, generator: torch.Generator,
                         min_doc: int, max_doc: int, audio_share: float = 0.25,
                         source: MarkovSource | None = None) -> dict:
    """Packed rows of text and discrete-audio examples following model/batch.py's contract;
    uniform random tokens, or ``source``'s Markov chains."""
    K = vocab.num_codebooks
    tokens = torch.zeros(batch, seq_len, K, dtype=torch.long)
    weights = torch.zeros(batch, seq_len, K)
    pos = torch.zeros(batch, seq_len, dtype=torch.long)
    docs = torch.zeros(batch, seq_len, dtype=torch.int32)
    for b in range(batch):
        at, d = 0, 0
        while at < seq_len:
            n = min(int(torch.randint(min_doc, max_doc + 1, (1,), generator=generator)), seq_len - at)
            n_audio = int(n * audio_share) if n >= 8 else 0
            n_text = n - n_audio
            rows = slice(at, at + n)
            tokens[b, at:at + n_text, 0] = (256 + torch.randint(0, vocab.text_vocab_size, (n_text,), generator=generator)
                                            if source is None else source.text(n_text, generator))
            weights[b, at:at + n_text, 0] = 1.0
            for k in range(K):
                lo, hi = vocab.codebook_range(k)
                tokens[b, at + n_text:at + n, k] = (torch.randint(lo + 1, hi, (n_audio,), generator=generator)
                                                    if source is None else source.codes(k, lo, n_audio, generator))
            weights[b, at + n_text:at + n] = 1.0 / K
            pos[b, rows] = torch.arange(n)
            docs[b, rows] = d
            weights[b, at + n - 1] = 0.0  # the last row of an example predicts nothing
            at, d = at + n, d + 1
    labels = torch.zeros_like(tokens)
    labels[:, :-1] = tokens[:, 1:]
    weights[:, -1] = 0.0
    # a weight on a pad label (text rows' streams 1..K-1 are pad; those weights are 0 already)
    weights = torch.where(labels == 0, torch.zeros_like(weights), weights)
    out = dict(tokens=tokens, labels=labels, loss_weights=weights, position_ids=pos, document_ids=docs)
    from megatron_ualm.model.batch import host_plan
    plan = host_plan(docs, weights)  # as the trainer's forward_step does, from the CPU tensors
    out = {k: v.to(device) for k, v in out.items()}
    out["plan"] = plan.to(device)
    return out


def peak_memory_gb(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def peak_reserved_gb(device) -> float | None:
    """Peak memory the allocator held: with CUDA graphs this is the figure that counts (a graph's
    replays use its pool's memory without allocating, so the allocated peak misses them)."""
    return torch.cuda.max_memory_reserved(device) / 1e9 if device.type == "cuda" else None


def build_ualm(args, shape, device):
    """UALMModel wrapped as training runs it; returns (model, make_phases) where
    ``make_phases(batches)`` gives the step's ``Phases`` (``step_of`` makes the step)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module
    from megatron_ualm.config import EncoderConfig, ModelConfig
    from megatron_ualm import kernels
    from megatron_ualm.kernels.profiling import scope
    from megatron_ualm.model import fp8
    from megatron_ualm.model.loss import ualm_loss
    from megatron_ualm.model.transformer_config import transformer_config_from
    from megatron_ualm.model.ualm_model import UALMModel
    from megatron_ualm.training import fast_optimizer

    reference = getattr(args, "reference", False)
    if reference or getattr(args, "no_compile", False):
        kernels.ENABLED = False
    precision = "bf16" if args.bf16 else "fp32"
    cfg = ModelConfig(**shape, max_position_embeddings=max(args.seq_length, 32768),
                      attention_backend=args.attention_backend, recompute=args.recompute,
                      encoder=EncoderConfig(kind="none"))
    wgrad = args.optimizer == "megatron" and not (reference or getattr(args, "no_wgrad_fusion", False))
    config = transformer_config_from(cfg, None, precision, use_cpu_initialization=device.type == "cpu",
                                     wgrad_fusion=wgrad, fp8=getattr(args, "fp8", None))
    model = UALMModel(cfg, config).to(device)
    if reference or getattr(args, "no_fused_ce", False):
        model.head.fused_ce = False
    if args.optimizer == "megatron":
        module = Float16Module(config, model) if args.bf16 else model
        ddp = DistributedDataParallel(config=config, ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=True), module=module)
        opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=getattr(args, "lr", 1e-5), weight_decay=0.1, bf16=args.bf16,
                                                     use_distributed_optimizer=True, clip_grad=1.0), [ddp])
        if not (reference or getattr(args, "no_fast_optimizer", False)):
            fast_optimizer.speed_up(opt, clip_in_adam=not getattr(args, "no_clip_in_adam", False))
        if not (reference or getattr(args, "no_cuda_graphs", False)):
            from megatron_ualm.training.cuda_graphs import enable_decoder_graph
            blocker = enable_decoder_graph(model, ddp)  # as the trainer does (training.cuda_graphs)
            if blocker is not None and device.type == "cuda":
                print(f"decoder CUDA graph off: {blocker}", file=sys.stderr)
        net = ddp
    else:
        net = model
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=getattr(args, "lr", 1e-5), weight_decay=0.1,
                                fused=device.type == "cuda")

    no_plan = reference or getattr(args, "no_host_plan", False)
    megatron = args.optimizer == "megatron"

    def make_phases(batches) -> Phases:
        held = {}  # the loss between forward and backward

        def zero_grad():
            with scope("ualm.zero_grad"):
                if megatron:
                    ddp.zero_grad_buffer()
                opt.zero_grad()

        def forward(j: int):
            b = batches[j % len(batches)]
            with scope("ualm.forward"):
                out = net(b["tokens"], b["position_ids"], b["document_ids"], labels=b["labels"],
                          loss_weights=b["loss_weights"], plan=None if no_plan else b["plan"])
            with scope("ualm.loss"):
                held["loss"] = ualm_loss(out.ce, b["loss_weights"])

        def backward():
            loss = held.pop("loss")
            with scope("ualm.backward"):
                loss.backward()
            return loss

        def optimizer():
            with scope("ualm.finalize_grads"):
                if megatron:
                    finalize_model_grads([ddp])
            with scope("ualm.optimizer"):
                opt.step()
            fp8.end_step(model)  # --fp8 delayed scaling: this step's amax joins the history

        return Phases(zero_grad, forward, backward, optimizer)

    make_phases.optimizer = opt  # e.g. to set a learning-rate schedule
    return model, make_phases


class Phases(NamedTuple):
    """The parts of one UALM training step (``build_ualm``); each opens the profiler range
    profile_step.py reads (no-ops otherwise). ``forward(j)`` runs micro-batch j and keeps its
    loss, ``backward()`` back-propagates it and returns it."""
    zero_grad: Callable[[], None]
    forward: Callable[[int], None]
    backward: Callable[[], torch.Tensor]
    optimizer: Callable[[], None]


def step_of(phases: Phases, accumulate: int = 1) -> Callable[[int], torch.Tensor]:
    """``step(i)``: one optimizer step over micro-batches i * accumulate ... (+ accumulate - 1)."""
    def step(i: int) -> torch.Tensor:
        phases.zero_grad()
        for j in range(accumulate):
            phases.forward(i * accumulate + j)
            loss = phases.backward()
        phases.optimizer()
        return loss
    return step


def ualm_batches(args, model, device, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [synthetic_ualm_batch(model.vocab, args.micro_batch, args.seq_length, device, g,
                                 args.min_doc, args.max_doc) for _ in range(2)]


def run_ualm(args, shape, device) -> dict:
    model, make_phases = build_ualm(args, shape, device)
    result = _time(step_of(make_phases(ualm_batches(args, model, device)), args.accumulate), args, device)
    result["params"] = sum(p.numel() for p in model.parameters())
    result["vocab_rows"] = model.vocab.padded_size
    del model, make_phases
    return result


def run_hf(args, shape, device, vocab_rows: int) -> dict:
    from transformers import Qwen2Config, Qwen2ForCausalLM
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    hf_cfg = Qwen2Config(vocab_size=vocab_rows, hidden_size=shape["hidden_size"],
                         intermediate_size=shape["ffn_hidden_size"], num_hidden_layers=shape["num_layers"],
                         num_attention_heads=shape["num_attention_heads"],
                         num_key_value_heads=shape["num_query_groups"], head_dim=shape["kv_channels"],
                         max_position_embeddings=max(args.seq_length, 32768), rope_theta=1e6,
                         tie_word_embeddings=False, attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device (1.8B parameters)
        model = Qwen2ForCausalLM(hf_cfg).to(dtype=dtype)
    model.train()
    if args.recompute != "none":
        model.gradient_checkpointing_enable()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1, fused=device.type == "cuda")
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, vocab_rows, (args.micro_batch, args.seq_length), generator=g).to(device) for _ in range(2)]

    accumulate = getattr(args, "accumulate", 1)

    def step(i):
        opt.zero_grad(set_to_none=True)
        for j in range(accumulate):
            x = ids[(i * accumulate + j) % len(ids)]
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
        opt.step()
        return loss

    result = _time(step, args, device)
    result["params"] = sum(p.numel() for p in model.parameters())
    del model, opt
    return result


def _time(step, args, device) -> dict:
    """Mean step time over ``args.steps`` steps after ``args.warmup`` (the figure reported), and
    the median of the per-step GPU-timeline intervals (CUDA events) to show the spread."""
    for i in range(args.warmup):
        step(i)
    sync(device)
    frozen = not getattr(args, "no_gc_freeze", False)
    if frozen:  # as the trainer does after its first step (training.gc_freeze), for both models
        gc.collect()
        gc.freeze()
    if device.type == "cuda":  # same start for every model: no blocks cached from compilation
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(args.steps + 1)]
        marks[0].record()
    t0 = time.perf_counter()
    for i in range(args.steps):
        loss = step(i)
        if device.type == "cuda":
            marks[i + 1].record()
    sync(device)
    seconds = (time.perf_counter() - t0) / args.steps
    if frozen:
        gc.unfreeze()
    tokens = args.micro_batch * args.seq_length * getattr(args, "accumulate", 1)
    out = {"step_s": seconds, "tokens_per_s": tokens / seconds, "loss": loss.item(), "peak_gb": peak_memory_gb(device),
           "peak_reserved_gb": peak_reserved_gb(device)}
    if device.type == "cuda":
        per_step = sorted(a.elapsed_time(b) / 1e3 for a, b in zip(marks, marks[1:]))
        out["median_step_s"] = per_step[len(per_step) // 2]
        out["min_step_s"], out["max_step_s"] = per_step[0], per_step[-1]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny shape, CPU-friendly (CI smoke run)")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda if available)")
    p.add_argument("--shape", default="1.5b", choices=["1.5b", "7b"], help="Qwen2.5-1.5B or -7B widths")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's own)")
    p.add_argument("--seq-length", type=int, default=None)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--accumulate", type=int, default=1,
                   help="micro-batches per optimizer step (gradient accumulation), for both models")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--attention-backend", default="auto", choices=["auto", "sdpa", "flex", "te", "unfused"])
    p.add_argument("--recompute", default="none", choices=["none", "selective", "full"])
    p.add_argument("--optimizer", default="megatron", choices=["megatron", "torch"])
    p.add_argument("--reference", action="store_true",
                   help="UALM as before the speed-ups: unfused head CE, no compiled fusions, megatron's "
                        "fallback optimizer paths")
    p.add_argument("--no-fused-ce", action="store_true", help="head CE through materialised logits")
    p.add_argument("--no-compile", action="store_true",
                   help="the kernels switched off, as UALM_COMPILE=0: every kernel of megatron_ualm.kernels "
                        "(RMSNorm, SwiGLU, RoPE, head CE passes, FP8 cast, weight-gradient accumulation) "
                        "takes its PyTorch reference")
    p.add_argument("--no-fast-optimizer", action="store_true", help="megatron's fallback optimizer paths")
    p.add_argument("--no-host-plan", action="store_true",
                   help="the forward derives packing and the head's target rows from the device tensors "
                        "(host syncs) instead of the batch's host-side plan")
    p.add_argument("--no-wgrad-fusion", action="store_true",
                   help="bf16 weight gradients added into main_grad by DDP's hook (no accumulation in the GEMM)")
    p.add_argument("--no-clip-in-adam", action="store_true",
                   help="megatron's clip (norm read on the host, a scaling pass) instead of the clip inside "
                        "the fused Adam kernel")
    p.add_argument("--no-gc-freeze", action="store_true",
                   help="leave Python's GC scanning every object (the trainer freezes those alive after "
                        "its first step: training.gc_freeze)")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="run the decoder eagerly instead of replaying its captured CUDA graphs "
                        "(the trainer's training.cuda_graphs)")
    p.add_argument("--fp8", default=None, choices=["delayed", "current"],
                   help="FP8 GEMMs in the decoder's linear layers with this scaling (training.fp8)")
    p.add_argument("--fp32", dest="bf16", action="store_false", help="fp32 instead of bf16")
    p.add_argument("--only", choices=["ualm", "hf"], default=None)
    p.add_argument("--min-doc", type=int, default=None, help="shortest packed example (rows)")
    p.add_argument("--max-doc", type=int, default=None, help="longest packed example (rows)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shape = dict(TINY if args.tiny else {"1.5b": FULL, "7b": SHAPE_7B}[args.shape])
    if args.layers:
        shape["num_layers"] = args.layers
    args.seq_length = args.seq_length or (64 if args.tiny else 4096)
    args.steps = args.steps or (2 if args.tiny else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    args.min_doc = args.min_doc or (8 if args.tiny else 256)
    args.max_doc = args.max_doc or (32 if args.tiny else 2048)
    if device.type == "cpu" and not args.tiny:
        print("warning: the full shape on CPU is very slow; use --tiny", file=sys.stderr)

    from megatron_ualm.runtime import init_runtime, shutdown_runtime
    init_runtime(device=device.type, seed=1234)

    from megatron_ualm.model.ualm_model import padded_vocab
    from megatron_ualm.config import ModelConfig
    vocab = padded_vocab(ModelConfig(**shape), tensor_parallel=1)
    flops = model_flops_per_token(shape, vocab.size, args.seq_length)
    print(f"shape {shape}\nvocabulary {vocab.size} rows ({vocab.padded_size} padded), seq {args.seq_length}, "
          f"micro-batch {args.micro_batch} x {args.accumulate} per step, {'bf16' if args.bf16 else 'fp32'}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print(f"model FLOPs/token = 6*(non-embedding + head params) + 6*L*hidden*S = {flops / 1e9:.2f} GFLOP")
    results = {}
    runs = [("ualm", lambda: run_ualm(args, shape, device)), ("hf", lambda: run_hf(args, shape, device, vocab.size))]
    for name, fn in runs:
        if args.only and name != args.only:
            continue
        r = fn()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        r["tflops"] = flops * r["tokens_per_s"] / 1e12
        r["mfu"] = r["tflops"] / PEAK_TFLOPS
        results[name] = r
        mem = (f"{r['peak_gb']:.1f} GB (reserved {r['peak_reserved_gb']:.1f})" if r["peak_gb"] is not None
               else "n/a (CPU)")
        label = {"ualm": f"UALMModel ({args.attention_backend} attention, {args.optimizer} optimizer)",
                 "hf": "HF Qwen2ForCausalLM (sdpa, fused AdamW)"}[name]
        print(f"{label:58s} {r['tokens_per_s']:>10,.0f} tokens/s  {r['tflops']:7.1f} TFLOP/s  "
              f"MFU {100 * r['mfu']:5.1f}%  peak {mem}  step {r['step_s'] * 1e3:.0f} ms"
              + (f" (median {r['median_step_s'] * 1e3:.0f})" if "median_step_s" in r else "") + f"  loss {r['loss']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "flops_per_token": flops, "results": results}, f, indent=2)
    shutdown_runtime()
    return 0


if __name__ == "__main__":
    sys.exit(main())
