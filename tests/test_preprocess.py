"""Raw manifests / shards -> tokenized datasets, end to end on the tiny codec and tokenizer."""
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
from megatron_ualm.data.demo import make_demo_data
from megatron_ualm.data.manifests import iter_manifest
from megatron_ualm.data.preprocess import KILL_ENV, PreprocessConfig, run_preprocess
from megatron_ualm.data.tokenizer import encode_batch, load_tokenizer, train_tiny_tokenizer
from megatron_ualm.formats import templates as T
from megatron_ualm.formats.vocab import UnifiedVocab

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = UnifiedVocab(text_vocab_size=400, num_codebooks=8, codebook_size=1024)
PREFIX_FILES = (".bin", ".idx", ".audio.bin", ".audio.idx", ".meta.json")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    d = make_demo_data(str(root), num_clips=8, num_text=20, speech=False)
    texts = [json.loads(line)["output"] for line in open(d.text)]
    texts += [json.loads(line)["caption"] for line in open(d.etta)]
    train_tiny_tokenizer(texts * 3, str(root / "tok"), vocab_size=400)
    return d, str(root / "tok")


@pytest.fixture(scope="module")
def codec():
    return Codec("tiny")


def _run(inputs, task, out, tok, **kw):
    cfg = PreprocessConfig(inputs=list(inputs), task=task, out=str(out), tokenizer=tok,
                           codec="tiny" if task in ("caption_to_audio", "audio_only",
                                                    "transcription_to_speech") else None,
                           workers=kw.pop("workers", 1), progress=False, **kw)
    return run_preprocess(cfg)


def _expected(manifest, task, tok, codec, prompt_seconds=0.0):
    """What a document should hold, built the slow obvious way, one record at a time."""
    tokenize = lambda s: encode_batch(tok, [s])[0]  # noqa: E731
    docs, clips = [], []
    for rec in iter_manifest(manifest):
        if task == "text_only":
            msgs = T.text_only([(t.role, t.content) for t in rec.input], rec.output, tokenize)
            docs.append(T.build_segments(msgs, VOCAB))
            continue
        etta = rec.kind == "etta"
        samples = load_audio(rec.location, rec.start_time, rec.end_time) if etta else load_audio(rec.sound)
        answers = [t.content for t in getattr(rec, "conversations", ()) if t.role == "assistant"]
        text = rec.caption if etta else (answers[0] if len(answers) == 1 else None)
        if task in ("caption_to_audio", "transcription_to_speech", "audio_only"):
            (codes,) = codec.encode([samples])
            if task == "audio_only":
                msgs = T.audio_only(codes, int(round(prompt_seconds * 50)))
            elif text is None:
                continue
            else:
                msgs = getattr(T, task)(text, codes, tokenize)
        else:
            ref = T.AudioRef(len(clips), len(samples), num_encoder_frames(len(samples)))
            if task == "audio_to_conversation":
                msgs = T.audio_to_conversation(ref, [(t.role, t.content) for t in rec.conversations], tokenize)
            elif text is None:
                continue
            else:
                msgs = getattr(T, task)(ref, text, tokenize)
            clips.append(quantize_pcm16(samples))
        docs.append(T.build_segments(msgs, VOCAB))
    return docs, clips


@pytest.mark.parametrize("task,source", [
    ("text_only", "text"), ("caption_to_audio", "etta"), ("audio_to_caption", "etta"),
    ("audio_to_conversation", "af3"), ("audio_only", "af3"), ("transcription_to_speech", "etta"),
    ("speech_to_transcription", "af3"),
])
def test_every_task_end_to_end(tmp_path, demo, codec, task, source):
    d, tok_dir = demo
    manifest = getattr(d, source)
    kw = {"prompt_seconds": 0.2} if task == "audio_only" else {}
    summary = _run([manifest], task, tmp_path / task, tok_dir, **kw)
    docs, clips = _expected(manifest, task, load_tokenizer(tok_dir), codec, **kw)
    assert summary.kept == len(docs) > 0
    if task == "speech_to_transcription":  # multi-answer AF3 conversations are rejected
        assert set(summary.rejected) <= {"multi_turn"}

    ds = I.TokenizedDataset(str(tmp_path / task), vocab=VOCAB, task=task)
    raw = I._megatron_indexed().IndexedDataset(str(tmp_path / task), multimodal=True)
    assert len(ds) == len(docs) and ds.num_clips == len(clips)
    for i, doc in enumerate(docs):
        assert ds.segments(i) == doc
        assert I.read_document(raw, i) == doc
        T.layout(doc, VOCAB)  # lays out without error
    for j, clip in enumerate(clips):
        np.testing.assert_array_equal(ds.clip_pcm16(j), clip)
    np.testing.assert_array_equal(ds.rows(), [T.layout(doc, VOCAB).num_rows for doc in docs])
    assert ds.meta["counts"]["rows"] == sum(T.layout(doc, VOCAB).num_rows for doc in docs)
    assert not os.path.exists(str(tmp_path / task) + ".parts")


