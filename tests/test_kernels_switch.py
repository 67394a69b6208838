"""The one switch of ``megatron_ualm.kernels`` (``ENABLED``; env ``UALM_COMPILE=0``) turns every
kernel family off.

Every entry point decides with ``kernels.use_kernels(tensor)``: switch on, CUDA tensor, Triton.
On a CPU machine that is always False, so a plain CPU call says nothing about the switch. Here
the predicate is made to see a CUDA device and Triton (``kernels._on_gpu`` and
``kernels.HAVE_TRITON`` patched) and each family's launch -- the autograd Function, the Triton
kernel, the in-GEMM accumulation, the compile call -- is replaced by one that raises. With the
switch on every entry point reaches its launch (so the patch sits where the dispatch really
goes); with it off none does, and each returns exactly what its plain-PyTorch reference returns.
The model's own callers (``RMSNorm``, megatron's RoPE after ``install_fused_rope``) are checked
the same way. Finally ``UALM_COMPILE=0`` in the environment really sets the switch off.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from megatron_ualm import kernels
from megatron_ualm.kernels import compile as kcompile
from megatron_ualm.kernels import cross_entropy, fp8_cast, rmsnorm, rope, swiglu, wgrad

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Reached(Exception):
    pass


class _Launch:
    """Stands in for a launch: ``apply(...)``, ``kernel[grid](...)`` and plain calls all raise."""

    def __init__(self, name):
        self.name = name

    def __call__(self, *args, **kwargs):
        raise Reached(self.name)

    apply = __call__

    def __getitem__(self, grid):
        return self


def _inputs():
    g = torch.Generator().manual_seed(0)
    return {
        "x": torch.randn(5, 32, generator=g).to(torch.bfloat16),
        "w": (1 + 0.1 * torch.randn(32, generator=g)).to(torch.bfloat16),
        "y": torch.randn(5, 2 * 24, generator=g).to(torch.bfloat16),
        "t": torch.randn(6, 2, 4, 16, generator=g).to(torch.bfloat16),
        "freqs": torch.rand(6, 2, 1, 16, generator=g) * 3,
        "logits": torch.randn(5, 40, generator=g).to(torch.bfloat16),
        "targets": torch.tensor([3, -1, 0, 39, 7]),
        "main_grad": torch.randn(24, 32, generator=g),
        "dy": torch.randn(5, 24, generator=g).to(torch.bfloat16),
        "past": torch.tensor([0.0, 2.5, 1.0]),
    }


def _norm_module(i):
    from megatron_ualm.model.norm import RMSNorm
    m = RMSNorm(hidden_size=32, eps=1e-6)
    with torch.no_grad():
        m.weight.copy_(i["w"].float())
    return m


def _megatron_rope():
    from megatron.core.models.common.embeddings import rope_utils

    from megatron_ualm.model.rope import install_fused_rope
    install_fused_rope()
    return rope_utils._apply_rotary_pos_emb_bshd


def _lse(i):
    m, s, _ = cross_entropy._ce_stats_torch(i["logits"], i["targets"], 37)
    return torch.log(s) + m


def _wgrad(i, accumulate):
    main = i["main_grad"].clone()
    accumulate(main)
    return main


def _fp8(i, fn):
    amax = torch.tensor([0.5])
    q, inv = fn(i["x"], i["past"], amax, fp8_cast.E4M3)
    return q.view(torch.uint8), inv, amax


def _fp8_seed(i, fn):
    past = torch.zeros(4)
    fn(i["x"], past)
    return past


def _fp8_transpose(i, fn):
    x = i["x"].reshape(i["x"].shape[0], -1)
    out, out_t = torch.empty(x.shape, dtype=fp8_cast.E4M3), torch.empty(x.shape[::-1], dtype=fp8_cast.E4M3)
    inv, amax = torch.empty(1), torch.tensor([0.5])
    if fn is None:  # the reference: cast, then the byte transpose
        q, inv = fp8_cast.cast_reference(x, i["past"], amax, fp8_cast.E4M3)
        return q.view(torch.uint8), q.view(torch.uint8).t().contiguous(), inv, amax
    fn(x, i["past"], amax, fp8_cast.E4M3, out, out_t, inv)
    return out.view(torch.uint8), out_t.view(torch.uint8), inv, amax


# family: (module, launch attribute, entry point call, reference call) -- inputs dict -> result
FAMILIES = {
    "rmsnorm": (rmsnorm, "_RMSNormFunction",
                lambda i: rmsnorm.fused_rms_norm(i["x"], i["w"], 1e-6),
                lambda i: rmsnorm.rms_norm(i["x"], i["w"], 1e-6)),
    "rmsnorm module": (rmsnorm, "_RMSNormFunction",
                       lambda i: _norm_module(i)(i["x"]),
                       lambda i: rmsnorm.rms_norm(i["x"], _norm_module(i).weight, 1e-6)),
    "swiglu": (swiglu, "_SwiGLU",
               lambda i: swiglu.fused_swiglu(i["y"]),
               lambda i: swiglu.swiglu_reference(i["y"])),
    "rope": (rope, "_RoPE",
             lambda i: rope.fused_rotate(i["t"], i["freqs"]),
             lambda i: rope.rotate(i["t"], i["freqs"])),
    "megatron rope": (rope, "_RoPE",
                      lambda i: _megatron_rope()(i["t"], i["freqs"]),
                      lambda i: _megatron_rope().original(i["t"], i["freqs"])),
    "ce stats": (cross_entropy, "_ce_stats_kernel",
                 lambda i: cross_entropy.ce_stats(i["logits"], i["targets"], 37),
                 lambda i: cross_entropy._ce_stats_torch(i["logits"], i["targets"], 37)),
    "ce grad": (cross_entropy, "_ce_grad_kernel",
                lambda i: cross_entropy.ce_grad_(i["logits"].clone(), i["targets"], _lse(i), 37),
                lambda i: cross_entropy._ce_grad_torch_(i["logits"].clone(), i["targets"], _lse(i), 37)),
    "head cross entropy": (cross_entropy, "_ce_stats_kernel",
                           lambda i: cross_entropy.head_cross_entropy(
                               i["x"], i["main_grad"].to(torch.bfloat16), [(0, 5, 0, 24, 22)],
                               i["targets"].clamp(max=21)),
                           None),
    "wgrad": (wgrad, "_accumulate_in_gemm",
              lambda i: _wgrad(i, lambda main: wgrad.wgrad_gemm_accum_fp32(i["x"], i["dy"], main)),
              lambda i: _wgrad(i, lambda main: main.addmm_(i["dy"].t().float(), i["x"].float()))),
    "fp8 cast": (fp8_cast, "cast_kernel",
                 lambda i: _fp8(i, fp8_cast.cast),
                 lambda i: _fp8(i, fp8_cast.cast_reference)),
    "fp8 seed": (fp8_cast, "seed_kernel",
                 lambda i: _fp8_seed(i, fp8_cast.seed),
                 lambda i: _fp8_seed(i, fp8_cast.seed_reference)),
    "fp8 cast transpose": (fp8_cast, "cast_transpose_kernel",
                           lambda i: _fp8_transpose(i, fp8_cast.cast_transpose),
                           lambda i: _fp8_transpose(i, None)),
    "compile": (kcompile, "compiled",
                lambda i: kcompile.maybe_compiled(swiglu.swiglu_reference, i["y"]),
                lambda i: swiglu.swiglu_reference),
}


def _same(a, b):
    if isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            _same(u, v)
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    else:
        assert a is b


def test_cpu_tensors_never_take_the_kernels():
    x = torch.ones(3)
    assert kernels.use_kernels(x) is False and kernels.use_kernels(x, needs_triton=False) is False


@pytest.fixture
def fake_gpu(monkeypatch):
    """use_kernels sees every tensor on CUDA with Triton importable; the switch starts on."""
    monkeypatch.setattr(kernels, "_on_gpu", lambda t: True)
    monkeypatch.setattr(kernels, "HAVE_TRITON", True)
    monkeypatch.setattr(kernels, "ENABLED", True)
    x = torch.ones(3)
    assert kernels.use_kernels(x) and kernels.use_kernels(x, needs_triton=False)
    return monkeypatch


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_switch_on_reaches_the_kernel_and_off_takes_the_reference(family, fake_gpu):
    module, launch, call, reference = FAMILIES[family]
    fake_gpu.setattr(module, launch, _Launch(family), raising=False)  # kernels are absent without Triton
    i = _inputs()
    with pytest.raises(Reached, match=family):
        call(i)
    fake_gpu.setattr(kernels, "ENABLED", False)
    assert not kernels.use_kernels(i["x"]) and not kernels.use_kernels(i["x"], needs_triton=False)
    got = call(i)  # the launch would raise: reaching here means the switch routed around it
    if reference is not None:
        _same(got, reference(i))


@pytest.mark.parametrize("value,enabled", [("0", False), ("1", True), (None, True)])
def test_ualm_compile_env_sets_the_switch(value, enabled):
    env = {k: v for k, v in os.environ.items() if k != "UALM_COMPILE"}
    if value is not None:
        env["UALM_COMPILE"] = value
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", "from megatron_ualm import kernels; print(kernels.ENABLED)"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == str(enabled)
