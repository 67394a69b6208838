"""FP8 GEMMs for the decoder's linear layers (``training.fp8``): ``model/fp8.py`` (recipes, state,
the linear layers) and ``kernels/fp8_cast.py`` (the cast kernel, the scaling math, the GEMM call).

CPU: the scaling math (scale from amax, round trip within the format's precision,
saturation, delayed history), the emulated FP8 linear against float64 with tolerances from
the formats' mantissa bits, the layer spec switch, and the documented refusals (fp32, no
FP8 GPU). TP = 2 with and without SP: ``tests/test_model_parallel.py``. GPU (``gpu`` mark): the Triton cast equals the PyTorch cast bit for
bit; the FP8 linear's output and gradients are close to bf16's.
"""
from __future__ import annotations

import os
import sys
import types

import pytest
import torch

from megatron_ualm.kernels import fp8_cast
from megatron_ualm.model import fp8

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
FP8_GPU = pytest.mark.skipif(not fp8.supported(), reason="needs a GPU with FP8 tensor cores")


def half_ulp(dtype) -> float:
    """Largest relative rounding error of a normal value: 2^-(mantissa bits + 1)."""
    return 2.0 ** -(fp8_cast.MANTISSA_BITS[dtype] + 1)


# --- scaling math ------------------------------------------------------------------------------------
def test_scale_from_amax_maps_amax_to_the_format_maximum():
    amax = torch.tensor([2.0, 0.5, 0.0, float("inf")])
    scale = fp8_cast.scale_from_amax(amax, fp8_cast.FP8_MAX[fp8_cast.E4M3])
    assert scale.dtype == torch.float32
    assert scale.tolist() == [224.0, 896.0, 1.0, 1.0]  # 448 / amax; nothing to scale from -> 1
    assert fp8_cast.scale_from_amax(torch.tensor([2.0]), 448.0, margin=2).item() == 56.0
    assert fp8_cast.FP8_MAX[fp8_cast.E4M3] == 448.0 and fp8_cast.FP8_MAX[fp8_cast.E5M2] == 57344.0


@pytest.mark.parametrize("dtype", [fp8_cast.E4M3, fp8_cast.E5M2])
def test_round_trip_error_is_within_the_format_precision(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, generator=g, dtype=torch.float64) * torch.exp(torch.randn(20000, generator=g))
    x = torch.cat([x] + [x[:2000] * f for f in (1e-3, 1e-5, 1e-7)])  # down into the subnormals
    scale = fp8_cast.scale_from_amax(x.abs().max(), fp8_cast.FP8_MAX[dtype])
    back = fp8_cast.quantize(x, scale, dtype).double() / scale.double()
    smallest_normal = 2.0 ** (-6 if dtype == fp8_cast.E4M3 else -14)
    normal = (x * scale).abs() >= smallest_normal
    rel = ((back - x).abs() / x.abs())[normal]
    assert rel.max().item() <= half_ulp(dtype)
    assert rel.max().item() > half_ulp(dtype) / 2  # really rounded to this format, not finer
    # subnormals: absolute error at most half the subnormal step (in scaled units)
    step = smallest_normal * 2.0 ** -fp8_cast.MANTISSA_BITS[dtype]
    assert (~normal).sum() > 100
    assert ((back - x).abs() * scale.double())[~normal].max().item() <= step / 2


@pytest.mark.parametrize("dtype", [fp8_cast.E4M3, fp8_cast.E5M2])
def test_values_beyond_the_range_saturate(dtype):
    m = fp8_cast.FP8_MAX[dtype]
    q = fp8_cast.quantize(torch.tensor([3 * m, -10 * m, m, float("inf")]), torch.tensor([1.0]), dtype)
    assert q.float().tolist() == [m, -m, m, m]  # no inf, no NaN


