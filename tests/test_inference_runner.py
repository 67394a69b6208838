"""Request manifests through the runner: error records for bad requests, WAVs from the codec,
audio-understanding prompts, reproducibility, rank sharding and merging."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from model_batches import WINDOW_SECONDS, tiny_model_cfg

from megatron_ualm.audio.io import write_wav


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from megatron_ualm.audio.codec import Codec, save_tiny_codec
    from megatron_ualm.inference.engine import Engine
    from megatron_ualm.model.transformer_config import transformer_config_from
    from megatron_ualm.model.ualm_model import UALMModel
    from megatron_ualm.runtime import init_runtime, shutdown_runtime
    init_runtime(device="cpu", seed=4)
    cfg = tiny_model_cfg(init_method_std=0.3)
    model = UALMModel(cfg, transformer_config_from(cfg, None, "fp32")).eval()
    root = tmp_path_factory.mktemp("runner")
    codec = Codec(save_tiny_codec(str(root / "codec"), cfg.num_codebooks, cfg.codebook_size))
    yield Engine(model), codec, root
    shutdown_runtime()


def tokenize(text: str) -> list[int]:
    return [32 + (ord(c) % 200) for c in text]


def decode(ids) -> str:
    return "".join(chr(97 + (int(i) % 26)) for i in ids)


def manifest(root) -> list[dict]:
    rng = np.random.RandomState(0)
    write_wav(str(root / "clip.wav"), (rng.randn(8000) * 0.1).astype(np.float32))
    (root / "garbage.wav").write_bytes(b"RIFF not really a wav file at all" * 10)
    return [
        {"id": "text", "prompt": "what is two and two"},
        {"id": "missing", "audio": "nope.wav", "prompt": "what is this"},
        {"id": "tta", "caption": "a dog barks"},
        {"id": "garbage", "audio": "garbage.wav", "prompt": "what is this"},
        {"id": "empty", "prompt": "   "},
        {"id": "long", "prompt": "x" * 200},
        {"id": "qa", "audio": "clip.wav", "prompt": "<sound>\nwhat is this"},
        {"id": "tts", "task": "transcription_to_speech", "text": "hello", "settings": {"guidance_scale": 1}},
        {"_invalid": "line 9: not JSON"},
    ]


def run(setup, out_dir, seed=0):
    from megatron_ualm.inference.runner import run_requests
    from megatron_ualm.inference.sampling import GenerationSettings
    engine, codec, root = setup
    st = GenerationSettings(max_new_rows=20, max_audio_seconds=0.2, batch_size=4, seed=seed)
    records = list(enumerate(manifest(root)))
    return run_requests(engine, records, str(out_dir), st, tokenize, decode, codec,
                        base_dir=str(root), max_prompt_rows=100)


def strip(rec: dict) -> dict:
    rec = {k: v for k, v in rec.items() if k != "timing"}
    for seg in rec.get("segments", []):
        seg.pop("wav", None)
    rec.pop("wavs", None)
    return rec


def test_bad_requests_get_error_records_and_the_rest_completes(setup, tmp_path):
    from megatron_ualm.audio.io import load_audio
    answers = run(setup, tmp_path)
    by_id = {a["id"]: a for a in answers}
    assert [a["index"] for a in answers] == list(range(9))
    errors = {i: a["error"]["reason"] for i, a in by_id.items() if a["status"] == "error"}
    assert errors == {"missing": "missing_file", "garbage": "unreadable", "empty": "empty_prompt",
                      "long": "prompt_too_long", "8": "bad_request"}
    for key in ("text", "tta", "qa", "tts"):
        a = by_id[key]
        assert a["status"] == "ok" and a["generated_rows"] > 0 and a["timing"]["decode_s"] >= 0
        assert a["settings"]["request_seed"] > 0 and a["finish_reason"] in ("eos", "length")
    assert by_id["tts"]["settings"]["guidance_scale"] == 1 and by_id["tta"]["settings"]["guidance_scale"] == 3
    assert by_id["tta"]["segments"][0]["modality"] == "audio"
    assert by_id["tts"]["segments"][0]["modality"] == "speech"
    assert by_id["qa"]["prompt_rows"] > 8  # the clip's placeholder rows are in the prompt
    wavs = [w for a in answers if a["status"] == "ok" for w in a["wavs"]]
    assert wavs
    for w in wavs:
        audio = load_audio(w, allow_silent=True) if os.path.getsize(w) > 44 else np.zeros(0)
        seg = next(s for a in answers if a["status"] == "ok" for s in a["segments"] if s.get("wav") == w)
        assert len(audio) == round(seg["duration_s"] * 16000) == seg["frames"] * 320
    json.dumps(answers)  # JSON-ready


def test_same_seed_same_answers(setup, tmp_path):
    a = [strip(r) for r in run(setup, tmp_path / "a", seed=11)]
    b = [strip(r) for r in run(setup, tmp_path / "b", seed=11)]
    c = [strip(r) for r in run(setup, tmp_path / "c", seed=12)]
    assert a == b
    assert a != c


def test_rank_files_merge_in_manifest_order(tmp_path):
    from megatron_ualm.inference.runner import merge_rank_files, write_jsonl
    records = [{"index": i, "id": str(i)} for i in range(7)]
    for r in range(3):
        write_jsonl(str(tmp_path / f"answers.rank{r}.jsonl"), records[r::3])
    merged = merge_rank_files(str(tmp_path), 3)
    assert [m["index"] for m in merged] == list(range(7))
    assert sorted(os.listdir(tmp_path)) == ["answers.jsonl"]


def test_cli_arguments_split_run_keys_from_settings():
    from megatron_ualm.generate import parse_args
    from megatron_ualm.inference.sampling import GenerationSettings
    args, run_keys, overrides = parse_args(["--checkpoint", "c", "--requests", "r.jsonl", "--out", "o",
                                            "device=cpu", "guidance_scale=2.5", "audio_top_k=5"])
    assert run_keys == {"device": "cpu"}
    st = GenerationSettings.from_overrides(overrides)
    assert st.guidance_scale == 2.5 and st.audio_top_k == 5 and st.text_temperature == 0.0
    with pytest.raises(ValueError):
        GenerationSettings.from_overrides({"nonsense": 1})
