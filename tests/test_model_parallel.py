"""Tensor / pipeline / sequence parallel UALMModel give the TP=1 loss and gradients (gloo, CPU).

Every run loads the same full weights (sharded with ``tp_layout``), runs one packed batch
with text, TTA and audio-QA examples through megatron's DDP wrapper and, for PP, megatron's
pipeline schedule, then finalises gradients with megatron's ``finalize_model_grads`` (which
all-reduces the sequence-parallel norm gradients). Gradients are gathered back to full
tensors and compared with the single-process run.
"""
from __future__ import annotations

import pytest
import torch

from dist_utils import run_distributed
from model_batches import make_examples, model_inputs, pack, tiny_model_cfg

pytestmark = pytest.mark.slow  # multi-process (gloo)

BIG_PAD = 4  # full tables are built for TP=4 padding, then cut to each run's padded size


def _full_state(cfg):
    """Deterministic full weights, independent of the parallel layout."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from megatron_ualm.model.audio_encoder import AudioEncoder
    from megatron_ualm.model.hf_adapter import hf_to_ualm, qwen2_config_dict, qwen2_shape
    from megatron_ualm.model.ualm_model import padded_vocab
    torch.manual_seed(11)
    hf = Qwen2ForCausalLM(Qwen2Config(**qwen2_config_dict(cfg)))
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    full = hf_to_ualm(hf.state_dict(), qwen2_shape(hf.config), padded_vocab(cfg, BIG_PAD), init_std=0.05, seed=2)
    torch.manual_seed(12)
    audio = AudioEncoder(cfg.encoder, cfg.hidden_size, init_std=0.05)
    full.update({f"audio_encoder.{k}": v for k, v in audio.state_dict().items()})
    return full


def _batch(vocab, seq_len):
    ex, clips = make_examples(vocab)
    rows = [[ex["qa"], ex["text"]], [ex["tta"], ex["text"]]]
    return pack(None, seq_len, clips, vocab.num_codebooks, rows_of=rows)


# C = 255 makes codebook blocks (and the all-audio block) straddle the TP=2 vocabulary split
SHAPE = dict(codebook_size=255)


def _run(tp: int, pp: int, sp: bool, recompute: str = "none", audio_head: str = "codebook",
         wgrad_fusion: bool = False, fp8: str | None = None, layers: int = 2,
         first_stage_layers: int | None = None) -> dict:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron_ualm.config import ParallelConfig
    from megatron_ualm.model.loss import loss_sums
    from megatron_ualm.model.tp_layout import from_stage, to_stage
    from megatron_ualm.model.transformer_config import transformer_config_from
    from megatron_ualm.model.ualm_model import build_ualm_model
    from megatron_ualm.runtime import init_runtime, shutdown_runtime

    rt = init_runtime(tensor_parallel=tp, pipeline_parallel=pp, device="cpu", seed=7)
    cfg = tiny_model_cfg(recompute=recompute, audio_head=audio_head, num_layers=layers, **SHAPE)
    config = transformer_config_from(cfg, ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp,
                                                         sequence_parallel=sp, first_stage_layers=first_stage_layers),
                                     "fp32", wgrad_fusion=wgrad_fusion, fp8=fp8)
    model = build_ualm_model(cfg, config)
    vocab = model.vocab
    full = _full_state(cfg)
    if tp == 2:
        lo, hi = vocab.codebook_range(1)
        assert lo < vocab.padded_size // 2 < hi, "the test should exercise a straddling block"
    for name in ("embedding.word_embeddings.weight", "head.output_layer.weight"):
        full[name] = full[name][:vocab.padded_size]
    missing, unexpected = model.load_state_dict(to_stage(full, model, rt.tp_rank, rt.tp_size), strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), missing

    ddp = DistributedDataParallel(config=config, ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True),
                                  module=model)
    batch = _batch(vocab, seq_len=48)
    out = {}

    def forward_step(data_iterator, chunk):
        b = next(data_iterator)
        result = chunk(**model_inputs(b))

        def loss_func(losses):
            num, den = loss_sums(losses.ce, b["loss_weights"])
            loss = num / den
            out["loss"] = loss.detach()
            return loss, {"loss": loss.detach()}
        return result, loss_func

    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([batch]), model=[ddp],
                                num_microbatches=1, seq_length=48, micro_batch_size=2, forward_only=False)
    finalize_model_grads([ddp])
    grads = {}
    # weights whose gradient the linear layer accumulated into main_grad itself (kernels/wgrad.py)
    fused = sorted(n for n, p in model.named_parameters() if getattr(p, "grad_added_to_main_grad", False))
    for name, p in model.named_parameters():
        if p.requires_grad:
            grads[name] = p.main_grad.detach().clone()
        else:
            assert name.startswith("audio_encoder.encoder."), name
    grads = from_stage(grads, model)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    shutdown_runtime()
    layer_names = {n.split(".")[2] for n in grads if n.startswith("decoder.layers.")}
    return {"tp_rank": rt.tp_rank, "pp_rank": rt.pp_rank, "loss": out.get("loss"), "grads": grads,
            "decoder_layers": sorted(int(i) for i in layer_names),
            "frozen": frozen, "vocab_size": vocab.size, "fused": fused}


def _assemble(results):
    """Full gradients from all ranks' shards; replicated tensors must agree across TP."""
    from megatron_ualm.model.tp_layout import gather_tensor, split_rule
    by_name: dict[str, dict[int, torch.Tensor]] = {}
    for r in results:
        for name, g in r["grads"].items():
            by_name.setdefault(name, {})[r["tp_rank"]] = g
    full = {}
    for name, shards in by_name.items():
        ordered = [shards[i] for i in sorted(shards)]
        if split_rule(name) is None:
            for s in ordered[1:]:
                torch.testing.assert_close(s, ordered[0], atol=1e-6, rtol=1e-5, msg=f"{name} differs across TP")
            full[name] = ordered[0]
        else:
            full[name] = gather_tensor(name, ordered)
    return full


