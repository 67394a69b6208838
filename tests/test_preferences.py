"""Preference JSONL -> paired datasets, and pairs made from a model's own samples."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from megatron_ualm.audio.codec import Codec
from megatron_ualm.audio.io import load_audio
from megatron_ualm.data import indexed as I
from megatron_ualm.data.demo import make_demo_data
from megatron_ualm.data.manifests import iter_manifest
from megatron_ualm.data.preferences import PreferenceConfig, run_preferences
from megatron_ualm.data.preprocess import KILL_ENV, PreprocessConfig, run_preprocess
from megatron_ualm.data.tokenizer import train_tiny_tokenizer
from megatron_ualm.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIDE_FILES = (".bin", ".idx", ".meta.json")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Demo clips; pair i prefers clip i over clip i + 1; odd pairs give the chosen side as
    codes (.npy encoded from the clip) instead of the audio file."""
    root = tmp_path_factory.mktemp("prefs")
    d = make_demo_data(str(root), num_clips=6, num_text=4, speech=False)
    recs = list(iter_manifest(d.etta))
    train_tiny_tokenizer([r.caption for r in recs] * 5, str(root / "tok"), vocab_size=300)
    codec = Codec("tiny")
    pairs, chosen_etta, rejected_etta = [], [], []
    for i in range(len(recs) - 1):
        good, bad = recs[i], recs[i + 1]
        chosen = os.path.relpath(good.location, root)
        if i % 2:
            (codes,) = codec.encode([load_audio(good.location)])
            chosen = f"codes/{i}.npy"
            os.makedirs(root / "codes", exist_ok=True)
            np.save(root / chosen, codes.astype(np.int16))
        pairs.append({"prompt": good.caption, "chosen": chosen, "rejected": os.path.relpath(bad.location, root),
                      "id": f"p{i}"})
        for rec, out in ((good, chosen_etta), (bad, rejected_etta)):
            out.append({"location": rec.location, "caption": good.caption})  # whole files, no crop
    return root, pairs, chosen_etta, rejected_etta


def _write(path, lines):
    with open(path, "w") as f:
        for line in lines:
            f.write(line if isinstance(line, str) else json.dumps(line))
            f.write("\n")
    return str(path)


def _cfg(inputs, out, root, **kw):
    return PreferenceConfig(inputs=[str(p) for p in inputs], out=str(out), tokenizer=str(root / "tok"),
                            codec="tiny", workers=1, progress=False, **kw)


def _docs(prefix):
    ds = I.TokenizedDataset(prefix, task="caption_to_audio")
    return [ds.segments(i) for i in range(len(ds))]


def _same(a, b):
    assert len(a) == len(b)
    for da, db in zip(a, b):
        assert [s.mode for s in da] == [s.mode for s in db]
        for sa, sb in zip(da, db):
            np.testing.assert_array_equal(sa.data, sb.data)


def test_pairs_match_preprocessing_of_each_side(tmp_path, demo):
    root, pairs, chosen_etta, rejected_etta = demo
    summary = run_preferences(_cfg([_write(root / "prefs.jsonl", pairs)], tmp_path / "p", root, chunk_size=2))
    assert summary.kept == len(pairs) and summary.total_rejected == 0
    for side, etta in (("chosen", chosen_etta), ("rejected", rejected_etta)):
        ref = tmp_path / f"ref_{side}"
        run_preprocess(PreprocessConfig(inputs=[_write(tmp_path / f"{side}.jsonl", etta)], task="caption_to_audio",
                                        out=str(ref), tokenizer=str(root / "tok"), codec="tiny", workers=1,
                                        progress=False))
        _same(_docs(f"{tmp_path}/p.{side}"), _docs(str(ref)))
    info = json.loads((tmp_path / "p.pairs.json").read_text())
    assert info["pairs"] == len(pairs) and info["rejects"] == {}
    assert info["source"] == [[str(root / "prefs.jsonl"), n] for n in range(1, len(pairs) + 1)]
    assert not os.path.exists(tmp_path / "p.chosen.parts")