def test_delayed_history_keeps_the_last_steps_and_forgets_the_oldest():
    state = fp8.new_state("cpu", history=3)
    for step, amax in enumerate([5.0, 1.0, 2.0, 3.0]):
        state[:, -1] = amax          # what the casts of this step collected
        fp8.roll_history(state, step)
        assert (state[:, -1] == 0).all()
    assert sorted(state[0, :3].tolist()) == [1.0, 2.0, 3.0]  # 5.0 (4 steps ago) evicted
    past, amax_out = state[0, :3], torch.zeros(1)
    x = torch.tensor([0.5, -6.0])
    q, inv = fp8_cast.cast_reference(x, past, amax_out, fp8_cast.E4M3)
    assert inv.item() == pytest.approx(3.0 / 448.0)  # scale from the history, not from x
    assert q.float().tolist() == [72.0, -448.0]  # 0.5 * 448/3 = 74.7 rounds to 72 (step 8); -6 saturates
    assert amax_out.item() == 6.0  # this call's amax is collected for the next step


def test_first_delayed_call_seeds_from_its_own_amax_then_uses_the_history():
    state = fp8.new_state("cpu")
    x = torch.tensor([[1.0, -2.0]])
    for row, fmt in ((fp8.INPUT, fp8_cast.E4M3), (fp8.GRAD, fp8_cast.E5M2)):
        q, inv = fp8.cast_scaled(x, state, row, "delayed")
        assert inv.item() == pytest.approx(2.0 / fp8_cast.FP8_MAX[fmt]) and q.dtype == fmt
        assert state[row, :-1].tolist() == [2.0] + [0.0] * (fp8.HISTORY - 1)  # seeded in slot 0
        q, inv = fp8.cast_scaled(4 * x, state, row, "delayed")  # scaled from the history now
        assert inv.item() == pytest.approx(2.0 / fp8_cast.FP8_MAX[fmt]) and state[row, -1].item() == 8.0
        assert q.float().max().item() == fp8_cast.FP8_MAX[fmt]  # 4 and 8 saturate
        assert state[row, 0].item() == 2.0  # a second call does not seed again
    q, inv = fp8.cast_scaled(4 * x, state, fp8.WEIGHT, "current")  # current: always its own amax
    assert inv.item() == pytest.approx(8.0 / 448) and state[fp8.WEIGHT, :-1].eq(0).all()


def test_seed_touches_only_an_empty_history():
    x = torch.tensor([3.0, -5.0])
    past = torch.zeros(4)
    fp8_cast.seed_reference(x, past)
    assert past.tolist() == [5.0, 0.0, 0.0, 0.0]
    past = torch.tensor([0.0, 0.5, 0.0, 0.0])
    fp8_cast.seed_reference(x, past)
    assert past.tolist() == [0.0, 0.5, 0.0, 0.0]


def test_weight_cast_is_reused_until_the_optimizer_step_marks_it_stale():
    x, w, _, dy = _operands()
    state, wc = fp8.new_state("cpu"), fp8.WeightCast()
    wr = w.clone().requires_grad_()
    y1 = fp8.fp8_linear(x, wr, None, state, "delayed", weight_cast=wc)
    torch.testing.assert_close(y1, fp8.fp8_linear(x, wr, None, fp8.new_state("cpu"), "delayed"), rtol=0, atol=0)
    buffers = (wc.w8.data_ptr(), wc.w8t.data_ptr(), wc.inv.data_ptr())
    assert torch.equal(wc.w8t.view(torch.uint8), wc.w8.view(torch.uint8).t())
    with torch.no_grad():
        wr.neg_()  # an optimizer step changes the weight (negated: same amax, so y2 = -y1 exactly)
    assert torch.equal(fp8.fp8_linear(x, wr, None, state, "delayed", weight_cast=wc), y1)  # same step: cached
    wc.stale = True  # end_step
    y2 = fp8.fp8_linear(x, wr, None, state, "delayed", weight_cast=wc)
    assert (wc.w8.data_ptr(), wc.w8t.data_ptr(), wc.inv.data_ptr()) == buffers  # fixed addresses (graphs)
    assert torch.equal(y2, -y1)
    xr = x.clone().requires_grad_()  # the input gradient uses the cached transpose
    fp8.fp8_linear(xr, wr, None, state, "delayed", weight_cast=wc).backward(dy)
    xc = x.clone().requires_grad_()
    state2 = state.clone()
    fp8.fp8_linear(xc, wr, None, state2, "delayed").backward(dy)
    assert torch.equal(xr.grad, xc.grad)


