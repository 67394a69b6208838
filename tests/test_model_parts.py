"""HF adapter round trips, TP layout, audio encoder frame counts, KV-cached decoding."""
from __future__ import annotations

import pytest
import torch

from model_batches import WINDOW_SECONDS, make_examples, pack, tiny_model_cfg


@pytest.fixture(scope="module")
def runtime():
    from megatron_ualm.runtime import init_runtime, shutdown_runtime
    rt = init_runtime(device="cpu", seed=5)
    yield rt
    shutdown_runtime()


# --- HF adapter -----------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [True, False])
def test_hf_to_ualm_to_hf_is_bit_exact(tied):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from megatron_ualm.model.hf_adapter import (
        EMBEDDING, HEAD, hf_to_ualm, qwen2_config_dict, qwen2_shape, ualm_tables_from_parts, ualm_to_hf,
    )
    from megatron_ualm.model.ualm_model import padded_vocab
    cfg = tiny_model_cfg()
    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(Qwen2Config(**{**qwen2_config_dict(cfg), "tie_word_embeddings": tied}))
    hf_sd = {k: v.clone() for k, v in hf.state_dict().items()}
    shape = qwen2_shape(hf.config)
    assert shape["rotary_base"] == cfg.rotary_base and shape["kv_channels"] == cfg.kv_channels
    vocab = padded_vocab(cfg, tensor_parallel=2)
    full = hf_to_ualm(hf_sd, shape, vocab, seed=7)
    assert full[EMBEDDING].shape == (vocab.padded_size, cfg.hidden_size)
    assert torch.count_nonzero(full[EMBEDDING][0]) == 0
    assert torch.equal(full[EMBEDDING][256:256 + cfg.text_vocab_size], hf_sd["model.embed_tokens.weight"])
    back, extras = ualm_to_hf(full, shape, vocab)
    expected = dict(hf_sd)
    expected.setdefault("lm_head.weight", hf_sd["model.embed_tokens.weight"])
    assert set(back) == set(expected)
    for k, v in expected.items():
        assert torch.equal(back[k], v), k
    emb, head = ualm_tables_from_parts(back["model.embed_tokens.weight"], back["lm_head.weight"], extras, vocab)
    assert torch.equal(emb[:vocab.size], full[EMBEDDING][:vocab.size])
    assert torch.equal(head[:vocab.size], full[HEAD][:vocab.size])
    # the same seed gives the same new rows
    assert torch.equal(hf_to_ualm(hf_sd, shape, vocab, seed=7)[HEAD], full[HEAD])


def test_qkv_fusion_is_grouped_and_invertible():
    from megatron_ualm.model.hf_adapter import fuse_qkv, split_qkv
    H, G, d = 4, 2, 3
    q = torch.arange(H * d).float()[:, None] + 100
    k = torch.arange(G * d).float()[:, None] + 200
    v = torch.arange(G * d).float()[:, None] + 300
    fused = fuse_qkv(q, k, v, H, G)
    # group 0: q heads 0-1, k0, v0; group 1: q heads 2-3, k1, v1
    expected = torch.cat([q[:6], k[:3], v[:3], q[6:], k[3:], v[3:]])
    assert torch.equal(fused, expected)
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fused, H, G, d), (q, k, v)))


def test_tp_shard_and_gather_are_inverse():
    from megatron_ualm.model.tp_layout import gather_tensor, shard_tensor
    full = torch.arange(8 * 6).reshape(8, 6)
    for name in ("embedding.word_embeddings.weight", "decoder.layers.0.mlp.linear_fc1.weight",
                 "decoder.layers.0.self_attention.linear_proj.weight", "decoder.final_layernorm.weight"):
        shards = [shard_tensor(name, full, r, 2) for r in range(2)]
        assert torch.equal(gather_tensor(name, shards), full)
    fc1 = [shard_tensor("x.linear_fc1.weight", full, r, 2) for r in range(2)]
    assert torch.equal(fc1[0], torch.cat([full[0:2], full[4:6]]))  # [gate_0; up_0]


