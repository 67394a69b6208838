"""The decoder's CUDA graphs (training/cuda_graphs.py): the same losses, gradients and weights
as the eager decoder over several optimizer steps of accumulated micro-batches; calls of
another shape, evaluation and CPU runs stay eager; the reasons given when graphs are off."""
from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import pytest
import torch

from megatron_ualm.training.cuda_graphs import decoder_graph_blocker

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))


def _config(**overrides):
    base = dict(use_cpu_initialization=False, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                context_parallel_size=1, recompute_granularity=None, hidden_dropout=0.0, attention_dropout=0.0)
    base.update(overrides)
    return SimpleNamespace(**base)


@pytest.mark.parametrize("overrides, expected", [
    (dict(tensor_model_parallel_size=2), "tensor_model_parallel_size=2"),
    (dict(pipeline_model_parallel_size=2), "pipeline_model_parallel_size=2"),
    (dict(recompute_granularity="full"), "activation recomputation (full)"),
    (dict(hidden_dropout=0.1), "dropout"),
    ({}, None),
])
def test_blocker_names_what_keeps_graphs_off(monkeypatch, overrides, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    reason = decoder_graph_blocker(_config(**overrides))
    if expected is None:
        assert reason is None
    else:
        assert reason is not None and reason.startswith(expected), reason


def test_cpu_model_is_not_graphed():
    assert decoder_graph_blocker(_config(use_cpu_initialization=True)) == "no CUDA device"


def _build(shape, seed, graphs: bool):
    """A bf16 UALM wrapped as training runs it (train_throughput.build_ualm) with or without
    the decoder graph; every model of one ``seed`` starts from the same weights."""
    import train_throughput as tt
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)  # megatron initialises the weights from its CUDA RNG tracker
    args = SimpleNamespace(bf16=True, seq_length=256, micro_batch=2, attention_backend="auto", recompute="none",
                           optimizer="megatron", accumulate=3, min_doc=20, max_doc=120, no_cuda_graphs=not graphs)
    model, make_phases = tt.build_ualm(args, shape, torch.device("cuda"))
    return args, model, make_phases


