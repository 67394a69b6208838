"""The memory budget against the real model: parameter counts per rank (TP=1 in process, TP=2
with SP over two CPU processes) and the bytes a decoder block keeps for backward; the CLI."""
from __future__ import annotations

import os

import pytest
import torch

from dist_utils import run_distributed
from model_batches import tiny_model_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = {"embedding.": "embedding", "audio_encoder.encoder.": "encoder_frozen",
         "audio_encoder.adapter.": "encoder_trainable", "decoder.": "decoder", "head.": "head"}


@pytest.fixture(scope="module")
def runtime():
    from megatron_ualm.runtime import init_runtime, shutdown_runtime
    rt = init_runtime(device="cpu", seed=5)
    yield rt
    shutdown_runtime()


def _model_cfg(**overrides):
    # ffn not a multiple of hidden, kv_channels != hidden / heads: every width term is distinct
    return tiny_model_cfg(hidden_size=64, ffn_hidden_size=160, num_attention_heads=4, num_query_groups=2,
                          kv_channels=24, **overrides)


def _counts_by_part(model) -> dict:
    out = dict.fromkeys(PARTS.values(), 0)
    for name, p in model.named_parameters():
        part = next(v for k, v in PARTS.items() if name.startswith(k))
        out[part] += p.numel()
    return out


def _use_gpu_kernel_paths(setattr_) -> None:
    """Route RMSNorm, SwiGLU and RoPE through the autograd Functions the GPU runs (which keep
    what the Triton kernels need: norm input + 1/rms, fc1's output, nothing for RoPE), with
    the kernels replaced by the same math in PyTorch, so that a CPU forward saves what a GPU
    forward saves. (On CPU the model otherwise runs the eager functions, which keep float32
    intermediates the GPU never stores.)"""
    from megatron.core.models.common.embeddings import rope_utils
    from megatron_ualm.kernels import rmsnorm, rope, swiglu
    from megatron_ualm.model import layer_spec, norm

    def rms_forward(x, w, eps):
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1) + eps)
        return w * (x32 * rstd[..., None]).to(x.dtype), rstd.reshape(-1)

    setattr_(rmsnorm, "rms_norm_forward", rms_forward)
    setattr_(norm, "fused_rms_norm", lambda x, w, eps: rmsnorm._RMSNormFunction.apply(x, w, eps))
    setattr_(swiglu, "swiglu_forward", swiglu.swiglu_reference)
    setattr_(layer_spec, "fused_swiglu", lambda y: swiglu._SwiGLU.apply(y))
    setattr_(rope, "_launch", lambda t, freqs, backward, num_warps=4, check=True: rope.rotate(t, freqs))
    setattr_(rope_utils, "_apply_rotary_pos_emb_bshd",
             lambda t, freqs, rotary_interleaved=False, mscale=1.0, **flags: rope._RoPE.apply(t, freqs))