# --- audio encoder --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["qwen2_5_omni", "whisper"])
def test_encoder_gives_exact_frame_counts(kind):
    from megatron_ualm.audio.frames import num_encoder_frames
    from megatron_ualm.config import EncoderConfig
    from megatron_ualm.model.audio_encoder import AudioEncoder
    enc = AudioEncoder(EncoderConfig(kind=kind, window_seconds=WINDOW_SECONDS), hidden_size=16)
    assert not any(p.requires_grad for p in enc.encoder.parameters())
    enc.train()
    assert not enc.encoder.training and enc.adapter.training
    lengths = [480, 1000, 4800, 4800 + 479, 4800 + 480, 11_123]
    wave = torch.randn(len(lengths), max(lengths)) * 0.1
    out = enc(wave, torch.tensor(lengths))
    assert out.shape == (sum(num_encoder_frames(n, WINDOW_SECONDS) for n in lengths), 16)
    assert out.requires_grad  # through the adapter
    # windows are encoded independently: a clip equals its windows encoded as separate clips
    with torch.no_grad():
        whole = enc(wave[5:6], torch.tensor([11_123]))
        parts = enc(torch.stack([wave[5, :4800], wave[5, 4800:9600], torch.nn.functional.pad(wave[5, 9600:11_123], (0, 3277))]),
                    torch.tensor([4800, 4800, 1523]))
    torch.testing.assert_close(whole, parts, atol=1e-5, rtol=1e-5)


# --- KV cache -------------------------------------------------------------------------------------
def test_kv_cached_decoding_matches_full_recompute(runtime):
    from megatron.core.inference.contexts import StaticInferenceContext
    from megatron_ualm.model.transformer_config import transformer_config_from
    from megatron_ualm.model.ualm_model import UALMModel
    cfg = tiny_model_cfg()
    model = UALMModel(cfg, transformer_config_from(cfg, None, "fp32")).eval()
    ex, clips = make_examples(model.vocab)
    rows = [ex["qa"], ex["tta"]]
    S = max(e.num_rows for e in rows)
    batch = pack(rows, S, clips, model.vocab.num_codebooks)
    audio = {k: batch[k] for k in ("audio_waveforms", "audio_num_samples", "audio_rows")}
    tokens = batch["tokens"]
    pos = torch.arange(S).repeat(2, 1)  # cached decoding numbers positions 0, 1, ... per row
    full0, full_blocks = model.logits(tokens, pos, None, **audio)

    prompt = int(batch["audio_rows"][0, 1] + batch["audio_rows"][0, 2]) + 1  # past the audio span
    ctx = StaticInferenceContext(max_batch_size=2, max_sequence_length=S)
    got0, got_blocks = model.logits(tokens[:, :prompt], pos[:, :prompt], None, inference_context=ctx, **audio)
    ctx.sequence_len_offset += prompt
    ctx.enable_decode_mode()
    steps0, steps_blocks = [got0], [got_blocks]
    for t in range(prompt, S):
        l0, lb = model.logits(tokens[:, t:t + 1], pos[:, t:t + 1], None, inference_context=ctx)
        ctx.sequence_len_offset += 1
        steps0.append(l0)
        steps_blocks.append(lb)
    torch.testing.assert_close(torch.cat(steps0, 1), full0, atol=2e-5, rtol=1e-5)
    last0, last_blocks = model.logits(tokens, pos, None, last_only=True, **audio)
    torch.testing.assert_close(last0, full0[:, -1:], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(last_blocks, full_blocks[:, -1:], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(steps_blocks, 1), full_blocks, atol=2e-5, rtol=1e-5)


# --- optimizer: the frozen encoder has no state ------------------------------------------------
def test_megatron_optimizer_holds_no_encoder_state(runtime):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron_ualm.model.loss import ualm_loss
    from megatron_ualm.model.transformer_config import transformer_config_from
    from megatron_ualm.model.ualm_model import UALMModel
    from model_batches import model_inputs
    cfg = tiny_model_cfg()
    config = transformer_config_from(cfg, None, "fp32")
    model = UALMModel(cfg, config)
    ddp = DistributedDataParallel(config=config, ddp_config=DistributedDataParallelConfig(
        use_distributed_optimizer=True), module=model)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, use_distributed_optimizer=True), [ddp])
    ex, clips = make_examples(model.vocab)
    batch = pack([ex["qa"]], ex["qa"].num_rows, clips, model.vocab.num_codebooks)
    ualm_loss(ddp(**model_inputs(batch)).ce, batch["loss_weights"]).backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert opt.step()[0]
    # Adam state covers exactly the trainable elements (DP=1: one shard holds everything)
    inner = [o.optimizer for o in getattr(opt, "chained_optimizers", [opt])]
    state_elems = sum(v["exp_avg"].numel() for o in inner for v in o.state.values())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert state_elems == trainable < sum(p.numel() for p in model.parameters())
    assert all(p.requires_grad for b in ddp.buffers for p in b.params)
    for n, p in model.named_parameters():
        moved = not torch.equal(before[n], p.detach())
        assert moved == (not n.startswith("audio_encoder.encoder.")), n


