"""CUDA graphs for the decoder layers in training: the host issues a few graph launches per
micro-batch instead of some thousand kernels.

At the 1.5B shape the decoder's forward issues ~1,400 kernels through megatron's Python
modules, FlexAttention's compiled launcher and the Triton launchers; the host takes about
as long to issue them as the GPU takes to run them, so the GPU waits for the host in every
micro-batch. ``DecoderGraph`` captures each decoder layer (the last one with the final norm)
once, forward and backward as two CUDA graphs, and replays them afterwards; the embedding,
the audio encoder, the head and the loss stay eager (their shapes change from batch to
batch). One graph pair per layer, not one for the whole decoder, so data parallelism keeps
its overlap: a layer's gradient buckets can start their reduce as soon as that layer's
backward is replayed, and the parameter all-gather of a layer is waited for just before the
layer's forward.

How it stays the same computation:

* Capture happens at the first training forward with gradients, after a few eager warm-up
  passes on a side stream (compilation, autotuning, cuBLAS workspaces). The warm-up passes
  add weight gradients into the fp32 ``main_grad`` buffers (gradient-accumulation fusion
  writes there directly); those buffers are put back after (zeroed again when they were all
  zero, else restored from a host copy). A capture that fails stops with the error and says
  how to train eagerly.
* Inputs (hidden states, document ids, RoPE angles) are copied into static buffers before
  each replay; the FlexAttention block mask is built *inside* the first layer's forward graph
  from the static document ids, so it follows every batch. A layer's static input is the
  previous layer's static output, and its input gradient the next one's output gradient.
* A layer's backward graph computes its input gradient and adds every weight gradient into
  ``main_grad``: fused linear weights through the fusion (as eagerly), norms and biases by an
  ``add_`` captured after ``torch.autograd.grad``. For those, the modules hold views of their
  parameters while capturing (``_param_views``): a gradient asked of the parameter itself
  would pass through its ``AccumulateGrad`` node, which lives on the default stream and would
  end the capture. Nothing reaches ``param.grad``, so DDP's per-parameter hooks do not run;
  the replay does their part itself: with ``overlap_grad_reduce`` it marks the layer's
  parameters ready after the layer's backward (``register_grad_ready``), and with
  ``overlap_param_gather`` it calls DDP's forward pre-hooks of the layer's modules before the
  layer's forward (they wait for that layer's all-gather).
* With ``training.fp8`` the layers' FP8 weights live in fixed buffers that the graphs read;
  a replay recasts the stale ones (after an optimizer step) before replaying a layer's
  forward, and the gradients' FP8 scaling history is cleared after the warm-up, whose
  gradient was synthetic (``model/fp8.py``).
* A batch of another shape, an evaluation pass (no gradients) or inference runs eagerly.
* One forward and its backward at a time (what megatron's schedules do without pipeline
  parallelism): a forward replay reuses the memory of the previous one's activations, so a
  backward whose forward has been replayed over raises an error instead of computing wrong
  gradients.

Not graphed (``decoder_graph_blocker`` says why and training stays eager): tensor, pipeline or
context parallelism, activation recomputation, dropout, and CPU runs.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Optional

import torch
from torch import Tensor

from megatron_ualm.model import fp8

log = logging.getLogger(__name__)

WARMUP_PASSES = 2


def decoder_graph_blocker(config) -> Optional[str]:
    """Why the decoder of a model with this megatron ``TransformerConfig`` cannot be graphed,
    or None when it can."""
    if not torch.cuda.is_available() or config.use_cpu_initialization:
        return "no CUDA device"
    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size"):
        if getattr(config, name, 1) != 1:
            return f"{name}={getattr(config, name)} (graphs are for TP=PP=CP=1)"
    if config.recompute_granularity is not None:
        return f"activation recomputation ({config.recompute_granularity})"
    if config.hidden_dropout or config.attention_dropout:
        return "dropout (its RNG state is not graph-safe here)"
    return None


def _fused_weights(decoder) -> set:
    """Weights whose gradient megatron's linear layers add into ``main_grad`` themselves."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    fused = set()
    for m in decoder.modules():
        if isinstance(m, (ColumnParallelLinear, RowParallelLinear)) and m.gradient_accumulation_fusion:
            if m.weight is not None and m.weight.requires_grad:
                fused.add(m.weight)
    return fused


