"""``training/fast_optimizer.py``: the foreach grad-norm / scale replacements give megatron's
fallback values, and the fused-Adam pre-hook gives torch's default AdamW update."""
from __future__ import annotations

import torch

from megatron_ualm.training import fast_optimizer as fo
from tolerances import assert_within_ulps


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g) for n in (7, 1000, 3, 64 * 33)]


def test_foreach_ops_match_megatron_fallbacks(monkeypatch):
    import megatron.core.utils as mutils
    monkeypatch.setattr(torch, "tensor", _cpu_tensor(torch.tensor))  # the fallback asks for "cuda"
    ts = _tensors()
    want, _ = mutils.local_multi_tensor_l2_norm(0, None, [ts], False)
    got, _ = fo.foreach_l2_norm(0, torch.zeros(1), [ts], False)
    torch.testing.assert_close(got, want.reshape(1), atol=0, rtol=1e-6)
    a, b = _tensors(1), _tensors(1)
    mutils.local_multi_tensor_scale(0, None, [a, a], 0.37)
    fo.foreach_scale(0, None, [b, b], 0.37)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=0, rtol=0)
    src, dst1, dst2 = _tensors(2), [torch.empty(t.shape) for t in _tensors(2)], [torch.empty(t.shape) for t in _tensors(2)]
    mutils.local_multi_tensor_scale(0, None, [src, dst1], 1.0)
    fo.foreach_scale(0, None, [src, dst2], 1.0)
    for x, y in zip(dst1, dst2):
        assert torch.equal(x, y)


def _cpu_tensor(original):
    def tensor(*args, **kwargs):
        kwargs.pop("device", None)
        return original(*args, **kwargs)
    return tensor


def test_install_replaces_only_the_fallbacks_and_is_idempotent():
    from megatron.core.optimizer import clip_grads, optimizer as moptimizer
    fo.install_foreach_multi_tensor_ops()
    assert fo.install_foreach_multi_tensor_ops() == []
    assert clip_grads.l2_norm_impl is fo.foreach_l2_norm
    assert clip_grads.multi_tensor_scale_impl is fo.foreach_scale
    assert moptimizer.multi_tensor_scale_impl is fo.foreach_scale


def test_fused_pre_hook_gives_the_default_adamw_update():
    params = [[torch.nn.Parameter(t.clone()) for t in _tensors(3)] for _ in range(2)]
    opts = [torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1) for p in params]
    opts[1].register_step_pre_hook(fo._fused_pre_hook)  # CPU has a fused AdamW too
    for step in range(3):
        grads = _tensors(10 + step)
        for ps, opt in zip(params, opts):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt.step()
    assert opts[1].param_groups[0]["fused"] and not opts[0].param_groups[0]["fused"]
    for a, b in zip(*params):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)
    # a checkpoint-loaded float64/shared step becomes a float32 tensor per parameter
    shared = torch.tensor(3.0, dtype=torch.float64)
    for p in params[1]:
        opts[1].state[p]["step"] = shared
    fo._fused_pre_hook(opts[1], (), {})
    steps = [opts[1].state[p]["step"] for p in params[1]]
    assert all(s.dtype == torch.float32 and float(s) == 3.0 for s in steps)
    assert len({id(s) for s in steps}) == len(steps)


def test_use_fused_adam_leaves_cpu_optimizers_alone():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))])

    class Wrapper:
        optimizer = opt
    assert fo.use_fused_adam(Wrapper()) == 0
    assert not opt._optimizer_step_pre_hooks


def _param_copies(_):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module
    from megatron_ualm.model.transformer_config import transformer_config_from
    from megatron_ualm.model.ualm_model import build_ualm_model
    from megatron_ualm.runtime import init_runtime, shutdown_runtime
    from model_batches import tiny_model_cfg

    init_runtime(device="cpu", seed=3)
    cfg = tiny_model_cfg()
    config = transformer_config_from(cfg, None, "bf16")
    model = Float16Module(config, build_ualm_model(cfg, config))
    ddp = DistributedDataParallel(config=config, module=model, ddp_config=DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=True))
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, bf16=True,
                                                 use_distributed_optimizer=True), [ddp])
    assert fo.use_foreach_param_copy(opt) == 1
    opt = getattr(opt, "chained_optimizers", [opt])[0]
    mains = [p for g in opt.shard_fp32_from_float16_groups for p in g]
    g = torch.Generator().manual_seed(0)
    values = [[torch.randn(p.shape, generator=g) for p in mains] for _ in range(2)]

    def run(copy, which):
        for p, v in zip(mains, values[which]):
            p.data.copy_(v)
        copy()
        return [p.detach().clone() for p in model.parameters()]

    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    original = DistributedOptimizer._copy_main_params_to_model_params.__get__(opt)
    want = [run(original, 0), run(original, 1)]
    got = [run(opt._copy_main_params_to_model_params, 0), run(opt._copy_main_params_to_model_params, 1)]
    shutdown_runtime()
    return {"want": want, "got": got, "count": len(mains)}