# --- bf16 under megatron's Float16Module ---------------------------------------------------------
def test_bf16_float16module_tracks_fp32(runtime):
    from megatron.core.transformer.module import Float16Module
    from megatron_ualm.model.loss import ualm_loss
    from megatron_ualm.model.transformer_config import transformer_config_from
    from megatron_ualm.model.ualm_model import UALMModel
    from model_batches import model_inputs
    cfg = tiny_model_cfg()
    fp32 = UALMModel(cfg, transformer_config_from(cfg, None, "fp32"))
    bf16_config = transformer_config_from(cfg, None, "bf16")
    bf16 = UALMModel(cfg, bf16_config)
    bf16.load_state_dict(fp32.state_dict())
    wrapped = Float16Module(bf16_config, bf16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    ex, clips = make_examples(fp32.vocab)
    batch = pack(list(ex.values()), max(e.num_rows for e in ex.values()), clips, fp32.vocab.num_codebooks)
    inputs = model_inputs(batch)
    tokens, pos = inputs.pop("tokens"), inputs.pop("position_ids")
    with torch.no_grad():
        ref = ualm_loss(fp32(tokens, pos, **inputs).ce, batch["loss_weights"])
    out = wrapped(tokens, pos, **inputs)  # float inputs as keywords: kept float32
    assert out.ce.dtype == torch.float32
    loss = ualm_loss(out.ce, batch["loss_weights"])
    loss.backward()
    torch.testing.assert_close(loss.detach(), ref, atol=0.05, rtol=0.02)
    grads = [p.grad for p in bf16.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g.float()).all() for g in grads)


# --- batch contract -------------------------------------------------------------------------------
def test_validate_batch_accepts_packed_batches_and_names_errors():
    from megatron_ualm.model.batch import BatchError, validate_batch
    from megatron_ualm.model.ualm_model import padded_vocab
    vocab = padded_vocab(tiny_model_cfg(), 1)
    ex, clips = make_examples(vocab)
    batch = pack(None, 64, clips, vocab.num_codebooks, rows_of=[[ex["qa"], ex["text"]], [ex["tta"]]])
    validate_batch(batch, vocab, WINDOW_SECONDS)

    def broken(edit, match):
        bad = {k: v.clone() for k, v in batch.items()}
        edit(bad)
        with pytest.raises(BatchError, match=match):
            validate_batch(bad, vocab, WINDOW_SECONDS)

    row = int(batch["audio_rows"][0, 1])

    def split_span(b):  # a new example starts inside the audio span
        docs = b["document_ids"][0]
        tail = (docs == docs[row]) & (torch.arange(len(docs)) >= row + 4)
        docs[tail] = 9
        b["position_ids"][0, tail] = torch.arange(int(tail.sum()))

    broken(lambda b: b["audio_rows"][0, 2].add_(1), "placeholder rows")
    broken(lambda b: b["tokens"][0, row, 0].fill_(300), "placeholder rows hold")
    broken(lambda b: b["position_ids"][0, 3].fill_(7), "count up")
    broken(lambda b: b["labels"][1, 9, 1].fill_(5), "stream-1")
    broken(lambda b: b["loss_weights"][1, 63, 0].fill_(1.0), "<\\|pad\\|>")  # padding predicts pad
    broken(split_span, "crosses examples")
    broken(lambda b: b.pop("audio_rows"), "lacks")