def _compare(results, baseline):
    loss = [r["loss"] for r in results if r["loss"] is not None]
    assert loss, "no rank reported a loss"
    for value in loss:
        torch.testing.assert_close(value, baseline[0]["loss"], atol=1e-5, rtol=1e-5)
    got, want = _assemble(results), _assemble(baseline)
    assert set(got) == set(want)
    size = baseline[0]["vocab_size"]
    for name in want:
        g, w = got[name], want[name]
        if name in ("embedding.word_embeddings.weight", "head.output_layer.weight"):
            assert torch.count_nonzero(g[size:]) == 0, f"{name}: padding rows got gradient"
            g, w = g[:size], w[:size]
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4, msg=name)
    assert any(torch.count_nonzero(want[n]) for n in want if n.startswith("audio_encoder.adapter"))
    for r in results:  # the encoder (first stage only) is frozen, nothing else is
        assert all(n.startswith("audio_encoder.encoder.") for n in r["frozen"])
        assert bool(r["frozen"]) == (r["pp_rank"] == 0)


@pytest.fixture(scope="module")
def baseline():
    return run_distributed(_run, 1, 1, 1, False)


@pytest.fixture(scope="module")
def baseline_all_audio():
    return run_distributed(_run, 1, 1, 1, False, "none", "all_audio")


def test_weight_gradients_accumulated_in_the_gemm_match(baseline):
    """gradient_accumulation_fusion (kernels/wgrad.py) at TP=1 and TP=2 + SP gives the plain
    bf16-free gradients, and every decoder linear weight went through the fused path."""
    assert not baseline[0]["fused"]
    for results in (run_distributed(_run, 1, 1, 1, False, "none", "codebook", True),
                    run_distributed(_run, 2, 2, 1, True, "none", "codebook", True)):
        _compare(results, baseline)
        for r in results:
            linear = [n for n in r["grads"] if n.startswith("decoder.layers.") and
                      n.endswith(("linear_qkv.weight", "linear_proj.weight", "linear_fc1.weight", "linear_fc2.weight"))]
            assert linear and set(linear) <= set(r["fused"]), sorted(set(linear) - set(r["fused"]))


def test_tensor_parallel_matches_single_process(baseline):
    _compare(run_distributed(_run, 2, 2, 1, False), baseline)


def test_sequence_parallel_matches_single_process(baseline):
    _compare(run_distributed(_run, 2, 2, 1, True), baseline)


def test_all_audio_head_under_tensor_and_sequence_parallel(baseline_all_audio):
    _compare(run_distributed(_run, 2, 2, 1, True, "none", "all_audio"), baseline_all_audio)


def test_pipeline_parallel_matches_single_process(baseline):
    _compare(run_distributed(_run, 2, 1, 2, False, "full"), baseline)


@pytest.mark.slow
def test_uneven_pipeline_stages_match_single_process():
    """parallel.first_stage_layers: 2 of 3 layers on the first stage, 1 (and the head) on the
    last; loss and every gradient equal the single process's, and each stage holds its share."""
    base = run_distributed(_run, 1, 1, 1, False, "none", "codebook", False, None, 3)
    got = run_distributed(_run, 2, 1, 2, False, "none", "codebook", False, None, 3, 2)
    _compare(got, base)
    assert sorted((r["pp_rank"], r["decoder_layers"]) for r in got) == [(0, [0, 1]), (1, [2])]


def test_tp2_pp2_sequence_parallel_matches_single_process(baseline):
    _compare(run_distributed(_run, 4, 2, 2, True, "selective"), baseline)


def test_fp8_tensor_and_sequence_parallel_match_single_process_within_fp8_rounding():
    """FP8 linear layers (emulated on CPU) under TP=2 and TP=2 + SP: the FP8 GEMM does megatron's
    communication (sequence all-gather, input-gradient all-reduce / reduce-scatter). Each rank
    scales its own weight shard and input, so the results are the TP=1 FP8 results up to FP8
    rounding (a missing reduction would be off by the other rank's whole share)."""
    from megatron_ualm.kernels import fp8_cast
    base = run_distributed(_run, 1, 1, 1, False, "none", "codebook", True, "delayed")
    want = _assemble(base)
    e4 = 2.0 ** -(fp8_cast.MANTISSA_BITS[fp8_cast.E4M3] + 1)
    for sp in (False, True):
        results = run_distributed(_run, 2, 2, 1, sp, "none", "codebook", True, "delayed")
        got = _assemble(results)
        losses = [r["loss"] for r in results if r["loss"] is not None]
        assert losses and all(abs(loss - base[0]["loss"]) / base[0]["loss"] < e4 / 8 for loss in losses)
        for r in results:  # every decoder linear weight went through the FP8 GEMM's fused wgrad
            assert any(n.endswith("linear_fc1.weight") for n in r["fused"])
        size = results[0]["vocab_size"]
        for name in want:
            g, w = got[name], want[name]
            if name in ("embedding.word_embeddings.weight", "head.output_layer.weight"):
                g, w = g[:size], w[:size]
            if not torch.count_nonzero(w):
                continue
            rel = ((g - w).norm() / w.norm()).item()
            assert rel < 4 * e4, (sp, name, rel)