def test_bad_lines_are_rejected_whole_and_pairs_stay_aligned(tmp_path, demo):
    root, pairs, _, _ = demo
    (root / "garbage.wav").write_bytes(b"RIFF this is not audio" * 8)
    np.save(root / "codes" / "shape.npy", np.zeros((3, 5), np.int64))
    np.save(root / "codes" / "range.npy", np.full((8, 5), 1024, np.int64))
    np.save(root / "codes" / "float.npy", np.zeros((8, 5), np.float32))
    np.save(root / "codes" / "empty.npy", np.zeros((8, 0), np.int64))
    (root / "codes" / "junk.npy").write_bytes(b"not numpy")
    good = pairs[0]
    lines = [
        good,                                                   # 1 kept
        "{not json",                                            # 2 bad_json
        {"prompt": "x", "chosen": good["chosen"]},              # 3 missing_field
        dict(good, prompt="   "),                               # 4 empty_text
        dict(good, rejected="nope.wav"),                        # 5 missing_file (rejected side)
        dict(good, chosen="garbage.wav"),                       # 6 unreadable (chosen side)
        dict(good, chosen="codes/shape.npy"),                   # 7 bad_codes
        dict(good, rejected="codes/range.npy"),                 # 8 bad_codes
        dict(good, chosen="codes/float.npy"),                   # 9 bad_codes
        dict(good, chosen="codes/junk.npy"),                    # 10 bad_codes
        dict(good, chosen="codes/empty.npy"),                   # 11 too_short
        dict(good, chosen="nope.wav", rejected="codes/junk.npy"),  # 12 both sides bad
        pairs[1],                                               # 13 kept
    ]
    path = _write(root / "bad.jsonl", lines)
    summary = run_preferences(_cfg([path], tmp_path / "b", root, chunk_size=4, max_reject_fraction=1.0))
    assert summary.kept == 2
    rejects = [json.loads(x) for x in (tmp_path / "b.rejects.jsonl").read_text().splitlines()]
    got = [(r["file"], r["line"], r["reason"], r.get("side")) for r in rejects]
    assert got == [(path, 2, "bad_json", None), (path, 3, "missing_field", None),
                   (path, 4, "empty_text", "both"), (path, 5, "missing_file", "rejected"),
                   (path, 6, "unreadable", "chosen"), (path, 7, "bad_codes", "chosen"),
                   (path, 8, "bad_codes", "rejected"), (path, 9, "bad_codes", "chosen"),
                   (path, 10, "bad_codes", "chosen"), (path, 11, "too_short", "chosen"),
                   (path, 12, "missing_file", "both")]
    assert "[K=8, T]" in rejects[5]["message"] and "outside [0, 1024)" in rejects[6]["message"]
    info = json.loads((tmp_path / "b.pairs.json").read_text())
    assert info["pairs"] == 2 and info["source"] == [[path, 1], [path, 13]]
    assert info["rejects"]["bad_codes"] == 4 and info["entries"] == 13
    # the kept pairs are exactly those of a clean file with the two good lines
    run_preferences(_cfg([_write(root / "clean.jsonl", [pairs[0], pairs[1]])], tmp_path / "c", root))
    for side in ("chosen", "rejected"):
        _same(_docs(f"{tmp_path}/b.{side}"), _docs(f"{tmp_path}/c.{side}"))
    # above the reject fraction the run fails
    assert run_preferences(_cfg([path], tmp_path / "f", root)).exit_code(0.5) == 1
    # too long: --max-seconds drops the pair (here every pair, which fails the run)
    with pytest.raises(ValueError, match="every pair was rejected"):
        run_preferences(_cfg([root / "clean.jsonl"], tmp_path / "l", root, max_seconds=0.05))
    reasons = [json.loads(x)["reason"] for x in (tmp_path / "l.rejects.jsonl").read_text().splitlines()]
    assert reasons == ["too_long", "too_long"]


@pytest.mark.slow
def test_kill_and_resume_byte_identical(tmp_path, demo):
    root, pairs, _, _ = demo
    path = _write(root / "resume.jsonl", pairs + ["{bad"])
    cmd = [sys.executable, os.path.join(ROOT, "data_tools", "preprocess_preferences.py"), "--input", path,
           "--tokenizer", str(root / "tok"), "--codec", "tiny", "--chunk-size", "2", "--workers", "1",
           "--max-reject-fraction", "0.5", "--no-progress", "--out", str(tmp_path / "r")]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    killed = subprocess.run(cmd, env=dict(env, **{KILL_ENV: "2"}), capture_output=True)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    assert not os.path.exists(tmp_path / "r.pairs.json")
    resumed = run_preferences(_cfg([path], tmp_path / "r", root, chunk_size=2, max_reject_fraction=0.5))
    assert resumed.figures["chunks"] == "3 chunks: 1 written now, 2 resumed"
    assert dict(resumed.rejected) == {"bad_json": 1} and resumed.exit_code(0.5) == 0
    run_preferences(_cfg([path], tmp_path / "u", root, chunk_size=2, max_reject_fraction=0.5))
    names = [f".{s}{e}" for s in ("chosen", "rejected") for e in SIDE_FILES] + [".pairs.json", ".rejects.jsonl"]
    for ext in names:
        assert (tmp_path / f"r{ext}").read_bytes() == (tmp_path / f"u{ext}").read_bytes(), ext
    again = run_preferences(_cfg([path], tmp_path / "u", root, chunk_size=2, max_reject_fraction=0.5))
    assert "already complete" in again.figures["chunks"]
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_preferences(_cfg([path], tmp_path / "u", root, chunk_size=3))


