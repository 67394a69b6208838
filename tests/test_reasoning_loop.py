"""Reasoning inference loop on a tiny random UALM (CPU): the model hears its own clips.

A test hook forces the structure of the answer (text plan, clip, listen, text critique,
clip, ...: modality and END rows, 3 text tokens per part); every content row is chosen
greedily by the model. Asserted: the KV-cached loop (appended rows prefilled into the cache)
equals a reference that re-runs the whole sequence, appended clips and their encoder frames
included, at every step; two requests that hear their clips at different steps answer
batched as they do alone; a single training forward over the final sequence picks every
content row greedily; the appended rows are exactly the training layout of the same parts
(``templates.build_segments``); ``max_rounds`` bounds the loop; the clips are written.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from model_batches import tiny_model_cfg

from megatron_ualm.formats import templates as T
from megatron_ualm.formats import vocab as V
from megatron_ualm.inference import engine as engine_module
from megatron_ualm.inference.state import MASK_TEXT, RowSpec, RowState

FRAMES = 8          # codec frames per clip: 8 * 320 samples -> 4 encoder rows
TEXT_TOKENS = (3, 5)  # text tokens per text part of the first / second request


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from megatron_ualm.audio.codec import Codec, save_tiny_codec
    from megatron_ualm.model.transformer_config import transformer_config_from
    from megatron_ualm.model.ualm_model import UALMModel
    from megatron_ualm.runtime import init_runtime, shutdown_runtime
    init_runtime(device="cpu", seed=5)
    cfg = tiny_model_cfg(init_method_std=0.3)  # peaked logits: greedy choices are far from ties
    model = UALMModel(cfg, transformer_config_from(cfg, None, "fp32")).eval()
    root = tmp_path_factory.mktemp("reasoning")
    codec = Codec(save_tiny_codec(str(root / "codec"), cfg.num_codebooks, cfg.codebook_size))
    yield model, codec, root
    shutdown_runtime()


def tokenize(text: str) -> list[int]:
    return [32 + (ord(c) % 200) for c in text]


def decode(ids) -> str:
    return "".join(chr(97 + (int(i) % 26)) for i in ids)


def forced_state(final_end: int, eos_after: int = 0):
    """A RowState that forces text, audio, text, audio, ... parts, TEXT_TOKENS[i % 2] text
    tokens for the i-th request state made, and <|eot|> after each part; after clip
    ``eos_after`` (if > 0) it ends with <|eos|>. The content rows stay the model's greedy
    choice. Two requests of different text lengths hear their clips at different steps, so
    a batch of them has holes beside the appended rows."""
    made = []

    class Forced(RowState):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            self.text_tokens = TEXT_TOKENS[len(made) % len(TEXT_TOKENS)]
            made.append(self)

        def spec(self):
            pad_rest = [V.PAD] * (self.K - 1)
            if self.phase == "modality":
                return RowSpec(None, V.TEXT if len(self.segments) % 2 == 0 else V.AUDIO, pad_rest, False)
            if self.phase == "text" and len(self.segments[-1].ids) >= self.text_tokens:
                return RowSpec(None, V.EOT, pad_rest, False)
            if self.phase == "end" and self._end_token is None:
                clips = sum(s.modality != "text" for s in self.segments)
                return RowSpec(None, final_end if clips == eos_after else V.EOT, pad_rest, True)
            return super().spec()

    return Forced


def make_engine(model, backend):
    e = engine_module.Engine(model, backend=backend)
    e.stream0_masks[MASK_TEXT, :len(V.SPECIAL_TOKENS)] = False  # text parts hold text ids only
    return e


def settings(**kw):
    from megatron_ualm.inference.sampling import GenerationSettings
    base = dict(max_new_rows=200, guidance_scale=1.0, audio_temperature=0.0, min_audio_frames=FRAMES,
                max_audio_seconds=FRAMES / 50, max_rounds=3, batch_size=4)
    return GenerationSettings(**{**base, **kw})


def prompts(vocab, texts=("make a calm rain sound", "birds")):
    from megatron_ualm.inference.prompts import build_prompt
    return [build_prompt({"prompt": t, "mode": "reasoning"}, vocab, tokenize, seed=i) for i, t in enumerate(texts)]


def run(model, codec, backend, monkeypatch, st, eos_after=0):
    monkeypatch.setattr(engine_module, "RowState", forced_state(V.EOS, eos_after))
    ps = prompts(model.vocab)
    return ps, make_engine(model, backend).generate(ps, st, codec)


def clips_of(gen):
    return [s for s in gen.segments if s.modality != "text"]


# --- the loop against a full recompute -------------------------------------------------------
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_cached_loop_equals_full_recompute(setup, monkeypatch, guidance):
    """guidance 3: the unconditional twin runs beside the request, the heard clip included."""
    model, codec, _ = setup
    st = settings(guidance_scale=guidance)
    ps, cached = run(model, codec, "graph", monkeypatch, st)
    _, full = run(model, codec, "full", monkeypatch, st)
    for p, a, b in zip(ps, cached, full):
        assert a.finish_reason == "max_rounds"
        assert [s.modality for s in a.segments] == ["text", "audio"] * 3
        assert len(a.audio_in) == 2 and all(n == 4 for _, n in a.audio_in)  # two clips heard
        assert [s.listened_rows for s in clips_of(a)] == [4, 4, None]
        np.testing.assert_array_equal(a.rows, b.rows)
        np.testing.assert_array_equal(a.sequence, b.sequence)
        assert a.audio_in == b.audio_in
        for sa, sb in zip(clips_of(a)[:2], clips_of(b)[:2]):
            np.testing.assert_array_equal(sa.waveform, sb.waveform)
    # the two requests' answers differ (each followed its own prompt)
    assert not np.array_equal(cached[0].sequence, cached[1].sequence)


def test_batched_equals_one_at_a_time(setup, monkeypatch):
    """Two requests of different prompt and text lengths hear their clips at different
    steps: batched (masked holes beside the appended rows) each answers as it does alone."""
    model, codec, _ = setup
    _, batched = run(model, codec, "graph", monkeypatch, settings(guidance_scale=3.0, batch_size=4))
    _, alone = run(model, codec, "graph", monkeypatch, settings(guidance_scale=3.0, batch_size=1))
    assert batched[0].audio_in[0][0] != batched[1].audio_in[0][0]
    for a, b in zip(batched, alone):
        np.testing.assert_array_equal(a.rows, b.rows)
        np.testing.assert_array_equal(a.sequence, b.sequence)
        assert a.audio_in == b.audio_in and a.finish_reason == b.finish_reason


def test_every_content_row_is_the_greedy_pick_of_one_training_forward(setup, monkeypatch):
    """Teacher-forced check: the whole final sequence (prompt, answer, appended clips with
    their encoder frames) through the training forward once; every row the model chose is
    the argmax of the masked logits one position earlier."""
    model, codec, _ = setup
    ps, gens = run(model, codec, "graph", monkeypatch, settings())
    e = make_engine(model, "graph")
    vocab, K = model.vocab, model.vocab.num_codebooks
    for p, g, text_tokens in zip(ps, gens, TEXT_TOKENS):
        seq = np.concatenate([p.rows, g.sequence])
        n = len(p.rows)
        heard = [s.waveform for s in clips_of(g) if s.waveform is not None]
        wave = torch.zeros(len(heard), max(len(w) for w in heard))
        for i, w in enumerate(heard):
            wave[i, :len(w)] = torch.from_numpy(w)
        audio = {"audio_waveforms": wave, "audio_num_samples": torch.tensor([len(w) for w in heard]),
                 "audio_rows": torch.tensor([[0, n + row, rows] for row, rows in g.audio_in])}
        tokens = torch.as_tensor(seq)[None]
        with torch.no_grad():
            stream0, streams = model.logits(tokens, torch.arange(len(seq))[None], None, **audio)
        checked = 0
        for t in range(n, len(seq)):
            tok = int(seq[t, 0])
            kind = vocab.kind_of(tok)
            if kind == "text":
                allowed = e.stream0_masks[MASK_TEXT]
            elif kind == "audio" and tok != vocab.codebook_pads[0]:
                allowed = e.stream0_masks[engine_module.MASK_AUDIO0]
            else:
                allowed = None
            if allowed is not None:
                assert int(stream0[0, t - 1].masked_fill(~allowed, -torch.inf).argmax()) == tok, t
                checked += 1
            for k in range(1, K):
                if kind == "audio" and int(seq[t, k]) != vocab.codebook_pads[k]:
                    lg = streams[0, t - 1, k - 1].masked_fill(~e.stream_masks[k - 1], -torch.inf)
                    assert int(lg.argmax()) + e.stream_lo[k - 1] == int(seq[t, k]), (t, k)
                    checked += 1
        assert checked == 3 * text_tokens + 3 * FRAMES * K


# --- training layout ---------------------------------------------------------------------------
def test_appended_rows_are_the_training_layout(setup, monkeypatch):
    """The answer, listening included, laid out by build_segments + layout from its parts:
    the same rows, the placeholder spans where the loop put the encoder frames, no loss on
    them. Here the model ends the turn with <|eos|> after its second clip."""
    from megatron_ualm.inference.outputs import segment_codes
    model, codec, _ = setup
    vocab = model.vocab
    ps, gens = run(model, codec, "graph", monkeypatch, settings(max_rounds=3), eos_after=2)
    for p, g in zip(ps, gens):
        assert g.finish_reason == "eos"
        assert [s.modality for s in g.segments] == ["text", "audio", "text", "audio"]
        messages = [T.Message("user", "text", tokenize(_prompt_text(p, vocab)))]
        heard = 0
        for seg in g.segments:
            if seg.modality == "text":
                messages.append(T.Message("assistant", "text", [vocab.unified_to_text(i) for i in seg.ids]))
                continue
            messages.append(T.Message("assistant", "audio", segment_codes(seg, vocab)))
            if seg.listened_rows is not None:
                ref = T.AudioRef(heard, len(seg.waveform), seg.listened_rows)
                messages.append(T.Message("assistant", "audio", ref))
                heard += 1
        ex = T.layout(T.build_segments(messages, vocab), vocab)
        n = len(p.rows)
        np.testing.assert_array_equal(ex.tokens[:n], p.rows)
        np.testing.assert_array_equal(ex.tokens[n:], g.sequence)
        assert [(s.row - n, s.num_rows) for s in ex.audio_spans] == g.audio_in
        for row, rows in g.audio_in:  # header, placeholders, END of the heard clip: context
            assert not ex.weights[n + row - 2:n + row + rows + 1].any()


def _prompt_text(prompt, vocab) -> str:
    """The request text back from the prompt rows (tokenize is a character map here)."""
    from megatron_ualm.inference.prompts import build_prompt
    for text in ("make a calm rain sound", "birds"):
        if np.array_equal(build_prompt({"prompt": text}, vocab, tokenize).rows, prompt.rows):
            return text
    raise AssertionError("unknown prompt")


# --- bounds ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("max_rounds", [1, 2])
def test_max_rounds_bounds_the_loop(setup, monkeypatch, max_rounds):
    model, codec, _ = setup
    _, gens = run(model, codec, "graph", monkeypatch, settings(max_rounds=max_rounds))
    for g in gens:
        assert g.finish_reason == "max_rounds"
        assert len(clips_of(g)) == max_rounds
        assert len(g.audio_in) == max_rounds - 1
        assert g.sequence[-1, 0] == V.EOT  # the model asked to listen once more; the loop stopped


def test_row_budget_ends_the_loop(setup, monkeypatch):
    model, codec, _ = setup
    budget = 30
    _, gens = run(model, codec, "graph", monkeypatch, settings(max_new_rows=budget, max_rounds=5))
    for g in gens:
        assert g.finish_reason == "length"
        assert len(g.rows) == budget
        assert len(g.audio_in) >= 1


def test_cached_backend_refuses_reasoning(setup):
    model, codec, _ = setup
    with pytest.raises(ValueError, match="graph or full backend"):
        engine_module.Engine(model, backend="cached").generate(prompts(model.vocab)[:1], settings(), codec)


# --- runner: transcript and clips --------------------------------------------------------------------
def test_runner_writes_transcript_and_clips(setup, monkeypatch, tmp_path):
    import soundfile as sf

    from megatron_ualm.inference.outputs import format_transcript
    from megatron_ualm.inference.runner import run_requests
    model, codec, _ = setup
    monkeypatch.setattr(engine_module, "RowState", forced_state(V.EOS))
    records = [(0, {"id": "r1", "prompt": "make a calm rain sound", "mode": "reasoning"}),
               (1, {"id": "bad", "prompt": "x", "mode": "dream"})]
    out = run_requests(make_engine(model, "graph"), records, str(tmp_path), settings(max_rounds=2),
                       tokenize, decode, codec)
    rec = json.loads(json.dumps(out[0]))
    assert rec["status"] == "ok" and rec["rounds"] == 2 and rec["finish_reason"] == "max_rounds"
    assert [p["type"] for p in rec["transcript"]] == ["text", "audio", "listen", "text", "audio"]
    assert rec["transcript"][2]["wav"] == rec["transcript"][1]["wav"] == rec["wavs"][0]
    assert rec["transcript"][2]["encoder_rows"] == 4
    for path in rec["wavs"]:
        audio, sr = sf.read(path, dtype="float32")
        assert sr == 16000 and len(audio) == FRAMES * codec.info.hop_length
    assert out[1]["status"] == "error" and "dream" in out[1]["error"]["message"]
    text = format_transcript(rec)
    assert rec["wavs"][1] in text and text.count("listen:") == 1


# --- command line ------------------------------------------------------------------------------------
def test_cli_prints_the_transcript(tmp_path):
    """``python -m megatron_ualm.generate`` on a saved tiny checkpoint: a reasoning request
    gets a transcript in answers.jsonl and on stdout (the random model picks its parts)."""
    import os
    import sys

    from test_inference_cli import ROOT, SAVE, _run
    script = tmp_path / "save.py"
    script.write_text(SAVE.format(tests=os.path.join(ROOT, "tests")))
    _run([sys.executable, str(script), str(tmp_path)], tmp_path)
    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"id": "r1", "prompt": "a dog barks near the river", "mode": "reasoning",
                                    "modality": "audio"}) + "\n")
    out = tmp_path / "out"
    proc = _run([sys.executable, "-m", "megatron_ualm.generate", "--checkpoint", str(tmp_path / "run"),
                 "--requests", str(requests), "--out", str(out), "device=cpu", "max_new_rows=40",
                 "max_audio_seconds=0.1", "max_rounds=2"], ROOT)
    (answer,) = [json.loads(x) for x in (out / "answers.jsonl").read_text().splitlines()]
    assert answer["status"] == "ok" and answer["transcript"][0]["type"] == "audio"
    assert answer["transcript"][0]["wav"] == answer["wavs"][0] and os.path.isfile(answer["wavs"][0])
    assert 1 <= answer["rounds"] <= 2
    assert "[r1] reasoning" in proc.stdout and answer["wavs"][0] in proc.stdout
