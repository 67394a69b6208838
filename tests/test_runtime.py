"""Tests of megatron_ualm.runtime: init/shutdown, the CPU compatibility patches, and a tiny
megatron-core GPTModel trained on CPU at TP=1, TP=2, PP=2, DP=2 and TP=2 x PP=2 over gloo.

Equivalence across layouts is checked against one reference: the TP=1 run saves its initial
weights; every other layout loads exactly those weights (sliced along each parameter's
megatron partition dim for TP, renumbered by global layer for PP), sees the same global
batch, and must reproduce the reference step-1 loss to float32 rounding (later steps to a
slightly looser tolerance, since Adam amplifies rounding in near-zero gradients).
"""
from __future__ import annotations

import os

import pytest
import torch

from dist_utils import run_distributed
from megatron_ualm.runtime import (
    CpuCompatError,
    apply_cpu_compat,
    check_patch_targets,
    init_runtime,
    is_cpu_compat_applied,
    patched_symbols,
    shutdown_runtime,
)

# Tiny Qwen2-like decoder: RMSNorm, SwiGLU, GQA, bias on QKV only, RoPE.
VOCAB, HIDDEN, HEADS, GROUPS, LAYERS, FFN = 128, 64, 4, 2, 2, 128
SEQ, MICRO_BATCH, NUM_MICROBATCHES, STEPS = 16, 2, 2, 4
LR = 5e-3

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


# --------------------------------------------------------------------------------------
# Shared helpers (module level so spawned children can unpickle them).
# --------------------------------------------------------------------------------------
def _global_batch():
    """The same global batch every step: tokens/labels [NUM_MICROBATCHES, MICRO_BATCH, SEQ]."""
    g = torch.Generator().manual_seed(2024)
    seq = torch.randint(1, VOCAB, (NUM_MICROBATCHES, MICRO_BATCH, SEQ + 1), generator=g)
    return seq[..., :-1].contiguous(), seq[..., 1:].contiguous()


def _build_model(rt):
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=LAYERS,
        hidden_size=HIDDEN,
        ffn_hidden_size=FFN,
        num_attention_heads=HEADS,
        num_query_groups=GROUPS,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=rt.tp_size,
        pipeline_model_parallel_size=rt.pp_size,
        pipeline_dtype=torch.float32,
        params_dtype=torch.float32,
        use_cpu_initialization=True,
        gradient_accumulation_fusion=False,  # needs apex' fused CUDA kernel
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_base=1_000_000,
    )
    return config, model


def _global_name(model, name: str) -> str:
    """Parameter name in the TP=1/PP=1 model: local layer index -> global layer index."""
    parts = name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(model.decoder.layers[int(parts[2])].layer_number - 1)
    return ".".join(parts)


def _shard(full: torch.Tensor, param, name: str, rt) -> torch.Tensor:
    """This TP rank's slice of a full (TP=1) parameter, in megatron's own TP layout."""
    if not getattr(param, "tensor_model_parallel", False) or rt.tp_size == 1:
        return full
    dim = param.partition_dim
    if name.endswith("mlp.linear_fc1.weight"):
        # SwiGLU fc1 holds [gate; up] stacked on dim 0; each TP rank holds [gate_r; up_r],
        # so the halves are split separately (not one contiguous chunk of the stack).
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(rt.tp_size, dim)[rt.tp_rank],
                          up.chunk(rt.tp_size, dim)[rt.tp_rank]], dim=0)
    return full.chunk(rt.tp_size, dim=dim)[rt.tp_rank]


def _load_full_weights(model, full_state, rt) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            full = full_state[_global_name(model, name)]
            piece = _shard(full, param, name, rt)
            assert piece.shape == param.shape, (name, piece.shape, param.shape)
            param.copy_(piece)