SCORER_CALLS = {"left": None}  # calls allowed before the scorer fails (None: no limit)


def loudness_score(captions, waveforms, sample_rate):
    """A tiny scorer for the tests: more sound (summed magnitude) is better."""
    assert sample_rate == 16000 and len(captions) == len(waveforms)
    if SCORER_CALLS["left"] is not None:
        if SCORER_CALLS["left"] == 0:
            raise RuntimeError("scorer interrupted")
        SCORER_CALLS["left"] -= 1
    return [float(np.abs(w).astype(np.float64).sum()) for w in waveforms]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from model_batches import tiny_model_cfg

    from megatron_ualm.audio.codec import save_tiny_codec
    from megatron_ualm.config import DataConfig, PathsConfig, UALMConfig
    from megatron_ualm.model.transformer_config import transformer_config_from
    from megatron_ualm.model.ualm_model import UALMModel
    from megatron_ualm.runtime import init_runtime, shutdown_runtime
    from megatron_ualm.training.checkpoint import save_checkpoint
    root = tmp_path_factory.mktemp("selfpairs")
    train_tiny_tokenizer(["a dog barks near the river", "a high tone then rain"] * 20, str(root / "tok"), 280)
    codec = save_tiny_codec(str(root / "codec"), 4, 16)
    cfg = UALMConfig(model=tiny_model_cfg(init_method_std=0.3), data=DataConfig(seq_length=256),
                     paths=PathsConfig(tokenizer=str(root / "tok"), codec=codec))
    init_runtime(device="cpu", seed=0)
    model = UALMModel(cfg.model, transformer_config_from(cfg.model, None, "fp32"))
    save_checkpoint(str(root / "run" / "checkpoints"), 0, [model], config=cfg)
    shutdown_runtime()
    return root


