"""Tolerances that follow from the dtype: distances counted in units in the last place."""
from __future__ import annotations

import torch


def ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of ``x``'s dtype at each element of ``x`` (in float64): the step to the next
    representable value of larger magnitude (``finfo.tiny``'s spacing for zeros/subnormals)."""
    info = torch.finfo(x.dtype)
    mag = x.detach().double().abs().clamp_min(info.tiny)
    return torch.exp2(torch.floor(torch.log2(mag)) - (info.bits - 1 - _exponent_bits(x.dtype)))


def _exponent_bits(dtype: torch.dtype) -> int:
    return {torch.float32: 8, torch.float64: 11, torch.float16: 5, torch.bfloat16: 8}[dtype]


def assert_within_ulps(actual: torch.Tensor, expected: torch.Tensor, ulps: int = 1) -> None:
    """Every element of ``actual`` is within ``ulps`` steps of its dtype of ``expected`` (same
    dtype and shape; NaNs must match)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, (actual.dtype, expected.dtype)
    a, e = actual.detach().double(), expected.detach().double()
    nan = torch.isnan(a) | torch.isnan(e)
    assert torch.equal(torch.isnan(a), torch.isnan(e)), "NaNs differ"
    step = torch.maximum(ulp(actual), ulp(expected))
    bad = ((a - e).abs() > ulps * step) & ~nan
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(f"{int(bad.sum())} of {a.numel()} elements differ by more than {ulps} "
                             f"{actual.dtype} ulp(s); first at flat index {i}: {a.flatten()[i]!r} vs "
                             f"{e.flatten()[i]!r} (ulp {step.flatten()[i]!r})")