def test_shards_input_matches_manifest(tmp_path, demo):
    from megatron_ualm.data.shards import build_shards
    d, tok_dir = demo
    build_shards([d.etta], str(tmp_path / "shards"), samples_per_shard=3, num_workers=1, progress=False)
    _run([d.etta], "audio_to_caption", tmp_path / "m", tok_dir)
    _run([str(tmp_path / "shards")], "audio_to_caption", tmp_path / "s", tok_dir, chunk_size=5)
    for ext in (".bin", ".idx", ".audio.bin", ".audio.idx"):  # 16-bit audio either way
        assert open(f"{tmp_path}/m{ext}", "rb").read() == open(f"{tmp_path}/s{ext}", "rb").read()
    assert I.read_meta(str(tmp_path / "s"))["sources"][0]["kind"] == "shards"
    summary = _run([str(tmp_path / "shards")], "caption_to_audio", tmp_path / "c", tok_dir)
    assert summary.kept == 8


def test_bad_inputs_rejected_with_reasons(tmp_path, demo):
    d, tok_dir = demo
    good = [json.loads(line) for line in open(d.etta)][:3]
    for g in good:
        g["location"] = os.path.join(d.out_dir, g["location"])
    write_wav(tmp_path / "short.wav", np.full(1600, 0.5, np.float32))
    open(tmp_path / "cut.wav", "wb").write(open(good[0]["location"], "rb").read()[:60]
                                           if good[0]["location"].endswith(".wav") else b"RIFF")
    lines = [json.dumps(good[0]),
             '{"location": "x.wav", "caption": ',                                   # 2 bad_json
             json.dumps({"location": "missing.wav", "caption": "a"}),              # 3 missing_file
             json.dumps(dict(good[1], caption="   ")),                              # 4 bad_value (manifest)
             json.dumps({"location": str(tmp_path / "short.wav"), "caption": "x",  # 5 too_short
                         "start_time": 0.0, "end_time": 0.004}),
             json.dumps({"location": str(tmp_path / "cut.wav"), "caption": "x"}),  # 6 unreadable/truncated
             json.dumps(good[1]),
             json.dumps(good[2])]
    manifest = tmp_path / "bad.jsonl"
    with open(manifest, "wb") as f:
        f.write("\n".join(lines).encode() + b"\n")
        f.write(b'{"location": "a.wav", "caption": "caf\xe9"}\n')                  # 9 bad_encoding
    for task in ("caption_to_audio", "audio_to_caption"):
        summary = _run([str(manifest)], task, tmp_path / task, tok_dir)
        assert summary.kept == 3
        rejects = [json.loads(line) for line in open(tmp_path / f"{task}.rejects.jsonl")]
        assert [r["line"] for r in rejects] == [2, 3, 4, 5, 6, 9]
        assert all(r["file"] == str(manifest) for r in rejects)
        reasons = [r["reason"] for r in rejects]
        assert reasons[:4] == ["bad_json", "missing_file", "bad_value", "too_short"]
        assert reasons[4] in ("unreadable", "truncated", "empty") and reasons[5] == "bad_encoding"
        assert summary.exit_code(0.5) == 1 and summary.exit_code(0.7) == 0
        ds = I.TokenizedDataset(str(tmp_path / task))
        assert len(ds) == 3


