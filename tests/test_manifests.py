"""Manifest readers: every kind incl. multi-turn, path resolution, rejects, summary exit rule."""
import json

import pytest

from megatron_ualm.data.manifests import (
    GenerationRecord, Reject, Rejects, RunSummary, TextRecord, Turn, UnderstandingRecord,
    detect_kind, iter_af3, iter_etta, iter_manifest, iter_text,
)


def _write_lines(path, lines):
    path.write_bytes(b"".join((ln if isinstance(ln, bytes) else ln.encode()) + b"\n" for ln in lines))
    return path


def test_text_jsonl(tmp_path):
    p = _write_lines(tmp_path / "t.jsonl", [
        json.dumps({"input": [{"role": "user", "content": "2+2?"}], "output": "4"}),
        "",
        json.dumps({"input": [{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "Hi"},
                              {"role": "assistant", "content": "Hello"},
                              {"role": "user", "content": "Bye?"}], "output": "Bye"}),
        "{not json",
        json.dumps({"input": [{"role": "robot", "content": "x"}], "output": "y"}),
        json.dumps({"input": [{"role": "user", "content": "x"}]}),
        json.dumps({"input": [{"role": "user", "content": 3}], "output": "y"}),
        b'{"input": "caf\xe9", "output": "x"}',
        json.dumps([1, 2]),
    ])
    items = list(iter_text(p))
    assert isinstance(items[0], TextRecord) and items[0].line == 1 and items[0].output == "4"
    assert items[1].line == 3 and [t.role for t in items[1].input] == [
        "system", "user", "assistant", "user"]
    rejects = [(r.line, r.reason) for r in items[2:]]
    assert rejects == [(4, "bad_json"), (5, "bad_value"), (6, "missing_field"),
                       (7, "wrong_type"), (8, "bad_encoding"), (9, "not_object")]
    assert all(r.file == str(p) and r.message for r in items[2:])
    assert detect_kind(p) == "text"


def test_af3_json_list_multiturn_and_paths(tmp_path):
    entries = [
        {"id": "a1", "sound": "clips/x.wav", "duration": 2.0,
         "conversations": [{"from": "human", "value": "<sound>\nWhat is it?"},
                           {"from": "gpt", "value": "A tone."},
                           {"from": "human", "value": "Rising or falling?"},
                           {"from": "gpt", "value": "Rising."}]},
        {"id": 7, "sound": "/abs/y.flac",
         "conversations": [{"from": "human", "value": "<sound>\nDescribe."},
                           {"from": "gpt", "value": "Noise."}]},
        {"id": "a3", "sound": "z.wav", "conversations": []},
        {"id": "a4", "conversations": [{"from": "human", "value": "q"}]},
        {"id": "a5", "sound": "w.wav", "duration": "long",
         "conversations": [{"from": "human", "value": "q"}]},
        {"id": "a6", "sound": "v.wav", "conversations": [{"from": "alien", "value": "q"}]},
    ]
    p = tmp_path / "af3.json"
    p.write_text(json.dumps(entries, indent=1))
    items = list(iter_af3(p))
    assert len(items) == 6
    a, b = items[0], items[1]
    assert isinstance(a, UnderstandingRecord) and a.sound == str(tmp_path / "clips" / "x.wav")
    assert a.conversations == (Turn("user", "<sound>\nWhat is it?"), Turn("assistant", "A tone."),
                               Turn("user", "Rising or falling?"), Turn("assistant", "Rising."))
    assert a.index == 0 and a.line == 2 and a.duration == 2.0
    assert b.id == "7" and b.sound == "/abs/y.flac" and b.duration is None and b.index == 1
    assert [(r.index, r.reason) for r in items[2:]] == [
        (2, "bad_value"), (3, "missing_field"), (4, "wrong_type"), (5, "bad_value")]
    # Lines point at where each entry starts in the file.
    text_lines = p.read_text().splitlines()
    for item in items:
        assert text_lines[item.line - 1].strip() == "{"
        assert json.loads(text_lines[item.line].strip().rstrip(",").join("{}"))["id"] == \
            entries[item.index]["id"]
    assert detect_kind(p) == "af3"


