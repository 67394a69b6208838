"""Audio shards: exact round trip, webdataset compatibility, one-read access, determinism,
resume after a crash, the corrupt-input suite and the reject-fraction exit rule."""
import json
import os

import numpy as np
import pytest
import soundfile as sf

from megatron_ualm.audio.io import load_audio, quantize_pcm16, write_wav
from megatron_ualm.data.demo import make_demo_data
from megatron_ualm.data import shards as shards_mod
from megatron_ualm.data.shards import ShardReader, build_shards, verify_shard

SPS = 10  # samples per shard: the 24 + 24 demo entries give 5 shards, the last one short


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    d = make_demo_data(str(tmp_path_factory.mktemp("demo")), num_clips=24, min_seconds=0.5,
                       max_seconds=1.0, num_text=5, speech=False)
    return [d.etta, d.af3]


def _build(manifests, out, workers=1, **kw):
    return build_shards(manifests, str(out), samples_per_shard=SPS, num_workers=workers,
                        progress=False, **kw)


def _files(d):
    return {n: open(os.path.join(d, n), "rb").read() for n in sorted(os.listdir(d))}


def test_round_trip_exact_and_layout(demo, tmp_path):
    res = _build(demo, tmp_path / "s")
    idx = res.index
    assert idx["num_samples"] == 48 and idx["num_records"] == 48 and len(idx["shards"]) == 5
    assert [s["num_samples"] for s in idx["shards"]] == [10, 10, 10, 10, 8]
    assert idx["rejects"]["total"] == 0 and res.summary.exit_code() == 0
    reader = ShardReader(tmp_path / "s")
    assert len(reader) == 48
    seconds = 0.0
    for i in range(len(reader)):
        key, x, meta = reader.get(i)
        assert key == f"{i:010d}" == meta["key"] and x.dtype == np.float32
        crop = meta["crop"] or [None, None]
        ref = load_audio(meta["audio"], *crop)
        np.testing.assert_array_equal(x, quantize_pcm16(ref) / np.float32(32768))
        assert meta["num_samples"] == len(x)
        seconds += len(x) / 16000
        if meta["kind"] == "etta":
            assert meta["caption"] and meta["source"]["line"] == i + 1
        else:
            assert meta["conversations"][0]["role"] == "user" and meta["id"].startswith("demo-")
    assert idx["hours"] == pytest.approx(seconds / 3600, abs=1e-6)
    assert any(len(reader.get(i)[2].get("conversations", [])) > 2 for i in range(24, 48))
    assert reader.verify() == []
    # The shard index agrees with the tar's own headers.
    import tarfile
    with tarfile.open(tmp_path / "s" / "shard-000001.tar") as tar:
        members = [[m.name, m.offset_data, m.size] for m in tar.getmembers()]
        assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" for m in tar.getmembers())
    shard_index = json.loads((tmp_path / "s" / "shard-000001.index.json").read_text())
    assert members == shard_index["members"]
    sha_line = (tmp_path / "s" / "shard-000001.tar.sha256").read_text()
    assert sha_line == f"{shard_index['sha256']}  shard-000001.tar\n"


def test_webdataset_reads_our_shards(demo, tmp_path):
    wds = pytest.importorskip("webdataset")
    _build(demo, tmp_path / "s")
    reader = ShardReader(tmp_path / "s")
    urls = [str(tmp_path / "s" / s["tar"]) for s in reader.shards]
    seen = [(s["__key__"], s["wav"], s["json"]) for s in wds.WebDataset(urls, shardshuffle=False)]
    assert [k for k, _, _ in seen] == [reader.key(i) for i in range(len(reader))]
    for i, (key, wav, meta) in enumerate(seen):
        assert (key, wav, meta) == reader.read_raw(i)


def test_one_read_per_sample(demo, tmp_path, monkeypatch):
    _build(demo, tmp_path / "s")
    reader = ShardReader(tmp_path / "s")
    reader.get(0)  # loads the shard index and opens the tar
    calls = []
    real_pread = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, off: calls.append((n, off)) or
                        real_pread(fd, n, off))
    monkeypatch.setattr(os, "lseek", lambda *a: pytest.fail("reader must not seek"))
    for i in (3, 7, 1):
        reader.get(i)
    assert len(calls) == 3


