"""FP8 matrix multiplies for the decoder's linear layers (``training.fp8``).

The four linear layers of every decoder layer (QKV, attention output projection, fc1, fc2)
multiply in FP8 through ``torch._scaled_mm`` (Hopper tensor cores); everything else stays
bf16 (embedding, head, norms, attention core, SwiGLU, encoder). Per linear layer:

* forward  ``y = x @ W^T``: x and W cast to e4m3 (3 mantissa bits, range +-448);
* backward ``dx = dy @ W``: dy cast to e5m2 (2 mantissa bits, range +-57344), W reused from
  the forward (e4m3); Hopper multiplies e5m2 x e4m3 (not e5m2 x e5m2);
* backward ``dW = dy^T @ x`` stays bf16 and accumulates into the fp32 ``main_grad`` inside the
  GEMM, as the bf16 path does (``kernels/wgrad.py``): an FP8 weight gradient would need
  transposed FP8 copies of dy and x and an fp32 product added into ``main_grad`` after
  ``_scaled_mm`` (which cannot accumulate): 16 bytes per weight per micro-batch, about what the
  faster GEMM would save at the 7B width (``benchmarks/NOTES.md``), so a third of the layer
  GEMMs keep bf16 speed.

Scaling is per tensor: ``q = saturate(x * s)`` with ``s = fp8_max / amax / 2**margin`` and
the GEMM de-scales with ``1 / s``. Two recipes (``training.fp8_scaling``):

* ``delayed`` (default): s comes from the largest amax of the last ``HISTORY`` optimizer
  steps; the cast kernel reads x once, writes the FP8 tensor once and folds this call's amax
  into the history's "current" slot with an atomic max (one Triton kernel, 3 bytes moved per
  bf16 element). ``end_step`` (the trainer calls it after each optimizer step) moves the
  current amax into the history. A tensor with no history yet (all zero: its first call, or
  after ``reset_grad_scaling``) is scaled from its own amax: a seed kernel computes it only
  then and is a no-op afterwards, so the decision is made on the GPU and a CUDA graph captured
  once stays right (``training/cuda_graphs.py``). Values above the delayed range saturate at
  fp8_max instead of overflowing. Activations, weights and gradients all follow it.
* ``current``: s from this tensor's own amax every call: a reduction pass (read) then the
  cast kernel (read + write): 5 bytes per bf16 element, no state.

The decoder's CUDA-graph warm-up back-propagates a synthetic gradient of ones; it calls
``reset_grad_scaling`` afterwards, so the gradients' history starts from the first real
backward.

Weights change once per optimizer step, so the layers cast each weight once per step, not per
micro-batch: ``WeightCast`` keeps the FP8 weight and its transpose (the input-gradient GEMM's
operand) in buffers at fixed addresses and is marked stale by ``end_step``; a stale weight is
recast before its layer's next forward (eagerly in the layer, or by the decoder graph's replay
through ``refresh_stale``). It costs one byte per decoder weight more than casting per call
(the transposed copy; the forward copy was held for backward anyway).

Tensor and sequence parallelism: the FP8 GEMM sits where megatron's local matmul was and does
the communication megatron's GEMM function does (all-gather of the sequence before it,
all-reduce or reduce-scatter of the input gradient after it); each rank scales its own
weight shard and input, so TP results equal TP=1 up to FP8 rounding.

The cast kernels, the scaling math and the GEMM call are in ``kernels/fp8_cast.py``; on CPU
(tests) the casts are the same math in plain PyTorch and ``scaled_mm`` emulates
``torch._scaled_mm`` (de-scaled fp32 matmul): the trainer refuses ``training.fp8`` without an
FP8-capable GPU, the emulation is for checking the math.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from megatron_ualm.kernels.fp8_cast import E4M3, E5M2, amax_of, cast, cast_transpose, scaled_mm, seed
from megatron_ualm.kernels.wgrad import wgrad_gemm_accum_fp32

HISTORY = 16          # optimizer steps of amax kept for delayed scaling
RECIPES = ("delayed", "current")
INPUT, WEIGHT, GRAD = 0, 1, 2  # rows of a layer's amax state
FORMATS = (E4M3, E4M3, E5M2)   # per row: the FP8 format of that tensor


def new_state(device, history: int = HISTORY) -> Tensor:
    """A layer's amax state: float32 [3 (input, weight, grad), history + 1]; columns
    0..history-1 are past steps, the last column collects the current step's amax."""
    return torch.zeros(3, history + 1, dtype=torch.float32, device=device)