@contextlib.contextmanager
def _param_views(roots, params):
    """While open, the modules under ``roots`` that own ``params`` hold a view of each instead
    (same storage, so graphs captured meanwhile read the parameter); yields the views in the
    order of ``params``."""
    views = {id(p): p.view_as(p) for p in params}
    swapped = []
    for module in (m for root in roots for m in root.modules()):
        for name, p in list(module._parameters.items()):
            if p is not None and id(p) in views:
                del module._parameters[name]
                setattr(module, name, views[id(p)])
                swapped.append((module, name, p))
    try:
        yield [views[id(p)] for p in params]
    finally:
        for module, name, p in swapped:
            delattr(module, name)
            module._parameters[name] = p


def _describe(key) -> str:
    """A call's key (``DecoderGraph._key_of``) in words."""
    hidden, docs, _ = key
    return f"hidden {list(hidden[0])} {str(hidden[1]).replace('torch.', '')}, {'packed' if docs else 'unpacked'}"


class _Replay(torch.autograd.Function):
    """One graphed decoder call in autograd: forward replays the layers' forward graphs,
    backward their backward graphs in reverse. ``anchor`` (an empty tensor that requires grad)
    keeps the node in the autograd graph when the hidden states do not require grad (frozen
    embeddings)."""

    @staticmethod
    def forward(ctx, graph: "DecoderGraph", anchor: Tensor, hidden: Tensor, docs: Optional[Tensor],
                rotary: Tensor) -> Tensor:
        ctx.graph = graph
        out = graph._replay_forward(hidden, docs, rotary)
        ctx.replay = graph.replays
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        if ctx.replay != ctx.graph.replays:
            raise RuntimeError(
                "decoder CUDA graphs: this backward belongs to forward replay "
                f"{ctx.replay}, but replay {ctx.graph.replays} has since overwritten the activations it "
                "needs. Run each micro-batch's backward before the next forward with gradients, or set "
                "training.cuda_graphs=false for this use.")
        return None, None, ctx.graph._replay_backward(grad_out), None, None


class _Segment:
    """One decoder layer (the last one followed by the final norm): its modules, parameters,
    and once captured its two graphs with their static tensors."""

    def __init__(self, layer, final_norm, fused: set):
        self.layer, self.final_norm = layer, final_norm
        self.modules = [layer] + ([final_norm] if final_norm is not None else [])
        self.params = [p for m in self.modules for p in m.parameters() if p.requires_grad]
        self.unfused = [p for p in self.params if p not in fused]
        self.fwd = self.bwd = None
        self.out = self.grad_in = None

    def run(self, hidden, docs, rotary):
        out, _ = self.layer(hidden_states=hidden, attention_mask=docs, rotary_pos_emb=rotary)
        return self.final_norm(out) if self.final_norm is not None else out

    def views(self, hidden: Tensor, stack: contextlib.ExitStack) -> list:
        """A view of the input and of the unfused parameters (the modules hold the latter until
        ``stack`` closes), made on the current stream: autograd keeps the backward there."""
        leaf = hidden.detach().requires_grad_(True)
        params = [] if not self.unfused else stack.enter_context(_param_views(self.modules, self.unfused))
        return [leaf.view_as(leaf)] + params

    def backward_into_main_grad(self, out, grad_out, inputs) -> Tensor:
        """This layer's backward from ``out``: returns the input's gradient and adds the unfused
        parameters' gradients into their ``main_grad``."""
        grads = torch.autograd.grad(out, inputs, grad_out, allow_unused=True)
        for p, g in zip(self.unfused, grads[1:]):
            if g is not None:
                p.main_grad.add_(g)
        return grads[0]


