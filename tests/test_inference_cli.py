"""``python -m megatron_ualm.generate`` end to end: a tiny model saved as a Megatron
checkpoint (with its config, a locally trained tokenizer and a tiny codec) answers a
manifest on two CPU ranks; rank 0 merges the answers. Its HF export answers the same."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SAVE = textwrap.dedent("""
    import sys

    def main(root):
        sys.path.insert(0, {tests!r})
        from model_batches import tiny_model_cfg
        from megatron_ualm.audio.codec import save_tiny_codec
        from megatron_ualm.config import DataConfig, PathsConfig, UALMConfig
        from megatron_ualm.data.tokenizer import train_tiny_tokenizer
        from megatron_ualm.model.transformer_config import transformer_config_from
        from megatron_ualm.model.ualm_model import UALMModel
        from megatron_ualm.runtime import init_runtime, shutdown_runtime
        from megatron_ualm.training.checkpoint import save_checkpoint
        train_tiny_tokenizer(["a dog barks near the river", "what is two and two"] * 20, root + "/tok", 280)
        codec = save_tiny_codec(root + "/codec", 4, 16)
        cfg = UALMConfig(model=tiny_model_cfg(init_method_std=0.3), data=DataConfig(seq_length=256),
                         paths=PathsConfig(tokenizer=root + "/tok", codec=codec))
        init_runtime(device="cpu", seed=0)
        model = UALMModel(cfg.model, transformer_config_from(cfg.model, None, "fp32"))
        save_checkpoint(root + "/run/checkpoints", 0, [model], config=cfg)
        shutdown_runtime()
        from megatron_ualm.convert import convert_megatron_to_hf
        convert_megatron_to_hf(root + "/run", root + "/export", tokenizer=root + "/tok", codec=codec)

    if __name__ == "__main__":
        main(sys.argv[1])
""")


def _run(cmd, cwd):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_cli_answers_a_manifest_on_two_ranks(tmp_path):
    script = tmp_path / "save.py"
    script.write_text(SAVE.format(tests=os.path.join(ROOT, "tests")))
    _run([sys.executable, str(script), str(tmp_path)], tmp_path)
    requests = tmp_path / "requests.jsonl"
    lines = [{"id": "q", "prompt": "what is two and two"},
             {"id": "tta", "caption": "a dog barks"},
             {"id": "gone", "audio": "missing.wav", "prompt": "what is it"},
             {"id": "tts", "task": "transcription_to_speech", "text": "hello", "settings": {"seed": 5}}]
    requests.write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = tmp_path / "out"
    _run([os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", "--nproc_per_node", "2",
          "-m", "megatron_ualm.generate", "--checkpoint", str(tmp_path / "run"), "--requests", str(requests),
          "--out", str(out), "device=cpu", "max_new_rows=16", "max_audio_seconds=0.1"], ROOT)

    answers = [json.loads(x) for x in (out / "answers.jsonl").read_text().splitlines()]
    assert [a["id"] for a in answers] == ["q", "tta", "gone", "tts"]
    assert [a["rank"] for a in answers] == [0, 1, 0, 1]
    assert [a["status"] for a in answers] == ["ok", "ok", "error", "ok"]
    assert answers[2]["error"]["reason"] == "missing_file"
    assert answers[1]["segments"][0]["modality"] == "audio" and answers[3]["segments"][0]["modality"] == "speech"
    assert answers[3]["settings"]["seed"] == 5 and answers[1]["settings"]["max_new_rows"] == 16
    for a in (answers[1], answers[3]):
        for wav in a["wavs"]:
            assert os.path.isfile(wav)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] == 3 and summary["errors"] == 1 and summary["world_size"] == 2
    assert sorted(os.listdir(out)) == ["answers.jsonl", "summary.json", "wavs"]

    # the exported HF directory gives the same answers (one rank this time)
    out_hf = tmp_path / "out_hf"
    _run([sys.executable, "-m", "megatron_ualm.generate", "--checkpoint", str(tmp_path / "export"),
          "--requests", str(requests), "--out", str(out_hf), "device=cpu", "max_new_rows=16",
          "max_audio_seconds=0.1"], ROOT)
    again = [json.loads(x) for x in (out_hf / "answers.jsonl").read_text().splitlines()]

    def core(a):
        return {k: a.get(k) for k in ("id", "status", "text", "finish_reason", "generated_rows", "settings")} | {
            "segments": [{k: v for k, v in s.items() if k != "wav"} for s in a.get("segments", [])]}
    assert [core(a) for a in again] == [core(a) for a in answers]