def roll_history(state: Tensor, step: int) -> None:
    """After optimizer step ``step`` (0-based): the current column replaces the oldest past
    one (slot ``step % history``) and is cleared. Only the max of the past columns is used,
    so their order does not matter."""
    history = state.shape[-1] - 1
    state[:, step % history].copy_(state[:, history])
    state[:, history].zero_()


def _scale_source(x: Tensor, state: Tensor, row: int, recipe: str) -> Tensor:
    """The amax values x is scaled from under ``recipe``: ``current``, x's own amax;
    ``delayed``, the row's history, seeded from x's own amax while it is empty."""
    if recipe == "current":
        return amax_of(x).reshape(1)
    past = state[row, :-1]
    seed(x, past)
    return past


def cast_scaled(x: Tensor, state: Tensor, row: int, recipe: str, out: Optional[Tensor] = None,
                inv: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Cast x for state row ``row`` under ``recipe`` (``_scale_source``); x's amax joins the
    row's current slot."""
    return cast(x, _scale_source(x, state, row, recipe), state[row, -1:], FORMATS[row], out=out, inv=inv)


class WeightCast:
    """A weight's FP8 copies for the current optimizer step: ``w8`` [out, in] (the forward's
    operand), ``w8t`` [in, out] contiguous (the input gradient's) and the de-scale ``inv``, in
    buffers allocated once (their addresses stay fixed, so CUDA graphs may read them). ``get``
    recasts when ``stale`` (``end_step`` sets it after each optimizer step)."""

    def __init__(self):
        self.w8 = self.w8t = self.inv = None
        self.stale = True

    def refresh(self, weight: Tensor, state: Tensor, recipe: str) -> None:
        w = weight.detach()
        if self.w8 is None or self.w8.shape != w.shape or self.w8.device != w.device:
            self.w8 = torch.empty(w.shape, dtype=FORMATS[WEIGHT], device=w.device)
            self.w8t = torch.empty(w.shape[::-1], dtype=FORMATS[WEIGHT], device=w.device)
            self.inv = torch.empty(1, dtype=torch.float32, device=w.device)
        cast_transpose(w, _scale_source(w, state, WEIGHT, recipe), state[WEIGHT, -1:], FORMATS[WEIGHT],
                       self.w8, self.w8t, self.inv)
        self.stale = False

    def get(self, weight: Tensor, state: Tensor, recipe: str) -> tuple[Tensor, Tensor, Tensor]:
        if self.stale:
            self.refresh(weight, state, recipe)
        return self.w8, self.w8t, self.inv


def _gather_sequence(x: Tensor, group) -> Tensor:
    """All ranks' x concatenated along dim 0 (sequence parallelism's all-gather)."""
    out = torch.empty((x.shape[0] * group.size(), *x.shape[1:]), dtype=x.dtype, device=x.device)
    torch.distributed.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out


def _scatter_sequence(x: Tensor, group) -> Tensor:
    """This rank's part (dim 0) of the sum of all ranks' x (sequence parallelism's reduce-scatter)."""
    out = torch.empty((x.shape[0] // group.size(), *x.shape[1:]), dtype=x.dtype, device=x.device)
    torch.distributed.reduce_scatter_tensor(out, x.contiguous(), group=group)
    return out


class FP8Linear(torch.autograd.Function):
    """``y = x @ W^T (+ b)`` with FP8 forward and input-gradient GEMMs (module docstring).
    x [..., in] (bf16), W [out, in]; ``main_grad``: W's fp32 buffer to accumulate dW into,
    or None (dW returned). ``tp``: None, or (group, allreduce_dgrad, sequence_parallel) of
    megatron's linear layer: the same communication as megatron's
    ``LinearWithGradAccumulationAndAsyncCommunication`` (all-gather of x along the sequence
    before the GEMM; all-reduce or reduce-scatter of dx after it), synchronous."""

    @staticmethod
    def forward(ctx, x, weight, bias, main_grad, state, recipe, tp=None, weight_cast=None):
        group, allreduce_dgrad, sequence_parallel = tp or (None, False, False)
        ctx.tp = group, allreduce_dgrad, sequence_parallel
        if sequence_parallel:
            x = _gather_sequence(x, group)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        x8, x_inv = cast_scaled(x2, state, INPUT, recipe)
        w8, w8t, w_inv = (weight_cast or WeightCast()).get(weight, state, recipe)
        # y = x @ W^T: W [out, in] row-major is W^T [in, out] column-major, as _scaled_mm wants
        y = scaled_mm(x8, w8.t(), x_inv, w_inv, x.dtype, fast_accum=True)
        if bias is not None:
            y = y + bias
        ctx.save_for_backward(x2, weight, w8t, w_inv)
        ctx.main_grad, ctx.state, ctx.recipe = main_grad, state, recipe
        ctx.use_bias, ctx.shape = bias is not None, shape
        return y.reshape(*shape[:-1], y.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x2, weight, w8t, w_inv = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1]).contiguous()
        g8, g_inv = cast_scaled(dy2, ctx.state, GRAD, ctx.recipe)
        # dx = dy @ W: W [out, in] as the column-major right operand is W^T stored row-major
        dx = scaled_mm(g8, w8t.t(), g_inv, w_inv, dy.dtype)
        grad_bias = dy2.sum(0) if ctx.use_bias else None
        main_grad = ctx.main_grad
        if main_grad is None:
            grad_weight = (dy2.t() @ x2.to(dy2.dtype)).to(weight.dtype)
        else:  # megatron's gradient_accumulation_fusion contract
            weight.main_grad = main_grad
            wgrad_gemm_accum_fp32(x2, dy2, main_grad)
            grad_weight = None
            if hasattr(weight, "grad_added_to_main_grad"):
                make = torch.zeros if getattr(weight, "zero_out_wgrad", False) else torch.empty
                grad_weight = make(main_grad.shape, dtype=x2.dtype, device=x2.device)
                weight.grad_added_to_main_grad = True
        dx = dx.reshape(ctx.shape)
        group, allreduce_dgrad, sequence_parallel = ctx.tp
        if allreduce_dgrad:
            torch.distributed.all_reduce(dx, group=group)
        elif sequence_parallel:
            dx = _scatter_sequence(dx, group)
        return dx, grad_weight, grad_bias, None, None, None, None, None


def fp8_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], state: Tensor,
               recipe: str = "delayed", main_grad: Optional[Tensor] = None, tp=None,
               weight_cast: Optional[WeightCast] = None) -> Tensor:
    """The FP8 linear layer as a function (see ``FP8Linear``). ``weight_cast``: the weight's
    ``WeightCast`` (cast once per optimizer step), or None to cast it in this call."""
    if recipe not in RECIPES:
        raise ValueError(f"fp8 recipe {recipe!r} not in {RECIPES}")
    return FP8Linear.apply(x, weight, bias, main_grad, state, recipe, tp, weight_cast)