@pytest.mark.slow
def test_benchmark_runs_tiny_on_cpu(tmp_path):
    import json
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, os.path.join(root, "benchmarks", "train_throughput.py"), "--tiny", "--steps", "1", "--accumulate", "2",
                    "--warmup", "1", "--json", str(out)], check=True, cwd=root, capture_output=True, timeout=300)
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"ualm", "hf"} and all(r["tokens_per_s"] > 0 for r in results.values())


# --- activation recomputation ---------------------------------------------------------------------
@pytest.mark.parametrize("backend,recompute", [("sdpa", "selective"), ("unfused", "selective"), ("sdpa", "full")])
def test_recomputation_gives_the_same_gradients(runtime, backend, recompute):
    from megatron_ualm.model.loss import ualm_loss
    from megatron_ualm.model.transformer_config import transformer_config_from
    from megatron_ualm.model.ualm_model import UALMModel
    from model_batches import model_inputs
    grads = []
    for mode in ("none", recompute):
        cfg = tiny_model_cfg(attention_backend=backend, recompute=mode)
        config = transformer_config_from(cfg, None, "fp32")
        assert config.recompute_granularity == (None if mode == "none" else mode)
        model = UALMModel(cfg, config)
        if grads:
            model.load_state_dict(state)
        state = model.state_dict()
        ex, clips = make_examples(model.vocab)
        batch = pack(None, 64, clips, model.vocab.num_codebooks, rows_of=[[ex["qa"], ex["tta"]]])
        ualm_loss(model(**model_inputs(batch)).ce, batch["loss_weights"]).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5, msg=n)


# --- host-side batch plan ------------------------------------------------------------------------
def test_host_plan_gives_the_same_losses_and_gradients(runtime):
    """The forward with ``batch.host_plan`` (packing, the head's target rows and the clips'
    sizes computed from the CPU batch: no host syncs) equals the forward that derives them
    from the tensors."""
    from megatron_ualm.model.batch import host_plan, is_packed, target_rows
    from megatron_ualm.model.loss import ualm_loss
    from megatron_ualm.model.transformer_config import transformer_config_from
    from megatron_ualm.model.ualm_model import UALMModel
    from model_batches import model_inputs
    cfg = tiny_model_cfg()
    model = UALMModel(cfg, transformer_config_from(cfg, None, "fp32"))
    ex, clips = make_examples(model.vocab)
    batch = pack(None, 64, clips, model.vocab.num_codebooks, rows_of=[[ex["qa"], ex["text"]], [ex["tta"]]])
    plan = host_plan(batch["document_ids"], batch["loss_weights"], batch["audio_num_samples"], batch["audio_rows"])
    assert plan.packed == is_packed(batch["document_ids"]) is True
    assert plan.audio_rows and plan.audio_rows == tuple(tuple(r) for r in batch["audio_rows"].tolist())
    rows, sizes = target_rows(batch["loss_weights"])
    assert torch.equal(plan.head_rows, rows) and list(plan.head_sizes) == sizes
    assert sum(sizes) == int((batch["loss_weights"] > 0).sum()) and all(n > 0 for n in sizes)
    results = []
    for p in (None, plan):
        model.zero_grad()
        out = model(**model_inputs(batch), plan=p)
        ualm_loss(out.ce, batch["loss_weights"]).backward()
        results.append((out.ce.detach(), out.correct, {n: q.grad.clone() for n, q in model.named_parameters()
                                                       if q.grad is not None}))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    for n, g in results[0][2].items():
        assert torch.equal(g, results[1][2][n]), n