class DecoderGraph:
    """Captured forward and backward graphs of every layer of ``decoder`` (megatron
    ``TransformerBlock``; the final norm goes with the last layer) for one input shape; see the
    module docstring.

    ``ddp``: megatron's ``DistributedDataParallel`` around the model (its buckets are told when
    a layer's gradients are ready, its all-gathers waited for), or None. ``mask_cache``: the
    model's ``MaskCache``. Call ``accepts(...)`` and then the object itself in place of
    ``decoder(...)``.
    """

    def __init__(self, decoder, mask_cache, ddp=None, warmup: int = WARMUP_PASSES):
        self.decoder = decoder
        self.mask_cache = mask_cache
        self.ddp = ddp
        self.warmup = warmup
        fused = _fused_weights(decoder)
        layers = list(decoder.layers)
        if not layers:
            raise ValueError("DecoderGraph: the decoder has no layers")
        final_norm = getattr(decoder, "final_layernorm", None)
        self.segments = [_Segment(layer, final_norm if i == len(layers) - 1 else None, fused)
                         for i, layer in enumerate(layers)]
        self.params = [p for seg in self.segments for p in seg.params]
        missing = [p for p in self.params if getattr(p, "main_grad", None) is None]
        if missing:
            raise ValueError(f"DecoderGraph needs megatron DDP's main_grad on every trainable decoder parameter; "
                             f"{len(missing)} have none (wrap the model in DistributedDataParallel first)")
        self.num_fused = sum(p in fused for p in self.params)
        self.key = None          # (shape, dtype, device, stride) of hidden, docs, rotary of the captured call
        self.captured = False
        self.captures = 0        # how many times graphs were captured (1 in a normal run)
        self.replays = 0         # forward replays of the whole decoder
        self._anchor = torch.empty(0, device=self.params[0].device, requires_grad=True)
        self._warned_shape = False

    # --- when to use it -----------------------------------------------------------------------------
    @staticmethod
    def _key_of(hidden, docs, rotary):
        def sig(t):
            return None if t is None else (tuple(t.shape), t.dtype, t.device, t.stride())
        return sig(hidden), sig(docs), sig(rotary)

    def accepts(self, hidden: Tensor, docs: Optional[Tensor], rotary: Tensor, inference_context=None) -> bool:
        """Whether this decoder call can be a replay (or the capture): training with gradients,
        no KV cache, and the captured shapes (any shape before the first capture)."""
        if inference_context is not None or not torch.is_grad_enabled() or not self.decoder.training:
            return False
        if not hidden.is_cuda:
            return False
        key = self._key_of(hidden, docs, rotary)
        if self.key is None or self.key == key:
            return True
        if not self._warned_shape:
            log.warning("decoder CUDA graphs: captured for %s, this call has %s; calls unlike the captured one "
                        "run eagerly (reset() captures anew)", _describe(self.key), _describe(key))
            self._warned_shape = True
        return False

    def reset(self) -> None:
        """Drop the captured graphs (their memory with them); the next accepted call captures
        again, for its own shape."""
        for seg in self.segments:
            seg.fwd = seg.bwd = None
            seg.out = seg.grad_in = None
        self.hidden = self.docs = self.rotary = self.grad_out = self.pool = None
        self._keep = None
        self.key, self.captured, self._warned_shape = None, False, False

    def __call__(self, hidden: Tensor, docs: Optional[Tensor], rotary: Tensor) -> Tensor:
        if not self.captured:
            self._capture(hidden, docs, rotary)
        return _Replay.apply(self, self._anchor, hidden, docs, rotary)

    # --- capture ------------------------------------------------------------------------------------
    def _wait_param_gather(self, modules):
        """DDP's forward pre-hooks of ``modules`` (overlap_param_gather: wait for their
        parameters' all-gather, start the next bucket's), which a replay does not run."""
        for top in modules:
            for m in top.modules():
                for hook in list(m._forward_pre_hooks.values()):
                    if getattr(hook, "__module__", "").startswith("megatron.core.distributed"):
                        hook(m, ())

    def segmented_pass(self, hidden: Tensor, docs: Optional[Tensor], rotary: Tensor, grad_of_out) -> Tensor:
        """Forward and backward of the decoder eagerly, layer by layer exactly as the graphs do it
        (views, ``autograd.grad`` per layer, unfused gradients added into ``main_grad``); the
        capture's warm-up. ``grad_of_out(out)`` gives the output's gradient; returns the
        input's."""
        h, pending = hidden, []
        for seg in self.segments:
            stack = contextlib.ExitStack()
            inputs = seg.views(h, stack)
            h = seg.run(inputs[0], docs, rotary)
            pending.append((seg, stack, inputs, h))
        grad = grad_of_out(h)
        for seg, stack, inputs, out in reversed(pending):
            grad = seg.backward_into_main_grad(out, grad, inputs)
            stack.close()
        return grad

    def _capture(self, hidden, docs, rotary):
        try:
            self._capture_graphs(hidden, docs, rotary)
        except Exception as e:
            self.reset()
            raise RuntimeError(f"decoder CUDA graphs: capturing the decoder failed ({type(e).__name__}: {e}). "
                               "Set training.cuda_graphs=false to train with the eager decoder.") from e

    def _save_main_grads(self) -> Optional[list]:
        """What the warm-up will disturb: None when every decoder ``main_grad`` is zero (the usual
        case, capture in a step's first micro-batch), else a host copy (no device memory spent)."""
        dirty = torch.stack([p.main_grad.ne(0).any() for p in self.params]).any().item()
        return [p.main_grad.to("cpu", copy=True) for p in self.params] if dirty else None

    def _restore_main_grads(self, saved: Optional[list]) -> None:
        with torch.no_grad():
            for i, p in enumerate(self.params):
                if saved is None:
                    p.main_grad.zero_()
                else:
                    p.main_grad.copy_(saved[i])

    def _capture_graphs(self, hidden, docs, rotary):
        from megatron.core.transformer import cuda_graphs as mcg

        self.key = self._key_of(hidden, docs, rotary)
        self.hidden = hidden.detach().clone()
        self.docs = None if docs is None else docs.clone()
        self.rotary = rotary.detach().clone()
        saved = self._save_main_grads()  # the warm-up adds into them
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.mask_cache.clear()
                self.segmented_pass(self.hidden, self.docs, self.rotary, torch.ones_like)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        fp8.reset_grad_scaling(self.decoder.layers)  # training.fp8: the warm-up's gradient was synthetic

        self.mask_cache.clear()  # the block mask must be built inside the first layer's forward graph
        pool = torch.cuda.graph_pool_handle()
        mcg._set_capture_start()  # megatron's DDP hooks stand aside while capturing
        stacks = []
        try:
            # Both kinds of capture run on torch's one capture stream. thread_local: a DataLoader's
            # pin-memory thread may touch CUDA meanwhile.
            h, pending = self.hidden, []
            for seg in self.segments:
                seg.fwd, stack = torch.cuda.CUDAGraph(), contextlib.ExitStack()
                stacks.append(stack)
                with torch.cuda.graph(seg.fwd, pool=pool, capture_error_mode="thread_local"):
                    inputs = seg.views(h, stack)
                    h = seg.run(inputs[0], self.docs, self.rotary)
                seg.out = h.detach()
                pending.append((inputs, h))
            grad = torch.empty_like(h)
            self.grad_out = grad
            for seg, (inputs, out) in zip(reversed(self.segments), reversed(pending)):
                seg.bwd = torch.cuda.CUDAGraph()
                with torch.cuda.graph(seg.bwd, pool=pool, capture_error_mode="thread_local"):
                    grad = seg.backward_into_main_grad(out, grad, inputs)
                seg.grad_in = grad.detach()
            del pending, inputs, out, h, grad
        finally:
            for stack in stacks:
                stack.close()
            mcg._set_capture_end()
        self._keep = self.mask_cache.values()  # the graphs' block mask lives as long as the graphs
        self._restore_main_grads(saved)
        self.pool = pool
        self.captured = True
        self.captures += 1
        log.info("decoder CUDA graphs captured: %d layers, hidden %s, %d parameters (%d with fused weight "
                 "gradients)", len(self.segments), tuple(hidden.shape), len(self.params), self.num_fused)

    # --- replay -------------------------------------------------------------------------------------
    def _replay_forward(self, hidden, docs, rotary) -> Tensor:
        self.hidden.copy_(hidden)
        if docs is not None:
            self.docs.copy_(docs)
        self.rotary.copy_(rotary)
        gather = self.ddp is not None and self.ddp.ddp_config.overlap_param_gather
        for seg in self.segments:
            if gather:
                self._wait_param_gather(seg.modules)
            fp8.refresh_stale(seg.modules)  # training.fp8: weights cast once per optimizer step
            seg.fwd.replay()
        self.replays += 1
        return self.segments[-1].out.detach()

    def _replay_backward(self, grad_out: Tensor) -> Tensor:
        self.grad_out.copy_(grad_out)
        ddp = self.ddp
        ready = ddp is not None and ddp.ddp_config.overlap_grad_reduce
        for seg in reversed(self.segments):
            seg.bwd.replay()
            if ready:  # what DDP's per-parameter hook does after accumulating
                for p in reversed(seg.params):
                    if p in ddp.param_to_bucket_group:
                        ddp.param_to_bucket_group[p].register_grad_ready(p, ddp.force_all_reduce)
        return self.segments[0].grad_in


def enable_decoder_graph(model, ddp, warmup: int = WARMUP_PASSES) -> Optional[str]:
    """Graph the decoder of ``model`` (the UALMModel) inside ``ddp``, megatron's
    DistributedDataParallel around it (optionally through Float16Module). Returns None when
    enabled, else the reason it was not."""
    reason = decoder_graph_blocker(model.config)
    if reason is None and not hasattr(ddp, "param_to_bucket_group"):
        reason = "the model is not wrapped in megatron's DistributedDataParallel"
    if reason is None and not any(p.requires_grad for p in model.decoder.parameters()):
        reason = "the decoder is frozen"
    if reason is not None:
        model.decoder_graph = None
        return reason
    model.decoder_graph = DecoderGraph(model.decoder, model.mask_cache, ddp, warmup)
    return None