GPU_SHAPE = dict(num_layers=3, hidden_size=128, ffn_hidden_size=256, num_attention_heads=4, num_query_groups=2,
                 kv_channels=32, text_vocab_size=500, num_codebooks=4, codebook_size=32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graphed_training_matches_eager():
    import train_throughput as tt
    from megatron_ualm.runtime import init_runtime, shutdown_runtime

    init_runtime(device="cuda", seed=7)
    try:
        runs = {}
        for graphs in (False, True):
            args, model, make_phases = _build(GPU_SHAPE, 7, graphs)
            init = {n: p.detach().clone() for n, p in model.named_parameters()}
            if graphs:  # the same starting weights, so any difference comes from the graphs
                for n, p in init.items():
                    assert torch.equal(p, runs[False]["init"][n]), n
            batches = [tt.synthetic_ualm_batch(model.vocab, 2, 256, torch.device("cuda"),
                                               torch.Generator().manual_seed(s), 20, 120) for s in range(3)]
            phases = make_phases(batches)
            losses = []
            for step in range(3):  # three optimizer steps of three micro-batches: replays see new weights
                phases.zero_grad()
                for j in range(3):
                    phases.forward(j)
                    losses.append(phases.backward().item())
                grads = {n: p.main_grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
                phases.optimizer()
            runs[graphs] = dict(init=init, losses=losses, grads=grads,
                                weights={n: p.detach().float().clone() for n, p in model.named_parameters()},
                                graph=model.decoder_graph)
            del model, make_phases, phases
        eager, graphed = runs[False], runs[True]
        assert eager["graph"] is None
        g = graphed["graph"]
        assert g is not None and g.captures == 1 and g.replays == 9
        torch.testing.assert_close(torch.tensor(graphed["losses"]), torch.tensor(eager["losses"]), rtol=1e-4, atol=1e-5)
        for n in eager["grads"]:
            torch.testing.assert_close(graphed["grads"][n], eager["grads"][n], rtol=1e-3, atol=1e-6, msg=n)
        for n in eager["weights"]:
            torch.testing.assert_close(graphed["weights"][n], eager["weights"][n], rtol=1e-3, atol=1e-5, msg=n)
    finally:
        shutdown_runtime()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_other_shapes_and_evaluation_run_eagerly():
    import train_throughput as tt
    from megatron_ualm.model.loss import ualm_loss
    from megatron_ualm.runtime import init_runtime, shutdown_runtime

    init_runtime(device="cuda", seed=8)
    try:
        _, model, make_phases = _build(GPU_SHAPE, 8, True)
        dev = torch.device("cuda")
        big = tt.synthetic_ualm_batch(model.vocab, 2, 256, dev, torch.Generator().manual_seed(0), 20, 120)
        small = tt.synthetic_ualm_batch(model.vocab, 1, 128, dev, torch.Generator().manual_seed(1), 20, 120)
        phases = make_phases([big])
        phases.zero_grad()
        phases.forward(0)
        phases.backward()
        graph = model.decoder_graph
        assert graph.captures == 1 and graph.replays == 1

        def loss_of(b, grad: bool):
            with torch.set_grad_enabled(grad):
                out = model(b["tokens"], b["position_ids"], b["document_ids"], labels=b["labels"],
                            loss_weights=b["loss_weights"], plan=b["plan"])
                return ualm_loss(out.ce, b["loss_weights"])

        eager_small = loss_of(small, True)     # another shape: eager, with gradients
        eager_small.backward()
        assert graph.replays == 1 and graph.captures == 1
        no_grad_big = loss_of(big, False)      # evaluation: eager
        assert graph.replays == 1
        again = loss_of(big, True)             # the captured shape again: a replay, same loss
        assert graph.replays == 2
        torch.testing.assert_close(again.detach(), no_grad_big, rtol=1e-4, atol=1e-5)
        again.backward()
        graph.reset()                          # capture anew, now for the small shape
        small_graphed = loss_of(small, True)
        assert graph.captures == 2 and graph.replays == 3
        torch.testing.assert_close(small_graphed.detach(), eager_small.detach(), rtol=1e-4, atol=1e-5)
        small_graphed.backward()
        first, second = loss_of(small, True), loss_of(small, True)  # two forwards, then the first's backward
        with pytest.raises(RuntimeError, match="overwritten the activations"):
            first.backward()
        second.backward()
    finally:
        shutdown_runtime()


def test_segmented_pass_gives_the_decoders_gradients_on_cpu():
    """The computation the graphs capture (layer by layer, gradients through parameter views,
    unfused gradients added into main_grad, fused ones by the GEMM) against the plain eager
    backward of the decoder with DDP's hooks: same input gradient, same main_grad for every
    decoder parameter. Runs on CPU (no capture), so CI checks the graphs' gradient plumbing."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron_ualm.kernels import wgrad as wgrad_fusion
    from megatron_ualm.model.transformer_config import transformer_config_from
    from megatron_ualm.model.ualm_model import UALMModel
    from megatron_ualm.runtime import init_runtime, shutdown_runtime
    from megatron_ualm.training.cuda_graphs import DecoderGraph
    from model_batches import tiny_model_cfg

    init_runtime(device="cpu", seed=11)
    try:
        wgrad_fusion.install()
        cfg = tiny_model_cfg(num_layers=3, encoder=tiny_model_cfg().encoder.__class__(kind="none"))
        config = transformer_config_from(cfg, None, "fp32", use_cpu_initialization=True, wgrad_fusion=True)
        model = UALMModel(cfg, config)
        ddp = DistributedDataParallel(config=config, ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=True), module=model)
        graph = DecoderGraph(model.decoder, model.mask_cache, ddp)
        assert graph.num_fused == 4 * 3 and len(graph.segments) == 3
        assert graph.segments[-1].final_norm is not None

        g = torch.Generator().manual_seed(0)
        S, B, H = 24, 2, cfg.hidden_size
        hidden = torch.randn(S, B, H, generator=g).requires_grad_(True)
        docs = torch.tensor([[0] * 10 + [1] * 14, [0] * 24], dtype=torch.int32)
        pos = torch.cat([torch.arange(10), torch.arange(14)]).repeat(2, 1)
        pos[1] = torch.arange(24)
        rotary = model.rotary(pos)
        grad_out = torch.randn(S, B, H, generator=g)

        ddp.zero_grad_buffer()
        model.decoder(hidden_states=hidden, attention_mask=docs, rotary_pos_emb=rotary).backward(grad_out)
        eager = {n: p.main_grad.clone() for n, p in model.decoder.named_parameters()}
        eager_in = hidden.grad.clone()

        ddp.zero_grad_buffer()
        got_in = graph.segmented_pass(hidden.detach(), docs, rotary, lambda out: grad_out)
        torch.testing.assert_close(got_in, eager_in, rtol=1e-5, atol=1e-6)
        for n, p in model.decoder.named_parameters():
            assert p.grad is None, n  # nothing through DDP's hooks
            assert p.main_grad.abs().sum() > 0, n
            torch.testing.assert_close(p.main_grad, eager[n], rtol=1e-5, atol=1e-6, msg=n)
        # the modules hold their parameters again
        assert all(isinstance(p, torch.nn.Parameter) for p in model.decoder.parameters())
        assert len(list(model.decoder.parameters())) == len(eager)

        # what the capture's warm-up disturbs is put back: accumulated gradients exactly ...
        saved = graph._save_main_grads()
        assert saved is not None
        for p in graph.params:
            p.main_grad.add_(1.0)
        graph._restore_main_grads(saved)
        for n, p in model.decoder.named_parameters():
            torch.testing.assert_close(p.main_grad, eager[n], rtol=1e-5, atol=1e-6, msg=n)
        # ... and all-zero buffers (a step's first micro-batch) without a host copy
        ddp.zero_grad_buffer()
        assert graph._save_main_grads() is None
        for p in graph.params:
            p.main_grad.add_(1.0)
        graph._restore_main_grads(None)
        assert all(not p.main_grad.any() for p in graph.params)
    finally:
        shutdown_runtime()