def test_pairs_from_own_samples_go_through_the_pair_builder(tmp_path, checkpoint):
    from megatron_ualm.audio.codec import Codec
    from megatron_ualm.inference.preference_pairs import main
    root = checkpoint
    captions = _write(tmp_path / "captions.jsonl", [{"caption": "a dog barks", "id": "dog"},
                                                    "a high tone then rain", "{oops", {"caption": "rain"}])
    args = ["--checkpoint", str(root / "run"), "--captions", captions, "--scorer", "test_preferences:loudness_score",
            "--clips-per-caption", "3", "--max-audio-seconds", "0.2", "--seed", "3", "--device", "cpu",
            "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "a" / "pairs.jsonl"), "--batch-size", "9"]) == 0
    assert main(args + ["--out", str(tmp_path / "b" / "pairs.jsonl"), "--batch-size", "2"]) == 0
    lines = [json.loads(x) for x in (tmp_path / "a" / "pairs.jsonl").read_text().splitlines()]
    rejects = [json.loads(x) for x in (tmp_path / "a" / "pairs.jsonl.rejects.jsonl").read_text().splitlines()]
    assert (rejects[0]["line"], rejects[0]["reason"]) == (3, "bad_json")
    # every usable caption gives a pair unless its clips are empty or score alike (the tiny
    # model samples one identical frame for "rain" with every seed)
    assert [x["id"] for x in lines] == ["dog", "1"] and lines[1]["prompt"] == "a high tone then rain"
    assert [(r["id"], r["reason"]) for r in rejects[1:]] == [("3", "tied_scores")]
    codec = Codec(str(root / "codec"))
    for x in lines:
        assert x["chosen_score"] == max(x["scores"]) > x["rejected_score"] == min(x["scores"])
        for side in ("chosen", "rejected"):
            codes = np.load(tmp_path / "a" / x[side])
            wave = np.clip(codec.decode(codes), -1, 1).astype(np.float32)
            assert loudness_score([x["prompt"]], [wave], 16000)[0] == pytest.approx(x[f"{side}_score"], rel=1e-5)
    # the same seed gives the same pairs, whatever the batching
    assert (tmp_path / "a" / "pairs.jsonl").read_bytes() == (tmp_path / "b" / "pairs.jsonl").read_bytes()
    for name in os.listdir(tmp_path / "a" / "pairs.codes"):
        assert (tmp_path / "a" / "pairs.codes" / name).read_bytes() == (tmp_path / "b" / "pairs.codes" / name).read_bytes()
    # interrupted after the first caption (one caption per batch), then resumed: the same output
    SCORER_CALLS["left"] = 1
    with pytest.raises(RuntimeError, match="interrupted"):
        main(args + ["--out", str(tmp_path / "c" / "pairs.jsonl"), "--batch-size", "3"])
    SCORER_CALLS["left"] = None
    assert sorted(os.listdir(tmp_path / "c" / "pairs.jsonl.parts")) == ["000000.json"]
    assert main(args + ["--out", str(tmp_path / "c" / "pairs.jsonl"), "--batch-size", "3"]) == 0
    assert (tmp_path / "c" / "pairs.jsonl").read_bytes() == (tmp_path / "a" / "pairs.jsonl").read_bytes()
    # the JSONL feeds the pair builder; documents hold the chosen / rejected codes
    summary = run_preferences(PreferenceConfig(inputs=[str(tmp_path / "a" / "pairs.jsonl")], out=str(tmp_path / "d"),
                                               tokenizer=str(root / "tok"), codec=str(root / "codec"),
                                               text_vocab_size=300, workers=1, progress=False))
    assert summary.kept == 2 and summary.total_rejected == 0
    from megatron_ualm.formats import templates as T
    for side in ("chosen", "rejected"):
        ds = I.TokenizedDataset(f"{tmp_path}/d.{side}", task="caption_to_audio")
        for i, x in enumerate(lines):
            (target,) = [s for s in ds.segments(i) if s.mode in (T.MODE_CODEC, T.MODE_CODEC_TARGET)]
            codes = np.load(tmp_path / "a" / x[side])
            np.testing.assert_array_equal(target.data, codes.reshape(-1))  # stored as raw [K, T] codes


def test_demo_scorer_prefers_the_sound_the_caption_describes(tmp_path):
    from megatron_ualm.data.demo_scorer import score
    d = make_demo_data(str(tmp_path), num_clips=12, num_text=2, speech=False)
    recs = list(iter_manifest(d.etta))
    waves = [load_audio(r.location, r.start_time, r.end_time) for r in recs]
    m = np.array([score([r.caption] * len(waves), waves, 16000) for r in recs])  # [caption, clip]
    own = np.diag(m)
    assert (own >= m.max(axis=1) - 0.05).all()  # the caption's own clip is (nearly) the best
    assert (m.argmax(axis=1) == np.arange(len(recs))).mean() >= 0.75
    assert (own - (m.sum(axis=1) - own) / (len(recs) - 1)).min() > 0.3
    quieter = score([recs[0].caption], [waves[0] * 0.1], 16000)[0]
    assert "loud" in recs[0].caption and quieter < own[0]


def test_a_clap_directory_scorer_gives_the_clap_cosines(tmp_path):
    from megatron_ualm.evaluation.clap import ClapScorer
    from megatron_ualm.inference.preference_pairs import load_scorer
    from test_evaluate import tiny_clap

    directory = tiny_clap(tmp_path / "clap")
    rng = np.random.default_rng(1)
    waves = [rng.standard_normal(16000 * 11).astype(np.float32) * 0.1,  # longer than CLAP's 10 s window
             np.sin(np.arange(12000) * 0.05).astype(np.float32)]
    captions = ["rain on a roof", "a sine tone"]
    score = load_scorer(str(directory))
    first = score(captions, waves, 16000)
    assert first == score(captions, waves, 16000)  # the long clip is cropped the same way every time
    np.testing.assert_allclose(first, ClapScorer(str(directory)).scores(captions, waves), rtol=1e-6)
    with pytest.raises(UserError, match="--scorer: .* has no config.json"):
        load_scorer(str(tmp_path))