def test_text_pool_and_ranks_byte_identical(tmp_path, demo):
    d, tok_dir = demo
    _run([d.text], "text_only", tmp_path / "one", tok_dir, chunk_size=6)
    _run([d.text], "text_only", tmp_path / "pool", tok_dir, chunk_size=6, workers=2)
    # two ranks sharing a filesystem: rank 1 first, then rank 0 merges
    _run([d.text], "text_only", tmp_path / "ranks", tok_dir, chunk_size=6, rank=1, world_size=2)
    _run([d.text], "text_only", tmp_path / "ranks", tok_dir, chunk_size=6, rank=0, world_size=2)
    for name in ("pool", "ranks"):
        for ext in (".bin", ".idx", ".meta.json", ".rejects.jsonl"):
            assert open(f"{tmp_path}/one{ext}", "rb").read() == open(f"{tmp_path}/{name}{ext}", "rb").read()


@pytest.mark.slow
def test_kill_and_resume_byte_identical(tmp_path, demo):
    d, tok_dir = demo
    cmd = [sys.executable, os.path.join(ROOT, "data_tools", "preprocess_audio.py"), "--task",
           "caption_to_audio", "--input", d.etta, "--tokenizer", tok_dir, "--codec", "tiny",
           "--chunk-size", "3", "--no-progress", "--out"]
    killed = subprocess.run(cmd + [str(tmp_path / "r")], env=dict(os.environ, **{KILL_ENV: "2"}),
                            capture_output=True)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    assert not os.path.exists(tmp_path / "r.meta.json")
    assert sorted(os.listdir(tmp_path / "r.parts")).count("chunk-000001.meta.json") == 1
    resumed = subprocess.run(cmd + [str(tmp_path / "r")], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "2 written now, 1 resumed" not in resumed.stderr  # 3 chunks: 1 new, 2 resumed
    assert "1 written now, 2 resumed" in resumed.stderr
    _run([d.etta], "caption_to_audio", tmp_path / "u", tok_dir, chunk_size=3)
    for ext in (".bin", ".idx", ".meta.json", ".rejects.jsonl"):
        assert open(f"{tmp_path}/r{ext}", "rb").read() == open(f"{tmp_path}/u{ext}", "rb").read()
    # a finished dataset is not rebuilt; other options are refused without --overwrite
    again = _run([d.etta], "caption_to_audio", tmp_path / "u", tok_dir, chunk_size=3)
    assert "already complete" in again.figures["chunks"]
    with pytest.raises(FileExistsError, match="--overwrite"):
        _run([d.etta], "caption_to_audio", tmp_path / "u", tok_dir, chunk_size=4)


@pytest.mark.slow
def test_merge_and_inspect_tools(tmp_path, demo):
    d, tok_dir = demo
    _run([d.af3], "audio_to_conversation", tmp_path / "a", tok_dir)
    _run([d.etta], "audio_to_conversation", tmp_path / "b", tok_dir)
    tools = os.path.join(ROOT, "data_tools")
    out = subprocess.run([sys.executable, f"{tools}/merge_datasets.py", "--out", str(tmp_path / "ab"),
                          str(tmp_path / "a"), str(tmp_path / "b")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    a, b, ab = (I.TokenizedDataset(str(tmp_path / n)) for n in ("a", "b", "ab"))
    assert len(ab) == len(a) + len(b) and ab.num_clips == a.num_clips + b.num_clips
    last = ab.segments(len(ab) - 1)
    (ref,) = [s for s in last if s.mode == T.MODE_AUDIO_REF]
    np.testing.assert_array_equal(ab.clip_pcm16(int(ref.data[0])), b.clip_pcm16(b.num_clips - 1))
    shown = subprocess.run([sys.executable, f"{tools}/inspect_dataset.py", str(tmp_path / "ab"),
                            "--example", "0", "--wav-out", str(tmp_path / "x.wav")],
                           capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert "audio_to_conversation" in shown.stdout and "placeholder rows" in shown.stdout
    assert "<|assistant|>" in shown.stdout and os.path.getsize(tmp_path / "x.wav") > 44