def test_af3_broken_json_keeps_entries_before_the_error(tmp_path):
    good = {"id": "a", "sound": "a.wav", "conversations": [{"from": "human", "value": "q"}]}
    p = tmp_path / "af3.json"
    p.write_text("[\n" + json.dumps(good) + ",\n" + json.dumps(good) + ",\n{\"id\": oops}\n]")
    items = list(iter_af3(p))
    assert [type(i).__name__ for i in items] == ["UnderstandingRecord"] * 2 + ["Reject"]
    assert items[2].reason == "bad_json" and items[2].line == 4
    # A lone object reads as a one-line JSONL manifest, so it fails on its fields.
    (tmp_path / "obj.json").write_text('{"id": 1}')
    [r] = list(iter_af3(tmp_path / "obj.json"))
    assert r.reason == "missing_field" and r.line == 1


def test_af3_non_utf8_entry(tmp_path):
    p = tmp_path / "af3.json"
    p.write_bytes(b'[{"id": "a", "sound": "a.wav", "conversations": [{"from": "human", '
                  b'"value": "ok"}]},\n{"id": "b", "sound": "b\xff.wav", "conversations": '
                  b'[{"from": "human", "value": "q"}]}]')
    items = list(iter_af3(p))
    assert isinstance(items[0], UnderstandingRecord)
    assert items[1].reason == "bad_encoding" and items[1].line == 2 and items[1].index == 1


def test_af3_as_jsonl(tmp_path):
    e = {"id": "a", "sound": "a.wav", "conversations": [{"from": "human", "value": "q"}]}
    p = _write_lines(tmp_path / "af3.jsonl", [json.dumps(e), json.dumps(e)])
    assert detect_kind(p) == "af3"
    assert [i.index for i in iter_manifest(p)] == [0, 1]


def test_etta(tmp_path):
    p = _write_lines(tmp_path / "etta.jsonl", [
        json.dumps({"location": "a.wav", "start_time": 0.5, "end_time": 2.5, "duration": 3.0,
                    "caption": "a dog barks", "sample_rate": 22050}),
        json.dumps({"location": "/x/b.flac", "caption": "rain"}),
        json.dumps({"location": "c.wav", "start_time": 2.0, "end_time": 1.0, "caption": "x"}),
        json.dumps({"location": "c.wav", "start_time": True, "caption": "x"}),
        json.dumps({"location": "c.wav", "caption": "  "}),
        json.dumps({"caption": "no file"}),
    ])
    items = list(iter_etta(p))
    a = items[0]
    assert isinstance(a, GenerationRecord) and a.location == str(tmp_path / "a.wav")
    assert (a.start_time, a.end_time, a.duration, a.sample_rate) == (0.5, 2.5, 3.0, 22050)
    assert items[1].start_time == 0.0 and items[1].end_time is None
    assert [(r.line, r.reason) for r in items[2:]] == [
        (3, "bad_value"), (4, "wrong_type"), (5, "bad_value"), (6, "missing_field")]
    assert detect_kind(p) == "etta"


def test_missing_manifest_is_a_reject(tmp_path):
    [r] = list(iter_etta(tmp_path / "nope.jsonl"))
    assert r.reason == "unreadable_manifest" and r.line is None
    with pytest.raises(ValueError):
        detect_kind(_write_lines(tmp_path / "odd.jsonl", [json.dumps({"foo": 1})]))


def test_rejects_writer_and_summary(tmp_path):
    path = tmp_path / "sub" / "rejects.jsonl"
    with Rejects(path) as rej:
        rej.add(Reject("/m.jsonl", 3, "bad_json", "invalid JSON"))
        rej.add(Reject("/m.jsonl", 9, "missing_file", "no such file", key="0000000009"))
        rej.add({"file": "/a.wav", "line": 1, "reason": "missing_file", "message": "x"})
    rows = [json.loads(ln) for ln in path.read_text().splitlines()]
    assert rows[0] == {"file": "/m.jsonl", "line": 3, "reason": "bad_json",
                       "message": "invalid JSON"}
    assert rows[1]["key"] == "0000000009"
    assert rej.counts == {"bad_json": 1, "missing_file": 2} and rej.total == 3
    assert Rejects(tmp_path / "empty.jsonl").path and (tmp_path / "empty.jsonl").exists()

    s = RunSummary("test", kept=99, rejected=rej.counts)
    assert s.reject_fraction == pytest.approx(3 / 102)
    assert s.exit_code(0.05) == 0 and s.exit_code(0.01) == 1
    text = s.format(0.01)
    assert "missing_file" in text and "FAILED" in text
    assert RunSummary("empty").exit_code() == 0
    assert RunSummary("ok", kept=1000, rejected={"silent": 10}).exit_code(0.01) == 0
    assert RunSummary("bad", kept=1000, rejected={"silent": 11}).exit_code(0.01) == 1
