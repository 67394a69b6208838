"""UALM-Reason conversations (SPEC section 9): the layout row by row, the reasoning JSONL tool
(rejects, exact contents, kill and resume), the demo's true critiques, and a few training steps."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from megatron_ualm.audio.codec import Codec
from megatron_ualm.audio.frames import num_encoder_frames
from megatron_ualm.audio.io import load_audio, quantize_pcm16, write_wav
from megatron_ualm.data import indexed as I
from megatron_ualm.data.demo import (NOTES, make_demo_data, reasoning_example, reasoning_texts,
                                     write_reasoning_data)
from megatron_ualm.data.manifests import iter_manifest
from megatron_ualm.data.preprocess import KILL_ENV, PreprocessConfig, run_preprocess
from megatron_ualm.data.tokenizer import encode_batch, load_tokenizer, train_tiny_tokenizer
from megatron_ualm.formats import AudioRef, UnifiedVocab, build_segments, layout
from megatron_ualm.formats import templates as T
from megatron_ualm.formats import vocab as V

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# 100 text rows, K=2 codebooks of C=4 codes:
# specials [0,256) | text [256,356) | cb0 pad 356, codes 357..360 | cb1 pad 361, codes 362..365
VOC = UnifiedVocab(text_vocab_size=100, num_codebooks=2, codebook_size=4)
WORDS = {"hi": 10, "gen": 20, "dog": 21, "plan": 31, "short": 32}


def tok(s):
    return [WORDS[w] for w in s.split()]


def test_interleaved_reasoning_example_row_by_row():
    codes_a = np.array([[0, 1], [2, 3]])           # 2 frames
    codes_b = np.array([[3, 2, 1], [0, 1, 2]])     # 3 frames
    ref_a = AudioRef(clip_index=0, num_samples=16_000, num_rows=2)
    turns = [("system", [("text", "hi")]), ("user", [("text", "gen dog")]),
             ("assistant", [("text", "plan"), ("audio_out", "a.wav"), ("audio_in", "a.wav"),
                            ("text", "short"), ("audio_out", "b.wav")])]
    msgs = T.reasoning(turns, tok, {"a.wav": codes_a, "b.wav": codes_b}.__getitem__, {"a.wav": ref_a}.__getitem__)
    ex = layout(build_segments(msgs, VOC), VOC)
    B, E, EOT, S, U, A, TX, AU = V.BOS, V.EOS, V.EOT, V.SYSTEM, V.USER, V.ASSISTANT, V.TEXT, V.AUDIO
    h = 0.5
    expected = [  # (row, weight stream 0, weight stream 1)
        ([B, 0], 0, 0), ([S, 0], 0, 0), ([TX, 0], 0, 0), ([266, 0], 0, 0), ([E, 0], 0, 0),
        ([U, 0], 0, 0), ([TX, 0], 0, 0), ([276, 0], 0, 0), ([277, 0], 0, 0), ([E, 0], 0, 0),
        # plan (target), then <|eot|>: the next part is the assistant's too
        ([A, 0], 0, 0), ([TX, 0], 1, 0), ([287, 0], 1, 0), ([EOT, 0], 1, 0),
        # audio_out A: frames (0,2), (1,3) with codebook 1 one row late; corners hold the pads
        ([A, 0], 0, 0), ([AU, 0], 1, 0),
        ([357, 361], h, h), ([358, 364], h, h), ([356, 365], h, h),
        ([EOT, 0], 1, 0),  # the model chooses to listen (eot) rather than stop (eos)
        # audio_in A: header, placeholders and END are context the inference loop writes
        ([A, 0], 0, 0), ([AU, 0], 0, 0), ([0, 0], 0, 0), ([0, 0], 0, 0), ([EOT, 0], 0, 0),
        # critique (target)
        ([A, 0], 0, 0), ([TX, 0], 1, 0), ([288, 0], 1, 0), ([EOT, 0], 1, 0),
        # audio_out B: frames (3,0), (2,1), (1,2); then <|eos|> ends the turn
        ([A, 0], 0, 0), ([AU, 0], 1, 0),
        ([360, 361], h, h), ([359, 362], h, h), ([358, 363], h, h), ([356, 364], h, h),
        ([E, 0], 1, 0)]
    assert ex.tokens.tolist() == [r for r, _, _ in expected]
    assert ex.weights.tolist() == [[w0, w1] for _, w0, w1 in expected]
    assert [(s.row, s.num_rows, s.clip_index, s.num_samples) for s in ex.audio_spans] == [(22, 2, 0, 16_000)]
    assert ex.target_audio_rows == (16, 19)
    segs = build_segments(msgs, VOC)
    assert [s.mode for s in segs] == [
        T.MODE_TEXT, T.MODE_TEXT_TARGET, T.MODE_TEXT, T.MODE_TEXT_TARGET, T.MODE_CODEC_TARGET,
        T.MODE_TEXT_TARGET, T.MODE_TEXT, T.MODE_AUDIO_REF, T.MODE_TEXT, T.MODE_TEXT_TARGET,
        T.MODE_TEXT, T.MODE_TEXT_TARGET, T.MODE_CODEC_TARGET, T.MODE_TEXT_TARGET]
    assert T.num_rows(segs, 2) == ex.num_rows
    with pytest.raises(ValueError, match="only assistant turns generate audio"):
        T.reasoning([("user", [("audio_out", "a.wav")])], tok, {"a.wav": codes_a}.__getitem__, None)


# --- the data tool ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("rdemo")
    d = make_demo_data(str(root), num_clips=0, num_text=4, speech=False, num_reasoning=7)
    texts = reasoning_texts(d.reasoning)
    assert len(texts) == 7 * 4  # system, user, plan, critique
    train_tiny_tokenizer(texts * 3, str(root / "tok"), vocab_size=300)
    return d, str(root / "tok")


@pytest.fixture(scope="module")
def codec():
    return Codec("tiny")


VOCAB = UnifiedVocab(text_vocab_size=300, num_codebooks=8, codebook_size=1024)


def _run(inputs, out, tok_dir, **kw):
    cfg = PreprocessConfig(inputs=list(inputs), task="reasoning", out=str(out), tokenizer=tok_dir,
                           codec="tiny", text_vocab_size=300, workers=1, progress=False, **kw)
    return run_preprocess(cfg)


def _expected(manifest, tok, codec):
    """Documents built the slow obvious way, one clip at a time."""
    tokenize = lambda s: encode_batch(tok, [s])[0]  # noqa: E731
    docs, clips = [], []
    for rec in iter_manifest(manifest):
        if hasattr(rec, "reason"):
            continue
        refs = {}
        for _, parts in rec.turns:
            for key, path in parts:
                if key == "audio_in" and path not in refs:
                    samples = load_audio(path)
                    refs[path] = AudioRef(len(clips), len(samples), num_encoder_frames(len(samples)))
                    clips.append(quantize_pcm16(samples))
        msgs = T.reasoning(rec.turns, tokenize, lambda p: codec.encode([load_audio(p)])[0], refs.__getitem__)
        docs.append(build_segments(msgs, VOCAB))
    return docs, clips


def test_reasoning_jsonl_to_dataset(tmp_path, demo, codec):
    d, tok_dir = demo
    summary = _run([d.reasoning], tmp_path / "r", tok_dir, chunk_size=3)
    docs, clips = _expected(d.reasoning, load_tokenizer(tok_dir), codec)
    assert summary.kept == len(docs) == 7 and not summary.rejected
    ds = I.TokenizedDataset(str(tmp_path / "r"), vocab=VOCAB, task="reasoning")
    assert len(ds) == 7 and ds.num_clips == len(clips) == 7  # one heard clip per conversation
    for i, doc in enumerate(docs):
        assert ds.segments(i) == doc
        modes = [s.mode for s in doc]
        assert modes.count(T.MODE_AUDIO_REF) == 1 and modes.count(T.MODE_CODEC_TARGET) in (1, 2)
    for j, clip in enumerate(clips):
        np.testing.assert_array_equal(ds.clip_pcm16(j), clip)
    meta = I.read_meta(str(tmp_path / "r"))
    assert meta["task"] == "reasoning" and meta["vocab"]["num_codebooks"] == 8


def test_bad_reasoning_entries_are_rejected_with_file_line_reason(tmp_path, demo):
    d, tok_dir = demo
    good = [json.loads(line) for line in open(d.reasoning)][2:4]  # clips of 1 s and up to 2.25 s
    for g in good:  # clip paths relative to the new manifest's directory
        for m in g["messages"]:
            if isinstance(m["content"], list):
                for p in m["content"]:
                    for k in ("audio_in", "audio_out"):
                        if k in p:
                            p[k] = os.path.join(d.out_dir, p[k])
    write_wav(tmp_path / "tiny.wav", np.full(100, 0.5, np.float32))
    ok_user = {"role": "user", "content": "hi"}
    say = lambda *parts: {"role": "assistant", "content": list(parts)}  # noqa: E731
    lines = [json.dumps(good[0]),
             json.dumps({"messages": [ok_user, say({"text": "a"}, {"audio_out": "missing.wav"})]}),  # 2
             json.dumps({"messages": [ok_user, say({"text": "  "})]}),                               # 3
             json.dumps({"messages": [ok_user, say({"video": "x.mp4"})]}),                           # 4
             json.dumps({"messages": [{"role": "robot", "content": "hi"}, say({"text": "a"})]}),     # 5
             json.dumps({"messages": [ok_user, ok_user, say({"text": "a"})]}),                       # 6
             json.dumps({"messages": [{"role": "user", "content": [{"audio_out": "tiny.wav"}]},
                                      say({"text": "a"})]}),                                         # 7
             json.dumps({"messages": [ok_user, say({"text": "a"}, {"audio_out": "tiny.wav"})]}),     # 8
             json.dumps({"messages": [ok_user]}),                                                    # 9
             json.dumps(good[1])]
    manifest = tmp_path / "bad.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    summary = _run([str(manifest)], tmp_path / "out", tok_dir)
    assert summary.kept == 2
    rejects = [json.loads(line) for line in open(tmp_path / "out.rejects.jsonl")]
    assert [(r["line"], r["reason"]) for r in rejects] == [
        (2, "missing_file"), (3, "empty_text"), (4, "unknown_part"), (5, "bad_role"), (6, "bad_role"),
        (7, "bad_role"), (8, "too_short"), (9, "bad_role")]
    assert all(r["file"] == str(manifest) for r in rejects)
    assert "content[0] has unknown key 'video'" in rejects[2]["message"]
    summary = _run([str(manifest)], tmp_path / "long", tok_dir, max_seconds=1.6)  # line 10 has a 2.25 s clip
    rejects = [json.loads(line) for line in open(tmp_path / "long.rejects.jsonl")]
    assert summary.kept == 1 and (rejects[-1]["line"], rejects[-1]["reason"]) == (10, "too_long")


@pytest.mark.slow
def test_kill_and_resume_byte_identical(tmp_path, demo):
    d, tok_dir = demo
    cmd = [sys.executable, os.path.join(ROOT, "data_tools", "preprocess_audio.py"), "--task", "reasoning",
           "--input", d.reasoning, "--tokenizer", tok_dir, "--codec", "tiny", "--text-vocab-size", "300",
           "--chunk-size", "2", "--no-progress", "--out"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    killed = subprocess.run(cmd + [str(tmp_path / "k")], env=dict(env, **{KILL_ENV: "2"}), capture_output=True)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    assert not os.path.exists(tmp_path / "k.meta.json")
    resumed = subprocess.run(cmd + [str(tmp_path / "k")], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "2 written now, 2 resumed" in resumed.stderr
    _run([d.reasoning], tmp_path / "u", tok_dir, chunk_size=2)
    for ext in (".bin", ".idx", ".audio.bin", ".audio.idx", ".meta.json", ".rejects.jsonl"):
        assert open(f"{tmp_path}/k{ext}", "rb").read() == open(f"{tmp_path}/u{ext}", "rb").read()


# --- the demo's conversations are true of their clips ---------------------------------------
def _measure(samples):
    seconds = len(samples) / 16000
    spec = np.abs(np.fft.rfft(samples))
    return seconds, float(np.abs(samples).max()), float(np.argmax(spec) * 16000 / len(samples))


def test_demo_critiques_are_true_of_the_first_clip_and_the_revision_fits():
    seen = set()
    for i in range(21):
        conv, clips = reasoning_example(i)
        flaw = conv["flaw"]
        seen.add(flaw)
        request = conv["messages"][1]["content"]
        parts = conv["messages"][2]["content"]
        assert [next(iter(p)) for p in parts] == (["text", "audio_out", "audio_in", "text"]
                                                  + ([] if flaw == "none" else ["audio_out"]))
        assert parts[1]["audio_out"] == parts[2]["audio_in"]
        want_s = float(request.split(", ")[1].split(" ")[0])
        want_peak = 0.6 if " loud " in request else 0.15
        want_note = request.split(" at ")[1].split(",")[0] if "tone" in request else None
        first = _measure(clips[parts[1]["audio_out"]])
        if flaw == "none":
            assert parts[3]["text"] == "The clip matches the request."
        else:
            last = _measure(clips[parts[4]["audio_out"]])
            assert last[0] == pytest.approx(want_s) and last[1] == pytest.approx(want_peak, abs=1e-3)
            if want_note:
                assert last[2] == pytest.approx(NOTES[want_note], abs=2)
        critique = parts[3]["text"]
        if flaw in ("too_short", "too_long"):
            assert (first[0] < want_s) == (flaw == "too_short") and first[0] != want_s
            assert f"{first[0]:g} s instead of {want_s:g} s" in critique
        if flaw in ("too_quiet", "too_loud"):
            assert (first[1] < want_peak) == (flaw == "too_quiet") and critique.startswith(
                f"The clip is {flaw.replace('_', ' ')}")
        if flaw in ("pitch_low", "pitch_high"):
            assert (first[2] < NOTES[want_note]) == (flaw == "pitch_low")
            heard = critique.split(": ")[1].split(" ")[0]  # "The pitch is too low: C4 (261.63 Hz) ..."
            assert f"too {flaw[6:]}" in critique and first[2] == pytest.approx(NOTES[heard], abs=2)
    assert seen == {"too_short", "too_long", "too_quiet", "too_loud", "pitch_low", "pitch_high", "none"}


def test_demo_reasoning_files_are_deterministic(tmp_path):
    for name in ("a", "b"):
        write_reasoning_data(str(tmp_path / name), 4, seed=3)
    names = sorted(os.listdir(tmp_path / "a" / "reasoning"))
    assert len(names) == 8  # each of the four has a flaw: a first clip and a revision
    for rel in ["reasoning.jsonl"] + [f"reasoning/{n}" for n in names]:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