@pytest.mark.parametrize("fmt", ["wav", "flac"])
def test_deterministic_across_worker_counts(demo, tmp_path, fmt):
    _build(demo, tmp_path / "w1", workers=1, audio_format=fmt)
    _build(demo, tmp_path / "w2", workers=2, audio_format=fmt)
    a, b = _files(tmp_path / "w1"), _files(tmp_path / "w2")
    assert list(a) == list(b) and a == b
    if fmt == "flac":
        key, x, meta = ShardReader(tmp_path / "w2").get(5)
        assert key.endswith("5") and len(x) == meta["num_samples"]


def test_resume_after_crash(demo, tmp_path, monkeypatch):
    out = tmp_path / "s"
    _build(demo, out, workers=2)
    final = _files(out)
    mtimes = {n: os.stat(out / n).st_mtime_ns for n in final}
    # Crash simulation: dataset index never written, shard 2 lost mid-write, shard 3's
    # checksum file missing, a temp file left behind.
    (out / "index.json").unlink()
    (out / "shard-000002.tar").unlink()
    (out / "shard-000003.tar.sha256").unlink()
    (out / "shard-000004.tar.tmp.12345").write_bytes(b"partial")
    res = _build(demo, out, workers=2)
    assert (res.shards_written, res.shards_reused) == (2, 3)
    assert _files(out) == final
    for n in final:
        if n.startswith(("shard-000000", "shard-000001", "shard-000004")):
            assert os.stat(out / n).st_mtime_ns == mtimes[n], f"{n} was rewritten"
    # A damaged tar fails verification; a rebuild that crashes part-way leaves no index.json
    # pointing into rewritten shards, and the next run rebuilds only the damaged shard.
    data = bytearray((out / "shard-000001.tar").read_bytes())
    data[2000] ^= 0xFF
    (out / "shard-000001.tar").write_bytes(bytes(data))
    assert ShardReader(out).verify() == ["shard-000001.tar"]
    assert verify_shard(str(out), 1) is None
    with monkeypatch.context() as m:
        m.setattr(shards_mod._ShardWriter, "close", lambda self: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            _build(demo, out)
    assert not (out / "index.json").exists()
    res = _build(demo, out)
    assert res.shards_written == 1 and _files(out) == final
    # A different configuration does not reuse shards built for another one.
    assert _build(demo, out, audio_format="flac").shards_written == 5


def _corrupt_inputs(d):
    """Good clips interleaved with one bad entry of each kind; returns (manifests, good caps)."""
    rng = np.random.default_rng(0)
    tone = lambda s: (0.3 * np.sin(2 * np.pi * 440 * np.arange(int(16000 * s)) / 16000))
    good = []
    for i in range(6):
        write_wav(d / f"good{i}.wav", tone(1.0) * (1 + i / 10))
        good.append(f"good {i}")
    (d / "junk.wav").write_bytes(rng.bytes(3000))
    write_wav(d / "full.wav", tone(2.0))
    (d / "cut.wav").write_bytes((d / "full.wav").read_bytes()[:30000])
    write_wav(d / "silent.wav", np.zeros(16000, np.float32))
    sf.write(d / "empty.wav", np.zeros(0, np.float32), 16000)
    e = lambda loc, cap, **kw: json.dumps(dict(location=loc, caption=cap, **kw))
    lines = [
        e("good0.wav", "good 0"),
        e("junk.wav", "unreadable"),                          # line 2
        e("good1.wav", "good 1", start_time=0.0, end_time=0.5),
        e("cut.wav", "truncated"),                            # line 4
        e("nowhere.wav", "missing"),                          # line 5
        '{"location": "good2.wav", "caption": ',              # line 6: malformed JSON
        e("good2.wav", "good 2"),
        e("good3.wav", "crop", start_time=5.0, end_time=6.0),  # line 8: crop outside the file
        e("empty.wav", "zero length"),                        # line 9
        e("silent.wav", "silent"),                            # line 10
    ]
    etta = d / "etta.jsonl"
    etta.write_bytes(("\n".join(lines) + "\n").encode()
                     + b'{"location": "good3.wav", "caption": "caf\xe9"}\n'  # line 11: not UTF-8
                     + (e("good3.wav", "good 3") + "\n").encode())
    af3 = d / "af3.json"
    conv = [{"from": "human", "value": "<sound>\nWhat?"}, {"from": "gpt", "value": "A tone."}]
    af3.write_text(json.dumps([
        {"id": "g4", "sound": "good4.wav", "conversations": conv},
        {"id": "bad", "sound": "missing_too.wav", "conversations": conv},
        {"id": "g5", "sound": "good5.wav", "conversations": conv},
    ], indent=1))
    expected = {  # (manifest, line) -> reason
        (str(etta), 2): "unreadable", (str(etta), 4): "truncated", (str(etta), 5): "missing_file",
        (str(etta), 6): "bad_json", (str(etta), 8): "crop_outside_file", (str(etta), 9): "empty",
        (str(etta), 10): "silent", (str(etta), 11): "bad_encoding",
    }
    # The AF3 reject is reported at the line where its entry's "{" is.
    af3_lines = af3.read_text().splitlines()
    bad_line = next(i for i, ln in enumerate(af3_lines) if '"id": "bad"' in ln)  # 0-based
    assert af3_lines[bad_line - 1].strip() == "{"
    expected[(str(af3), bad_line)] = "missing_file"
    return [str(etta), str(af3)], expected


def test_corrupt_inputs_are_rejected_not_fatal(tmp_path):
    manifests, expected = _corrupt_inputs(tmp_path)
    res = _build(manifests, tmp_path / "s", workers=2)
    rejects = [json.loads(ln) for ln in (tmp_path / "s" / "rejects.jsonl").read_text().splitlines()]
    assert {(r["file"], r["line"]): r["reason"] for r in rejects} == expected
    assert all(r["message"] and r["key"] for r in rejects)
    assert res.index["rejects"]["total"] == 9 and res.summary.rejected["missing_file"] == 2
    reader = ShardReader(tmp_path / "s")
    metas = [reader.get(i)[2] for i in range(len(reader))]
    assert [m.get("caption") or m["id"] for m in metas] == [
        "good 0", "good 1", "good 2", "good 3", "g4", "g5"]
    assert len(reader.get(1)[1]) == 8000  # the 0.5 s crop
    assert res.exit_code == 1  # default limit 1%
    assert res.summary.exit_code(0.01) == 1 and res.summary.exit_code(0.9) == 0
    assert "truncated" in res.summary.format()


def test_cli_exit_code_follows_reject_fraction(tmp_path, capsys):
    import importlib.util
    path = os.path.join(os.path.dirname(__file__), "..", "data_tools", "build_shards.py")
    spec = importlib.util.spec_from_file_location("build_shards_cli", path)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    manifests, _ = _corrupt_inputs(tmp_path)
    args = ["--out", str(tmp_path / "s"), "--workers", "1", "--samples-per-shard", "4",
            "--no-progress"] + [a for m in manifests for a in ("--manifest", m)]
    assert cli.main(args) == 1  # 9 of 15 rejected > 1%
    assert "FAILED" in capsys.readouterr().err
    assert cli.main(args + ["--max-reject-fraction", "0.7"]) == 0
    assert len(ShardReader(tmp_path / "s")) == 6


def test_demo_data_deterministic_and_true(tmp_path):
    a = make_demo_data(str(tmp_path / "a"), num_clips=12, num_text=20, speech=False)
    make_demo_data(str(tmp_path / "b"), num_clips=12, num_text=20, speech=False)
    for rel in ["etta.jsonl", "af3.json", "text.jsonl"] + [
            f"audio/{n}" for n in sorted(os.listdir(tmp_path / "a" / "audio"))]:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    rates = set()
    for line in open(a.etta):
        e = json.loads(line)
        path = os.path.join(a.out_dir, e["location"])
        rates.add((sf.info(path).samplerate, sf.info(path).channels))
        x = load_audio(path, e["start_time"], e["end_time"])
        if " chirp " in e["caption"]:  # the dominant frequency moves the way the caption says
            half = len(x) // 2
            peak = [np.argmax(np.abs(np.fft.rfft(p))) / len(p) for p in (x[:half], x[half:])]
            assert (peak[1] > peak[0]) == ("upward" in e["caption"])
        if "sine tone at" in e["caption"]:
            hz = float(e["caption"].split("(")[1].split(" Hz")[0])
            assert abs(np.argmax(np.abs(np.fft.rfft(x))) * 16000 / len(x) - hz) < 2
    assert {(16000, 1), (44100, 2), (48000, 2)} <= rates
    text = [json.loads(ln) for ln in open(a.text)]
    assert all(isinstance(t["output"], str) and t["input"][-1]["role"] == "user" for t in text)