def _train(tp: int, pp: int, init_weights_path: str, save_init: bool = False,
           device: str = "cpu") -> dict:
    """Build, (save or load) the initial weights, train STEPS steps; return losses etc.

    Runs in whichever process calls it (the pytest process for TP=1, spawned ranks else).
    Returns the per-step mean 'lm loss' and grad norm (None on ranks without the loss).
    """
    from functools import partial

    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    rt = init_runtime(tensor_parallel=tp, pipeline_parallel=pp, seed=1234, device=device)
    try:
        config, model = _build_model(rt)
        if save_init:
            assert rt.world_size == 1
            torch.save({k: v.detach().clone() for k, v in model.named_parameters()},
                       init_weights_path)
        else:
            _load_full_weights(model, torch.load(init_weights_path), rt)
        model = model.to(rt.device)

        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=True,
            overlap_grad_reduce=False, overlap_param_gather=False)
        model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
        optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=LR, weight_decay=0.0, clip_grad=1.0,
                            bf16=False, fp16=False, params_dtype=torch.float32,
                            use_distributed_optimizer=True),
            [model])
        config.finalize_model_grads_func = finalize_model_grads
        config.grad_scale_func = optimizer.scale_loss
        config.no_sync_func = model.no_sync

        tokens, labels = (t.to(rt.device) for t in _global_batch())
        # Data parallel ranks take consecutive slices of the global batch's microbatches.
        per_dp = NUM_MICROBATCHES // rt.dp_size
        mine = range(rt.dp_rank * per_dp, (rt.dp_rank + 1) * per_dp)
        positions = torch.arange(SEQ, device=rt.device).unsqueeze(0).expand(MICRO_BATCH, SEQ)

        def forward_step(data_iterator, chunk):
            tok, lab = next(data_iterator)
            per_token = chunk(tok, positions, None, labels=lab)  # [b, s] cross entropy

            def loss_func(output):
                loss = output.float().mean()
                # clone: the schedule divides the returned loss in place by num_microbatches
                return loss, {"lm loss": loss.detach().clone()}

            return per_token, loss_func

        forward_backward = get_forward_backward_func()
        losses, grad_norms = [], []
        for _ in range(STEPS):
            model.zero_grad_buffer()
            optimizer.zero_grad()
            out = forward_backward(
                forward_step_func=forward_step,
                data_iterator=iter([(tokens[i], labels[i]) for i in mine]),
                model=[model], num_microbatches=per_dp, seq_length=SEQ,
                micro_batch_size=MICRO_BATCH, forward_only=False)
            ok, grad_norm, _ = optimizer.step()
            assert ok
            grad_norms.append(float(grad_norm))
            if rt.is_last_stage:
                loss = torch.stack([o["lm loss"] for o in out]).mean()
                if rt.dp_size > 1:  # the global-batch loss = mean over DP replicas
                    from megatron.core import parallel_state
                    torch.distributed.all_reduce(loss, group=parallel_state.get_data_parallel_group())
                    loss /= rt.dp_size
                losses.append(float(loss))
        return {"rank": rt.rank, "losses": losses or None, "grad_norms": grad_norms,
                "last_stage": rt.is_last_stage, "backend": rt.backend,
                "max_connections": os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS")}
    finally:
        shutdown_runtime()


def _clear_torchrun_env(monkeypatch):
    for var in _TORCHRUN_VARS:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """TP=1, PP=1 run in this process: its initial weights (a file) and its losses."""
    path = str(tmp_path_factory.mktemp("runtime") / "init_weights.pt")
    saved = {v: os.environ.pop(v) for v in _TORCHRUN_VARS if v in os.environ}
    try:
        result = _train(1, 1, path, save_init=True)
    finally:
        os.environ.update(saved)
    return path, result


def _check_against_reference(reference, results, step1_abs=5e-6):
    _, ref = reference
    ref_losses, ref_norms = ref["losses"], ref["grad_norms"]
    lossy = [r for r in results if r["last_stage"]]
    assert lossy, "no rank reported a loss"
    for r in lossy:
        # Step 1: identical weights and data -> same loss up to float32 summation order.
        # (Loading TP shards wrongly, e.g. SwiGLU fc1 as one chunk, moves it by ~2e-3.)
        assert r["losses"][0] == pytest.approx(ref_losses[0], rel=0, abs=step1_abs)
        assert r["losses"] == pytest.approx(ref_losses, rel=1e-4)
        assert r["losses"][-1] < r["losses"][0] - 1e-3, r["losses"]
    for r in results:  # clipping sees the global norm on every rank
        assert r["grad_norms"][0] == pytest.approx(ref_norms[0], rel=1e-4)


# --------------------------------------------------------------------------------------
# Runtime init / shutdown
# --------------------------------------------------------------------------------------
def test_single_process_init_without_env(monkeypatch):
    _clear_torchrun_env(monkeypatch)
    rt = init_runtime(device="cpu", seed=7)
    try:
        assert (rt.rank, rt.world_size, rt.local_rank) == (0, 1, 0)
        assert rt.device == torch.device("cpu") and rt.backend == "gloo"
        assert (rt.tp_size, rt.pp_size, rt.cp_size, rt.dp_size) == (1, 1, 1, 1)
        assert rt.is_first_stage and rt.is_last_stage and rt.vpp_size is None
        assert is_cpu_compat_applied()
        with pytest.raises(RuntimeError, match="shutdown_runtime"):
            init_runtime(device="cpu")
        with pytest.raises(AttributeError):
            rt.rank = 3  # frozen
    finally:
        shutdown_runtime()
    assert not torch.distributed.is_initialized()
    rt = init_runtime(device="cpu", seed=7)  # re-initialising in the same process works
    shutdown_runtime()
    shutdown_runtime()  # and shutting down twice is harmless


def test_init_rejects_indivisible_world(monkeypatch):
    _clear_torchrun_env(monkeypatch)
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match=r"world_size=3 is not divisible .* = 2"):
        init_runtime(tensor_parallel=2, device="cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        init_runtime(tensor_parallel=2, device="cpu")


# --------------------------------------------------------------------------------------
# CPU compatibility patches
# --------------------------------------------------------------------------------------
def test_every_patch_target_exists_and_is_patched():
    apply_cpu_compat()
    apply_cpu_compat()  # idempotent
    state = check_patch_targets()
    assert set(state) == set(patched_symbols())
    assert all(state.values()), [s for s, ok in state.items() if not ok]
    assert is_cpu_compat_applied()
    import megatron.core.tensor_parallel.random as mrandom

    assert torch.cuda.current_device() == torch.device("cpu")
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.tensor([1.0], device="cuda", pin_memory=True).device.type == "cpu"
    assert mrandom._get_cuda_rng_state().dtype == torch.uint8
    torch.cuda.synchronize()
    torch.cuda.current_stream().wait_stream(torch.cuda.default_stream())


def test_missing_target_fails_loudly(monkeypatch):
    import megatron.core.tensor_parallel.random as mrandom
    from megatron.core.package_info import __version__

    monkeypatch.delattr(mrandom, "_set_cuda_rng_state")
    with pytest.raises(CpuCompatError) as err:
        check_patch_targets()
    msg = str(err.value)
    assert "megatron.core.tensor_parallel.random._set_cuda_rng_state" in msg
    assert f"megatron-core {__version__}" in msg
    with pytest.raises(CpuCompatError, match="_set_cuda_rng_state"):
        apply_cpu_compat()
    assert not is_cpu_compat_applied()


def test_rng_tracker_forks_are_deterministic_on_cpu(caplog):
    """The tracker keeps per-name CPU generator states; forks leave the default stream alone."""
    apply_cpu_compat()
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    tracker = CudaRNGStatesTracker()
    torch.manual_seed(7)
    tracker.add("tp-stream", 123)
    a1 = torch.rand(3)
    with tracker.fork("tp-stream"):
        t1 = torch.rand(3)
    a2 = torch.rand(3)
    with tracker.fork("tp-stream"):
        t2 = torch.rand(3)

    default = torch.Generator().manual_seed(7)
    stream = torch.Generator().manual_seed(123)
    assert torch.equal(a1, torch.rand(3, generator=default))
    assert torch.equal(a2, torch.rand(3, generator=default))
    assert torch.equal(t1, torch.rand(3, generator=stream))
    assert torch.equal(t2, torch.rand(3, generator=stream))
    assert "CPU RNG state changed" not in caplog.text  # expected on CPU, so filtered


def test_seeding_is_reproducible(monkeypatch):
    """Same seed -> same default and tensor-parallel streams after a fresh init_runtime."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    _clear_torchrun_env(monkeypatch)
    draws = []
    for _ in range(2):
        init_runtime(device="cpu", seed=11)
        try:
            with get_cuda_rng_tracker().fork():
                tp = torch.rand(4)
            draws.append((torch.rand(4), tp))
        finally:
            shutdown_runtime()
    assert torch.equal(draws[0][0], draws[1][0]) and torch.equal(draws[0][1], draws[1][1])
    assert not torch.equal(draws[0][0], draws[0][1])  # the TP stream is a different stream


def test_tensor_type_reports_cuda_names_only_to_megatron():
    apply_cpu_compat()
    x = torch.zeros(2)
    assert x.type() == "torch.FloatTensor"
    scope = {"__name__": "megatron.core.fake", "x": x}
    exec("name = x.type()", scope)
    assert scope["name"] == "torch.cuda.FloatTensor"
    assert x.type("torch.cuda.DoubleTensor").dtype == torch.float64
    assert x.cuda() is x


# --------------------------------------------------------------------------------------
# A tiny GPTModel trained on CPU, equivalent across layouts
# --------------------------------------------------------------------------------------
def test_gpt_trains_single_process(reference):
    _, ref = reference
    losses = ref["losses"]
    assert len(losses) == STEPS
    assert losses[0] == pytest.approx(torch.log(torch.tensor(float(VOCAB))).item(), abs=0.5)
    assert losses[-1] < losses[0] - 1e-3, losses


def test_gpt_tp2_matches_tp1(reference):
    _check_against_reference(reference, run_distributed(_train, 2, 2, 1, reference[0]))


def test_gpt_pp2_matches_tp1(reference):
    _check_against_reference(reference, run_distributed(_train, 2, 1, 2, reference[0]))


@pytest.mark.slow
def test_gpt_dp2_matches_tp1(reference):
    _check_against_reference(reference, run_distributed(_train, 2, 1, 1, reference[0]))


@pytest.mark.slow
def test_gpt_tp2_pp2_matches_tp1(reference):
    _check_against_reference(reference, run_distributed(_train, 4, 2, 2, reference[0]))


# --------------------------------------------------------------------------------------
# The multi-process helper itself
# --------------------------------------------------------------------------------------
def _echo_or_fail(fail_rank):
    """Every rank joins a gloo group; ``fail_rank`` raises while the others wait in a barrier."""
    rt = init_runtime(device="cpu")
    if rt.rank == fail_rank:
        raise ValueError(f"deliberate failure on rank {rt.rank}")
    torch.distributed.barrier()  # blocks forever if a peer died: the helper must kill us
    t = torch.tensor([float(rt.rank)])
    torch.distributed.all_reduce(t)
    return {"rank": rt.rank, "sum": float(t), "threads": torch.get_num_threads()}


def test_run_distributed_returns_values_and_propagates_errors():
    results = run_distributed(_echo_or_fail, 2, -1, timeout=120)
    assert results == [{"rank": 0, "sum": 1.0, "threads": 1}, {"rank": 1, "sum": 1.0, "threads": 1}]
    with pytest.raises(RuntimeError, match=r"(?s)rank 1 of 2 failed.*ValueError: deliberate failure"):
        run_distributed(_echo_or_fail, 2, 1, timeout=120)


# --------------------------------------------------------------------------------------
# Same code on GPUs (NCCL): skipped on the CPU machines
# --------------------------------------------------------------------------------------
def _gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.gpu
@pytest.mark.skipif(_gpu_count() < 1, reason="needs a CUDA GPU")
def test_gpu_tp1_matches_cpu_reference(reference):
    result = run_distributed(_train, 1, 1, 1, reference[0], False, "cuda")
    assert result[0]["backend"] == "nccl"
    _check_against_reference(reference, result, step1_abs=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(_gpu_count() < 2, reason="needs 2 CUDA GPUs")
def test_gpu_nccl_tp2_and_pp2_match_cpu_reference(reference):
    for tp, pp in ((2, 1), (1, 2)):
        results = run_distributed(_train, 2, tp, pp, reference[0], False, "cuda")
        assert all(r["backend"] == "nccl" for r in results)
        if tp > 1:
            assert all(r["max_connections"] == "1" for r in results)
        _check_against_reference(reference, results, step1_abs=1e-4)


def test_transformers_loads_correctly_after_cpu_patches(tmp_path):
    """from_pretrained builds under ``with torch.device("meta")``; the patched factories must
    not hide their calls from that context (it left RoPE buffers uninitialised once)."""
    import subprocess
    import sys
    script = f"""
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM
cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2)
Qwen2ForCausalLM(cfg).save_pretrained({str(tmp_path)!r})
from megatron_ualm.runtime import init_runtime
init_runtime(device="cpu")
got = Qwen2ForCausalLM.from_pretrained({str(tmp_path)!r}, dtype=torch.float32).model.rotary_emb.inv_freq
want = 1.0 / (cfg.rope_parameters["rope_theta"] ** (torch.arange(0, 8, 2).float() / 8))
assert torch.allclose(got, want), (got, want)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