def test_foreach_param_copy_gives_megatron_copies():
    from dist_utils import run_distributed
    (r,) = run_distributed(_param_copies, 1, None)
    assert r["count"] > 10
    for want, got in zip(r["want"], r["got"]):
        assert len(want) == len(got)
        for a, b in zip(want, got):
            assert a.dtype == torch.bfloat16 and torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(r["want"][0], r["want"][1]))


def _clip_runs(_):
    """Two copies of one tiny model + distributed optimizer (fused Adam, clip 1.0): megatron's
    host-side clip and the clip inside the Adam kernel, fed the same gradients."""
    import math

    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module
    from megatron_ualm.model.transformer_config import transformer_config_from
    from megatron_ualm.model.ualm_model import build_ualm_model
    from megatron_ualm.runtime import init_runtime, shutdown_runtime
    from model_batches import tiny_model_cfg

    init_runtime(device="cpu", seed=3)
    cfg = tiny_model_cfg()
    config = transformer_config_from(cfg, None, "bf16")
    models = [Float16Module(config, build_ualm_model(cfg, config)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())  # same weights (the init RNG may be CUDA's)
    setups = []
    for clip_in_adam, model in zip((False, True), models):
        ddp = DistributedDataParallel(config=config, module=model, ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=True))
        opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, bf16=True, clip_grad=1.0,
                                                     weight_decay=0.1, use_distributed_optimizer=True), [ddp])
        inner = getattr(opt, "chained_optimizers", [opt])[0].optimizer
        inner.register_step_pre_hook(fo._fused_pre_hook)  # what use_fused_adam does on CUDA
        setattr(inner, fo._MARK, True)
        if clip_in_adam:
            assert fo.use_clip_in_adam(opt) == 1
        setups.append((ddp, opt))
    g = torch.Generator().manual_seed(1)
    shapes = [p.shape for p in setups[0][0].parameters() if p.requires_grad]
    out = {"norms": [], "params": [], "mains": [], "steps": []}
    for scale in (30.0, 1e-3, float("nan")):  # clipped, not clipped, non-finite
        grads = [torch.randn(s, generator=g) * scale / math.sqrt(len(shapes)) for s in shapes]
        norms, params, mains = [], [], []
        for ddp, opt in setups:
            ddp.zero_grad_buffer()
            for p, gr in zip([p for p in ddp.parameters() if p.requires_grad], grads):
                p.main_grad.copy_(gr)
            ok, norm, _ = opt.step()
            norms.append(float(norm))
            params.append([p.detach().clone() for p in ddp.parameters()])
            part = getattr(opt, "chained_optimizers", [opt])[0]
            mains.append([p.detach().clone() for g in part.shard_fp32_from_float16_groups for p in g])
        out["norms"].append(norms)
        out["params"].append(params)
        out["mains"].append(mains)
        inner = getattr(setups[1][1], "chained_optimizers", [setups[1][1]])[0].optimizer
        out["steps"].append(sorted({float(s["step"]) for s in inner.state.values()}))
    shutdown_runtime()
    return out


def test_clip_in_adam_gives_megatron_clipping_and_skips_non_finite_norms():
    from dist_utils import run_distributed
    (r,) = run_distributed(_clip_runs, 1, None)
    for i, (want, got) in enumerate(r["norms"][:2]):
        assert want > 0 and abs(got - want) <= 1e-5 * want, (i, want, got)
    assert r["norms"][0][0] > 1.0 > r["norms"][1][0]  # the first step clips, the second does not
    # The fp32 master weights agree to float32 rounding (the clip is a multiply of the
    # gradients in megatron, a divide inside Adam here). The bf16 model weights are those
    # rounded to bf16, so where a master weight sits next to a rounding boundary the two may
    # land one bf16 step apart (how often depends on the CPU's float kernels): at most one ulp.
    for want, got in r["mains"][:2]:
        for a, b in zip(want, got):
            assert a.dtype == torch.float32
            torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)
    for want, got in r["params"][:2]:
        for a, b in zip(want, got):
            assert a.dtype == torch.bfloat16
            assert_within_ulps(b, a, ulps=1)
    # a NaN norm: megatron's clip spreads it into the weights; the fused path skips the update
    assert any(torch.isnan(p.float()).any() for p in r["params"][2][0])
    for before, after in zip(r["params"][1][1], r["params"][2][1]):
        assert torch.equal(before, after)
    assert r["steps"] == [[1.0], [2.0], [2.0]]