# --- the FP8 linear (emulated GEMM) ------------------------------------------------------------------
def _operands(tokens=96, n_in=64, n_out=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, tokens // 2, n_in, generator=g).bfloat16()
    w = (torch.randn(n_out, n_in, generator=g) * 0.1).bfloat16()
    b = torch.randn(n_out, generator=g).bfloat16()
    dy = (torch.randn(2, tokens // 2, n_out, generator=g) * 1e-3).bfloat16()
    return x, w, b, dy


@pytest.mark.parametrize("recipe", fp8.RECIPES)
def test_emulated_fp8_linear_matches_float64_within_fp8_tolerances(recipe):
    x, w, b, dy = _operands()
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    state = fp8.new_state("cpu")
    y = fp8.fp8_linear(xr, wr, br, state, recipe)
    y.backward(dy)
    X, W, B, DY = (t.double() for t in (x, w, b, dy))
    # each product carries the rounding of both operands, each element's error is bounded by
    # its share of sum |a||b|; plus one bf16 rounding of the result
    e4, e5, bf = half_ulp(fp8_cast.E4M3), half_ulp(fp8_cast.E5M2), 2.0 ** -8
    fwd_bound = (2 * e4 + e4 * e4) * (X.abs() @ W.abs().t()) + bf * (X @ W.t() + B).abs() + 1e-30
    assert ((y.double() - (X @ W.t() + B)).abs() <= fwd_bound).all()
    bwd_bound = (e4 + e5 + e4 * e5) * (DY.abs() @ W.abs()) + bf * (DY @ W).abs() + 1e-30
    assert ((xr.grad.double() - DY @ W).abs() <= bwd_bound).all()
    assert (xr.grad.double() - DY @ W).abs().max() > 0  # it really went through FP8
    # weight and bias gradients are bf16 GEMMs of the bf16 tensors
    torch.testing.assert_close(wr.grad.double(), DY.reshape(-1, 48).t() @ X.reshape(-1, 64), rtol=2 ** -7, atol=1e-6)
    torch.testing.assert_close(br.grad.double(), DY.reshape(-1, 48).sum(0), rtol=2 ** -7, atol=1e-6)
    assert (state[:, :-1].max(1).values > 0).tolist() == [recipe == "delayed"] * 3 and (state[:, -1] > 0).all()


def test_weight_gradient_accumulates_into_main_grad():
    x, w, _, dy = _operands()
    start = torch.randn(48, 64)
    main_grad = start.clone()
    wr = w.clone().requires_grad_()
    wr.grad_added_to_main_grad = False  # megatron DDP's flag: a dummy grad is returned
    xr = x.clone().requires_grad_()
    fp8.fp8_linear(xr, wr, None, fp8.new_state("cpu"), "delayed", main_grad).backward(dy)
    want = start.double() + dy.double().reshape(-1, 48).t() @ x.double().reshape(-1, 64)
    torch.testing.assert_close(main_grad.double(), want, rtol=1e-5, atol=1e-6)
    assert wr.grad_added_to_main_grad is True and wr.grad.shape == (48, 64)


# --- the switch ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runtime():
    from megatron_ualm.runtime import init_runtime, shutdown_runtime
    rt = init_runtime(device="cpu", seed=5)
    yield rt
    shutdown_runtime()


def test_fp8_layers_in_the_model_and_their_loss_stays_close_to_the_plain_model(runtime):
    from model_batches import tiny_model_cfg
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron_ualm.model.transformer_config import transformer_config_from
    from megatron_ualm.model.ualm_model import UALMModel
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    from train_throughput import synthetic_ualm_batch
    from megatron_ualm.config import EncoderConfig
    cfg = tiny_model_cfg(encoder=EncoderConfig(kind="none"))
    plain = UALMModel(cfg, transformer_config_from(cfg, None, "fp32", use_cpu_initialization=True))
    model = UALMModel(cfg, transformer_config_from(cfg, None, "fp32", use_cpu_initialization=True, fp8="delayed"))
    model.load_state_dict(plain.state_dict())
    layer = model.decoder.layers[0]
    linears = [layer.self_attention.linear_qkv, layer.self_attention.linear_proj, layer.mlp.linear_fc1,
               layer.mlp.linear_fc2]
    assert all(isinstance(m, fp8._FP8Mixin) for m in linears)
    assert isinstance(layer.self_attention.linear_qkv, ColumnParallelLinear)  # megatron's class underneath
    assert not isinstance(plain.decoder.layers[0].mlp.linear_fc1, fp8._FP8Mixin)
    batch = synthetic_ualm_batch(plain.vocab, 2, 64, torch.device("cpu"), torch.Generator().manual_seed(0), 8, 32)
    losses = []
    for m in (plain, model):
        out = m(batch["tokens"], batch["position_ids"], batch["document_ids"], labels=batch["labels"],
                loss_weights=batch["loss_weights"], plan=batch["plan"])
        loss = (out.ce * batch["loss_weights"]).sum() / batch["loss_weights"].sum()
        loss.backward()
        losses.append(loss.item())
    assert losses[1] != losses[0] and abs(losses[1] - losses[0]) / losses[0] < 2e-3
    assert not any(m.fp8_weight.stale for m in linears)  # each weight cast once for this step
    assert fp8.end_step(model) == 4 * cfg.num_layers and fp8.end_step(plain) == 0
    assert (linears[0].fp8_state[:, 0] > 0).all() and (linears[0].fp8_state[:, -1] == 0).all()
    assert all(m.fp8_weight.stale for m in linears)  # the optimizer step made them stale
    fp8.refresh_stale([model.decoder.layers[0]])  # what a CUDA-graph replay does before a layer
    assert [m.fp8_weight.stale for m in linears] == [False] * 4
    fp8.reset_grad_scaling([model.decoder])
    assert all(m.fp8_state[fp8.GRAD].eq(0).all() and m.fp8_state[fp8.INPUT, 0] > 0 for m in linears)


def test_config_refuses_fp8_without_bf16():
    from megatron_ualm.config import ConfigError, UALMConfig, validate
    cfg = UALMConfig()
    cfg.training.fp8 = True
    validate(cfg)  # bf16: accepted
    cfg.parallel.tensor_parallel, cfg.parallel.sequence_parallel = 2, True
    validate(cfg)  # so is TP + SP (tests/test_model_parallel.py runs it)
    cfg.training.precision = "fp32"
    with pytest.raises(ConfigError, match=r"^training.fp8: needs training.precision=bf16, got fp32$"):
        validate(cfg)


def test_fp8_on_cpu_stops_with_one_line_before_building_the_model():
    from megatron_ualm.config import ConfigError, UALMConfig
    from megatron_ualm.training.providers import build_model
    cfg = UALMConfig()
    cfg.training.fp8 = True
    with pytest.raises(ConfigError) as err:
        build_model(cfg, types.SimpleNamespace(is_cpu=True))
    assert str(err.value) == ("training.fp8: needs a GPU with FP8 tensor cores (compute capability >= 8.9, "
                              "e.g. H100/H200), this run has CPU; set training.fp8=false")


# --- GPU --------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@gpu
@pytest.mark.skipif(not fp8_cast.HAVE_TRITON, reason="needs Triton")
@pytest.mark.parametrize("dtype", [fp8_cast.E4M3, fp8_cast.E5M2])
@pytest.mark.parametrize("n", [1, 2047, 8192 * 1536 + 5])
def test_triton_cast_equals_the_reference_bit_for_bit(dtype, n):
    g = torch.Generator(device="cuda").manual_seed(n)
    x = (torch.randn(n, device="cuda", generator=g) * 3).bfloat16()
    for past in (torch.tensor([0.0, 2.5, 1.0], device="cuda"),    # in range and saturating values
                 torch.zeros(3, device="cuda")):                  # no history: scale 1
        got_amax, want_amax = torch.full((1,), 0.25, device="cuda"), torch.full((1,), 0.25, device="cuda")
        q, inv = fp8_cast.cast_kernel(x, past, got_amax, dtype)
        q_ref, inv_ref = fp8_cast.cast_reference(x, past, want_amax, dtype)
        assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
        assert torch.equal(got_amax, want_amax)
        torch.testing.assert_close(inv, inv_ref, rtol=2 ** -23, atol=0)


@pytest.mark.gpu
@gpu
@pytest.mark.skipif(not fp8_cast.HAVE_TRITON, reason="needs Triton")
@pytest.mark.parametrize("shape", [(1, 1), (130, 70), (2048, 1536), (3584 + 16, 18944)])
def test_triton_cast_transpose_equals_the_reference_bit_for_bit(shape):
    g = torch.Generator(device="cuda").manual_seed(shape[0])
    x = (torch.randn(shape, device="cuda", generator=g) * 3).bfloat16()
    past = torch.tensor([0.0, 2.5, 1.0], device="cuda")
    got = [torch.empty(shape, dtype=fp8_cast.E4M3, device="cuda"), torch.empty(shape[::-1], dtype=fp8_cast.E4M3, device="cuda"),
           torch.empty(1, device="cuda"), torch.full((1,), 0.25, device="cuda")]
    fp8_cast.cast_transpose_kernel(x, past, got[3], fp8_cast.E4M3, got[0], got[1], got[2])
    want_amax = torch.full((1,), 0.25, device="cuda")
    q, inv = fp8_cast.cast_reference(x, past, want_amax, fp8_cast.E4M3)
    assert torch.equal(got[0].view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(got[1].view(torch.uint8), q.view(torch.uint8).t())
    assert torch.equal(got[3], want_amax)
    torch.testing.assert_close(got[2], inv, rtol=2 ** -23, atol=0)


@pytest.mark.gpu
@gpu
@pytest.mark.skipif(not fp8_cast.HAVE_TRITON, reason="needs Triton")
@pytest.mark.parametrize("n", [1, 2047, 8192 * 1536 + 5])
def test_triton_seed_equals_the_reference(n):
    g = torch.Generator(device="cuda").manual_seed(n)
    x = (torch.randn(n, device="cuda", generator=g) * 3).bfloat16()
    for past in (torch.zeros(16, device="cuda"), torch.tensor([0.0, 2.5, 0.0], device="cuda")):
        got, want = past.clone(), past.clone()
        fp8_cast.seed_kernel(x, got)
        fp8_cast.seed_reference(x, want)
        assert torch.equal(got, want)


@pytest.mark.gpu
@FP8_GPU
@pytest.mark.parametrize("recipe", fp8.RECIPES)
def test_fp8_linear_is_close_to_bf16_on_gpu(recipe):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4096, 1536, device="cuda", generator=g).bfloat16()
    w = (torch.randn(2048, 1536, device="cuda", generator=g) * 0.02).bfloat16()
    dy = (torch.randn(4096, 2048, device="cuda", generator=g) * 1e-4).bfloat16()
    main_grad = torch.zeros(2048, 1536, device="cuda")
    state = fp8.new_state("cuda")
    for step in range(3):  # the third step scales from the history (delayed)
        xr = x.clone().requires_grad_()
        y = fp8.fp8_linear(xr, w.requires_grad_(), None, state, recipe, main_grad)
        y.backward(dy)
        fp8.roll_history(state, step)
    X, W, DY = x.double(), w.double(), dy.double()

    def rel(a, b):
        return ((a.double() - b).norm() / b.norm()).item()

    # normwise error of independent roundings of both operands: ~sqrt(2) x the rms relative
    # rounding error of e4m3 (~2^-3 / sqrt(12) / 1.44 = 0.025); the CPU emulation of this call
    # (1024 tokens) gives 0.037 forward and 0.059 for the input gradient (e5m2: one mantissa
    # bit less); bf16 gives 0.0017
    assert rel(y, X @ W.t()) < 0.05
    assert rel(xr.grad, DY @ W) < 0.08
    assert rel(main_grad, 3 * (DY.t() @ X)) < 1e-3  # bf16 operands, fp32 accumulation in place