def supported(device=None) -> bool:
    """Whether this process has a GPU with FP8 tensor cores (compute capability >= 8.9)."""
    if not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


# --- megatron's linear layers with the FP8 GEMM ---------------------------------------------------
class _FP8Mixin:
    """Replaces the local matmul inside megatron's ``_forward_impl``; everything around it
    (weights, the TP communication of the layer's forward, bias handling) is megatron's, and
    the communication megatron does inside its GEMM function (sequence-parallel all-gather,
    input-gradient all-reduce / reduce-scatter) is done the same way by ``FP8Linear``. Falls
    back to megatron's GEMM for what the FP8 path does not cover: frozen weights, deferred
    weight gradients, inputs other than bf16/fp32, dimensions that are not multiples of 16
    (``_scaled_mm``'s requirement)."""

    fp8_recipe = "delayed"

    def _fp8_ready(self, input, weight, kwargs) -> bool:
        return (weight.requires_grad and input.dtype in (torch.bfloat16, torch.float32)
                and kwargs.get("grad_output_buffer") is None and (kwargs.get("gtp_remat_size") or 1) == 1
                and weight.shape[0] % 16 == 0 and weight.shape[1] % 16 == 0
                and (input.numel() // max(input.shape[-1], 1)) % 16 == 0)

    def _forward_impl(self, input, weight, *args, **kwargs):
        if args or not self._fp8_ready(input, weight, kwargs):
            return super()._forward_impl(input, weight, *args, **kwargs)
        state = getattr(self, "fp8_state", None)
        if state is None or state.device != input.device:
            # a plain attribute, not a buffer: Float16Module would cast a buffer to bf16, and
            # checkpoints do not carry it (a resumed run re-seeds from its first call)
            self.fp8_state, self.fp8_steps, self.fp8_weight = new_state(input.device), 0, WeightCast()
            state = self.fp8_state
        main_grad = weight.main_grad if kwargs.get("gradient_accumulation_fusion") and hasattr(weight, "main_grad") else None
        tp = None
        if kwargs.get("allreduce_dgrad") or kwargs.get("sequence_parallel"):
            from megatron.core import parallel_state
            group = kwargs.get("tp_group") or parallel_state.get_tensor_model_parallel_group()
            tp = (group, bool(kwargs.get("allreduce_dgrad")), bool(kwargs.get("sequence_parallel")))
        return fp8_linear(input, weight, kwargs.get("bias"), state, self.fp8_recipe, main_grad, tp, self.fp8_weight)

    def fp8_end_step(self) -> None:
        """After an optimizer step: the step's amax values join the history (delayed scaling),
        and the FP8 weight is recast before its next use."""
        if getattr(self, "fp8_state", None) is not None:
            roll_history(self.fp8_state, self.fp8_steps)
            self.fp8_steps += 1
            self.fp8_weight.stale = True

    def fp8_refresh(self) -> None:
        """Recast a stale FP8 weight now (what the layer's forward would do first)."""
        if getattr(self, "fp8_state", None) is not None and self.fp8_weight.stale and self.weight is not None:
            self.fp8_weight.refresh(self.weight, self.fp8_state, self.fp8_recipe)


class FP8ColumnParallelLinear(_FP8Mixin, ColumnParallelLinear):
    """megatron's ColumnParallelLinear with the FP8 GEMM (``_FP8Mixin``)."""


class FP8RowParallelLinear(_FP8Mixin, RowParallelLinear):
    """megatron's RowParallelLinear with the FP8 GEMM (``_FP8Mixin``)."""


@functools.lru_cache(maxsize=None)
def linear_classes(recipe: Optional[str]):
    """(column, row) linear classes for the decoder layer spec: megatron's for ``None``,
    FP8 subclasses with ``recipe`` ("delayed" | "current") otherwise."""
    if recipe is None:
        return ColumnParallelLinear, RowParallelLinear
    if recipe not in RECIPES:
        raise ValueError(f"fp8 recipe {recipe!r} not in {RECIPES}")
    column = type(f"FP8ColumnParallelLinear_{recipe}", (FP8ColumnParallelLinear,), {"fp8_recipe": recipe})
    row = type(f"FP8RowParallelLinear_{recipe}", (FP8RowParallelLinear,), {"fp8_recipe": recipe})
    return column, row


def fp8_layers(module) -> list:
    """The FP8 linear layers under ``module`` (looked up once per module)."""
    layers = getattr(module, "_ualm_fp8_layers", None)
    if layers is None:
        layers = [m for m in module.modules() if isinstance(m, _FP8Mixin)]
        try:
            module._ualm_fp8_layers = layers
        except AttributeError:
            pass
    return layers


def end_step(*models) -> int:
    """Call after each optimizer step: every FP8 layer of ``models`` moves this step's amax
    into its history and marks its FP8 weight stale. Returns the number of FP8 layers (0:
    nothing to do)."""
    n = 0
    for model in models:
        for layer in fp8_layers(model):
            layer.fp8_end_step()
            n += 1
    return n


def refresh_stale(modules) -> None:
    """Recast the stale FP8 weights of the FP8 layers under ``modules``: a CUDA-graph replay
    calls it before replaying those modules' forward (the graph reads the weight buffers)."""
    for module in modules:
        for layer in fp8_layers(module):
            layer.fp8_refresh()


def reset_grad_scaling(modules) -> None:
    """Forget the gradients' amax (history and current step) of the FP8 layers under
    ``modules``; their next backward seeds it from its own gradient. The decoder graph's
    warm-up calls it after back-propagating its synthetic gradient."""
    for module in modules:
        for layer in fp8_layers(module):
            if getattr(layer, "fp8_state", None) is not None:
                layer.fp8_state[GRAD].zero_()