def _saved_by_decoder(model, seq: int, batch: int, tp: int = 1, sp: bool = False) -> int:
    """Bytes the decoder block's forward keeps for backward: saved tensors deduplicated by
    storage (a view keeps its whole storage alive), parameters and the rotary angles (shared
    by all layers, made once per forward) left out."""
    h = model.config.hidden_size
    rows = seq // tp if sp else seq
    x = torch.randn(rows, batch, h, dtype=torch.bfloat16, requires_grad=True)
    rotary = model._rotary(torch.arange(seq)[None].expand(batch, seq), None)
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()} | {rotary.untyped_storage().data_ptr()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model.decoder(hidden_states=x, attention_mask=None, rotary_pos_emb=rotary)
    assert out.requires_grad
    return sum(saved.values())


def _expected_block_bytes(m, tp, sp, recompute, seq, batch) -> int:
    from megatron_ualm.training import memory_budget as mb
    T = seq * batch
    return (m.num_layers * mb.layer_activation_bytes(m, tp, sp, recompute, T, batch)
            + mb.final_norm_bytes(m, tp, sp, T))


# --- parameters -----------------------------------------------------------------------------------
def test_parameter_counts_equal_the_built_model(runtime):
    from megatron_ualm.model.transformer_config import transformer_config_from
    from megatron_ualm.model.ualm_model import UALMModel
    from megatron_ualm.training import memory_budget as mb
    for cfg in (_model_cfg(), _model_cfg(qkv_bias=False, audio_head="all_audio")):
        model = UALMModel(cfg, transformer_config_from(cfg, None, "bf16"))
        assert mb.stage_params(cfg, 1, 1, 0) == _counts_by_part(model)
    # pipeline stages split them: stage 0 has no head, the last no embedding or encoder
    first, last = mb.stage_params(cfg, 1, 2, 0), mb.stage_params(cfg, 1, 2, 1)
    whole = mb.stage_params(cfg, 1, 1, 0)
    assert first["head"] == last["embedding"] == last["encoder_frozen"] == 0
    assert {k: first[k] + last[k] for k in whole} == whole


def test_pipeline_first_stage_holds_one_micro_batch_per_stage():
    from megatron_ualm.config import load_config
    from megatron_ualm.training import memory_budget as mb
    tiny = os.path.join(ROOT, "examples", "tiny.yaml")
    cfg = load_config(tiny, ["model.num_layers=4", "parallel.pipeline_parallel=2", "training.global_batch_size=8"])
    b = mb.memory_budget(cfg, 2, 80 * mb.GiB)
    m, T = cfg.model, cfg.training.micro_batch_size * cfg.data.seq_length
    layer = mb.layer_activation_bytes(m, 1, False, m.recompute, T, cfg.training.micro_batch_size, 4)  # fp32 run
    assert [s.in_flight for s in b.stages] == [2, 1]
    assert [s.terms["activations"] for s in b.stages] == [2 * 2 * layer, 2 * layer]
    assert b.stages[0].terms["head"] == 0 < b.stages[1].terms["head"]
    # one micro-batch per step: nothing else can be in flight
    one = mb.memory_budget(load_config(tiny, ["model.num_layers=4", "parallel.pipeline_parallel=2",
                                              "training.global_batch_size=2"]), 2, 80 * mb.GiB)
    assert [s.in_flight for s in one.stages] == [1, 1]


# --- activations ----------------------------------------------------------------------------------
@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_activation_bytes_equal_what_the_decoder_saves(runtime, monkeypatch, recompute):
    from megatron_ualm.config import EncoderConfig
    from megatron_ualm.model.transformer_config import transformer_config_from
    from megatron_ualm.model.ualm_model import UALMModel
    from megatron_ualm.training import memory_budget as mb
    _use_gpu_kernel_paths(monkeypatch.setattr)
    cfg = _model_cfg(recompute=recompute, encoder=EncoderConfig(kind="none"))
    model = UALMModel(cfg, transformer_config_from(cfg, None, "bf16"))
    model.train()
    seq, batch = 32, 2
    assert _saved_by_decoder(model, seq, batch) == _expected_block_bytes(cfg, 1, False, recompute, seq, batch)
    if recompute == "full":  # each layer holds its input only
        assert mb.layer_activation_terms(cfg, 1, False, "full", seq * batch, batch) == {
            "layer_input": 2 * seq * batch * cfg.hidden_size}


def _tp2_sp_counts(recompute):
    from megatron_ualm.config import EncoderConfig
    from megatron_ualm.model.transformer_config import transformer_config_from
    from megatron_ualm.model.ualm_model import UALMModel
    from megatron_ualm.runtime import init_runtime, shutdown_runtime
    from megatron_ualm.config import ParallelConfig
    init_runtime(tensor_parallel=2, device="cpu", seed=3)
    _use_gpu_kernel_paths(setattr)
    cfg = _model_cfg(recompute=recompute)
    model = UALMModel(cfg, transformer_config_from(cfg, ParallelConfig(tensor_parallel=2, sequence_parallel=True), "bf16"))
    model.train()
    params = _counts_by_part(model)
    cfg_no_encoder = _model_cfg(recompute=recompute, encoder=EncoderConfig(kind="none"))
    saved = _saved_by_decoder(model, 32, 2, tp=2, sp=True)
    shutdown_runtime()
    return params, saved, cfg_no_encoder


@pytest.mark.slow
def test_tensor_parallel_shards_equal_the_built_model():
    from megatron_ualm.training import memory_budget as mb
    for params, saved, cfg in run_distributed(_tp2_sp_counts, 2, "none", timeout=240):
        assert params == mb.stage_params(_model_cfg(), 2, 1, 0)
        assert saved == _expected_block_bytes(cfg, 2, True, "none", 32, 2)


# --- CLI -------------------------------------------------------------------------------------------
def _cli(capsys, *argv):
    from megatron_ualm.memory_budget import main
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_says_whether_the_layout_fits(capsys):
    tiny = os.path.join(ROOT, "examples", "tiny.yaml")
    rc, out, _ = _cli(capsys, tiny, "--gpus", "1", "--gpu-gib", "80")
    assert rc == 0 and "FITS: worst rank (stage 0)" in out and "margin +" in out
    rc, out, _ = _cli(capsys, tiny, "--gpus", "1", "--gpu-gib", "2")  # less than the reserve
    assert rc == 1 and "DOES NOT FIT" in out and "margin -" in out
    # the breakdown adds up to the verdict's figure
    from megatron_ualm.config import load_config
    from megatron_ualm.training import memory_budget as mb
    budget = mb.memory_budget(load_config(tiny), 1, 80 * mb.GiB)
    assert f"{budget.worst.total / mb.GiB:.2f} GiB" in out


@pytest.mark.parametrize("args,words", [
    (["model.num_layerz=3"], "model.num_layerz"),
    (["parallel.tensor_parallel=3"], "parallel.tensor_parallel"),
    (["parallel.virtual_pipeline_parallel=2", "parallel.pipeline_parallel=2"], "virtual_pipeline_parallel"),
    (["--gpus", "0"], "--gpus"),
])
def test_cli_bad_input_is_one_line(capsys, args, words):
    rc, out, err = _cli(capsys, os.path.join(ROOT, "examples", "tiny.yaml"), *args)
    assert rc == 2 and out == "" and err.startswith("error: ") and words in err
    assert len(err.strip().splitlines()) == 1


def test_cli_search_lists_7b_layouts_for_8_h100(capsys):
    rc, out, _ = _cli(capsys, os.path.join(ROOT, "examples", "qwen2.5-7b.yaml"), "--gpus", "8", "--gpu-gib", "80",
                      "--search")
    assert rc == 0
    rows = [line for line in out.splitlines() if line.startswith("TP=")]
    assert len(rows) > 5 and "TP=4+SP PP=1 DP=2 recompute=selective" in out
    # ordered by model-parallel ranks: TP=1 first, the 8-way layouts last
    first_tp = [int(r.split()[0].split("=")[1].split("+")[0]) for r in rows]
    assert first_tp[0] == 1 and all(float(r.split()[-1]) >= 0 for r in rows)


def test_fp8_weight_copies_equal_what_the_fp8_layers_hold(runtime):
    """``training.fp8``: the budget's fp8_weights term equals the bytes of the FP8 weight copies
    (forward operand and transpose) the model's layers keep after a forward."""
    from megatron_ualm.config import EncoderConfig, UALMConfig
    from megatron_ualm.model import fp8
    from megatron_ualm.model.transformer_config import transformer_config_from
    from megatron_ualm.model.ualm_model import UALMModel
    from megatron_ualm.training.memory_budget import memory_budget
    m = _model_cfg(encoder=EncoderConfig(kind="none"))
    model = UALMModel(m, transformer_config_from(m, None, "bf16", use_cpu_initialization=True, fp8="delayed"))
    model.decoder(torch.randn(16, 1, m.hidden_size, dtype=torch.bfloat16), None,
                  rotary_pos_emb=model._rotary(torch.arange(16)[None], None))
    held = sum(layer.fp8_weight.w8.nbytes + layer.fp8_weight.w8t.nbytes for layer in fp8.fp8_layers(model.decoder))
    assert held > 0
    cfg = UALMConfig()
    cfg.model, cfg.training.fp8 = m, True
    cfg.training.global_batch_size, cfg.data.seq_length = cfg.training.micro_batch_size, 64
    assert memory_budget(cfg, 1, 80 << 30).stages[0].terms["fp8_weights"] == held
    cfg.training.fp8 = False
    assert memory_budget(cfg, 1, 80 << 30).stages[0].terms["fp8_weights"] == 0


def test_uneven_pipeline_stages_are_counted_per_stage():
    from megatron_ualm.config import UALMConfig
    from megatron_ualm.training.memory_budget import memory_budget
    cfg = UALMConfig()
    cfg.model = _model_cfg(num_layers=4)
    cfg.data.seq_length, cfg.training.micro_batch_size, cfg.training.global_batch_size = 64, 1, 4
    cfg.parallel.pipeline_parallel = 2
    even = memory_budget(cfg, 2, 80 << 30).stages
    cfg.parallel.first_stage_layers = 3
    uneven = memory_budget(cfg, 2, 80 << 30).stages
    # a layer's activations and trainable parameters move from stage 1 to stage 0
    layer_act = even[0].terms["activations"] // (2 * 2)  # 2 layers x 2 micro-batches in flight
    assert uneven[0].terms["activations"] == 3 * 2 * layer_act and uneven[1].terms["activations"] == layer_act
    assert uneven[0].terms["grad_buffer"] - even[0].terms["grad_buffer"] == \
        even[1].terms["grad_buffer"] - uneven[1].terms["grad_buffer"] > 0


def test_the_shipped_7b_layout_fits_8_h100_with_room(capsys):
    """examples/qwen2.5-7b.yaml (DP=4 x PP=2 with 15 + 13 layers, no recomputation) fits 8 x 80 GB with a margin
    that survives the budget's measured error (0.2 GiB at the 7B width, benchmarks/NOTES.md);
    DP=8 without recomputation would not leave that room."""
    path = os.path.join(ROOT, "examples", "qwen2.5-7b.yaml")
    rc, out, _ = _cli(capsys, path, "--gpus", "8", "--gpu-gib", "79.6")
    assert rc == 0 and "PP=2(15 first) DP=4 recompute=none" in out
    margin = float(out.split("margin ")[1].split()[0])
    assert margin > 15
    rc, out, _ = _cli(capsys, path, "parallel.pipeline_parallel=1", "parallel.first_stage_layers=null", "--gpus", "8",
                      "--gpu-gib", "79.6")
    assert float(out.split("margin ")[1].split()[0]) < 2
