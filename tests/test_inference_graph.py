"""The "graph" decode backend (``inference/graph.py``) against the no-cache reference and
megatron's KV cache: same tokens, same per-step logits, left padding, guidance, reuse of
its static buffers across batches. CPU runs the step eagerly; the GPU test checks that the
CUDA graph replay gives the eager step's logits and the "cached" backend's tokens."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from model_batches import tiny_model_cfg
from test_inference import assert_same, generate, mixed_prompts, prompt_from, settings
from test_inference import model  # noqa: F401  (the tiny model fixture)


def text_prompts(vocab, texts):
    return [prompt_from(t, vocab, "text", seed=i + 1) for i, t in enumerate(texts)]


def drive(backend, model, prompts, steps: int, guided: bool = False, seed: int = 0):
    """Per-step logits of ``backend`` (a BACKENDS class) over the engine's batch layout,
    feeding the same random rows to every backend: [(stream0 [R, V], streams [R, K-1, W])]."""
    from megatron_ualm.inference.forward import left_pad_layout
    lengths = [p.rows.shape[0] for p in prompts]
    B, N, K = len(prompts), max(lengths), model.vocab.num_codebooks
    R, L = (2 * B if guided else B), N + steps
    docs, positions, pads = left_pad_layout(lengths, L, R, "cpu")
    tokens = torch.zeros(R, L, K, dtype=torch.long)
    for b, p in enumerate(prompts):
        tokens[b, pads[b]:N] = torch.from_numpy(p.rows)
    masked = N != min(lengths)
    forward = backend(model, R, L)
    out = [forward(tokens, docs, positions, 0, N, None, masked)]
    g = torch.Generator().manual_seed(seed)
    for cur in range(N, L - 1):
        tokens[:, cur] = torch.randint(1, model.vocab.size, (R, K), generator=g)
        out.append(forward(tokens, docs, positions, cur, cur + 1, None, masked))
    return out


def assert_logits_close(got, want, atol=1e-4):
    assert len(got) == len(want)
    for (a0, a1), (b0, b1) in zip(got, want):
        torch.testing.assert_close(a0, b0, atol=atol, rtol=1e-4)
        torch.testing.assert_close(a1, b1, atol=atol, rtol=1e-4)


# --- tokens ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("texts", [("what is two and two", "hi", "a longer question here"),
                                   ("same", "size")])  # left-padded / all of one length
def test_text_tokens_equal_full_and_cached(model, temperature, texts):
    prompts = text_prompts(model.vocab, texts)
    st = settings(text_temperature=temperature, text_top_k=40, text_top_p=0.9)
    graph = generate(model, prompts, st, backend="graph")
    assert all(len(g.rows) > 1 for g in graph)
    assert_same(graph, generate(model, prompts, st, backend="full"))
    assert_same(graph, generate(model, prompts, st, backend="cached"))


def test_guided_audio_tokens_equal_full_and_cached(model):
    prompts = mixed_prompts(model.vocab)
    st = settings(guidance_scale=3.0)
    graph = generate(model, prompts, st, backend="graph")
    assert any(s.modality != "text" for g in graph for s in g.segments)
    assert_same(graph, generate(model, prompts, st, backend="full"))
    assert_same(graph, generate(model, prompts, st, backend="cached"))
    # cond and uncond as two graph backends alive at once (two sets of static buffers)
    assert_same(graph, generate(model, prompts, st, backend="graph", split_guidance=True))


def test_left_padded_batch_equals_each_request_alone(model):
    prompts = mixed_prompts(model.vocab)
    st = settings()
    batched = generate(model, prompts, st, backend="graph")
    for p, g in zip(prompts, batched):
        assert_same([generate(model, [p], st, backend="graph")[0]], [g])


# --- logits ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("guided", [False, True])
def test_step_logits_match_the_reference(model, guided):
    from megatron_ualm.inference.forward import CachedForward, FullForward
    from megatron_ualm.inference.graph import GraphForward
    prompts = mixed_prompts(model.vocab)
    want = drive(FullForward, model, prompts, 12, guided)
    assert_logits_close(drive(GraphForward, model, prompts, 12, guided), want)
    assert_logits_close(drive(CachedForward, model, prompts, 12, guided), want)
    # the same static buffers again, now holding the previous batch's keys: still masked away
    short = text_prompts(model.vocab, ("x", "yz"))
    assert_logits_close(drive(GraphForward, model, short, 20, guided, seed=1),
                        drive(FullForward, model, short, 20, guided, seed=1))


def test_static_buffers_are_reused_only_when_idle(model):
    from megatron_ualm.inference.graph import GraphForward
    a = GraphForward(model, 3, 40)
    kept = a.static
    del a
    b = GraphForward(model, 3, 100)  # the same 128-slot cache
    assert b.static is kept and b.static.cache[0][0].shape[2] == 128
    c = GraphForward(model, 3, 100)
    assert c.static is not kept
    with pytest.raises(ValueError, match="cache holds 0"):
        c(None, None, None, 5, 6)


def test_default_backend_is_graph_on_one_stage_only(model):
    from megatron_ualm.inference.engine import Engine
    from megatron_ualm.inference.forward import default_backend
    assert Engine(model).backend == "graph"

    def fake(tp=1, pp=1, sp=False, last=True):
        cfg = SimpleNamespace(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, sequence_parallel=sp)
        return SimpleNamespace(config=cfg, pre_process=True, post_process=last)
    assert default_backend(fake()) == "graph"
    others = ({"tp": 2}, {"pp": 2}, {"sp": True}, {"last": False})
    assert [default_backend(fake(**kw)) for kw in others] == ["cached"] * 4


# --- GPU ------------------------------------------------------------------------------------------
def _graph_on_gpu():
    """Tiny bf16 model on CUDA: the graph replay vs the eager step, and tokens vs "cached"."""
    from megatron_ualm.config import EncoderConfig
    from megatron_ualm.inference.graph import GraphForward
    from megatron_ualm.model.transformer_config import transformer_config_from
    from megatron_ualm.model.ualm_model import UALMModel
    from megatron_ualm.runtime import init_runtime
    init_runtime(device="cuda", seed=3)
    cfg = tiny_model_cfg(init_method_std=0.3, encoder=EncoderConfig(kind="none"))
    model = UALMModel(cfg, transformer_config_from(cfg, None, "bf16")).cuda().eval()
    # the token comparison with "cached" (other attention kernels) runs in fp32, where two
    # code paths cannot flip a greedy choice through rounding as bf16 can on a near-tie
    model32 = UALMModel(cfg, transformer_config_from(cfg, None, "fp32")).cuda().eval()
    model32.load_state_dict({k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v
                             for k, v in model.state_dict().items()})
    prompts = mixed_prompts(model.vocab)

    class Probe(GraphForward):
        """Each decode step twice: replayed (the backend's answer), then eagerly on the same
        buffers (it writes the same keys and values again)."""
        steps = []

        def __call__(self, *args, **kw):
            got = super().__call__(*args, **kw)
            if args[3] > 0:
                assert self.static.graph is not None, "no CUDA graph was captured"
                Probe.steps.append((got, self._decode_step()))
            return got

    from megatron_ualm.inference import engine as E
    E.BACKENDS["probe"] = Probe
    same = lambda x, y: x.rows.shape == y.rows.shape and bool((x.rows == y.rows).all())  # noqa: E731
    result = {"worst": 0.0, "steps": 0, "same": []}
    # greedy everywhere: bf16 logits of two code paths differ in the last bits, which could
    # flip a sampled token but not a clear argmax
    for st in (settings(audio_temperature=0.0), settings(audio_temperature=0.0, guidance_scale=3.0)):
        Probe.steps.clear()
        probed = generate(model, prompts, st, backend="probe")
        graph = generate(model, prompts, st, backend="graph")
        for replayed, eager in Probe.steps:
            for a, b in zip(replayed, eager):
                finite = torch.isfinite(b)
                assert torch.equal(finite, torch.isfinite(a))
                result["worst"] = max(result["worst"], (a[finite] - b[finite]).abs().max().item())
        result["steps"] += len(Probe.steps)
        graph32 = generate(model32, prompts, st, backend="graph")
        cached32 = generate(model32, prompts, st, backend="cached")
        result["same"].append([same(x, y) for x, y in zip(graph, probed)] +
                              [same(x, y) for x, y in zip(graph32, cached32)])
    return result


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replay_equals_eager_step_and_cached_tokens():
    from dist_utils import run_distributed
    (r,) = run_distributed(_graph_on_gpu, 1, timeout=600)
    assert r["steps"] > 10
    assert r["worst"] <= 1e-2, r  # the same kernels on the same buffers
    assert all(all(s) for s in r["same"]), r
