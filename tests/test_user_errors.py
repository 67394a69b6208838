"""User mistakes, as users meet them, in the trainer, generate and the converters: each ends in
ONE line ``error: <file/setting>: ...`` on stderr and exit status 2, never a traceback; the
trainer checks every path its config names before it builds the model."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from convert_utils import make_hf_qwen2, ualm_cfg
from tiny_training import TINY_YAML, tiny_overrides, write_datasets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = [sys.executable, "-m", "megatron_ualm.train", "--config", TINY_YAML]
GENERATE = [sys.executable, "-m", "megatron_ualm.generate"]
HF_TO_MEGATRON = [sys.executable, os.path.join(ROOT, "checkpoints_convert", "hf_to_megatron.py"), "--no-progress"]
MEGATRON_TO_HF = [sys.executable, os.path.join(ROOT, "checkpoints_convert", "megatron_to_hf.py"), "--no-progress"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny HF Qwen2 directory, its Megatron conversion and HF export, damaged copies of
    each, a requests file and tiny tokenized datasets."""
    from megatron_ualm.convert import convert_hf_to_megatron, convert_megatron_to_hf
    root = tmp_path_factory.mktemp("inputs")
    hf = make_hf_qwen2(str(root / "hf"), tied=False, kv_heads=2)
    convert_hf_to_megatron(hf, str(root / "meg"), ualm_cfg(), show_progress=False)
    # the export names a tokenizer directory that is not there (the run moved machines)
    convert_megatron_to_hf(str(root / "meg"), str(root / "export"), tokenizer=str(root / "moved_tok"),
                           show_progress=False)

    def damaged(src: str, name: str, edit) -> str:
        dst = root / name
        shutil.copytree(root / src, dst)
        edit(dst)
        return str(dst)

    def truncate(path):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])

    iter_dir = os.path.join("checkpoints", "iter_0000000")
    distcp = sorted(f for f in os.listdir(root / "meg" / iter_dir) if f.endswith(".distcp"))[0]
    write_datasets(str(root / "data"))
    requests = root / "requests.jsonl"
    requests.write_text(json.dumps({"id": "q", "prompt": "what is two and two"}) + "\n")
    return {
        "root": root, "hf": hf, "meg": str(root / "meg"), "export": str(root / "export"),
        "requests": str(requests),
        "hf_bad_weights": damaged("hf", "hf_bad_weights", lambda d: truncate(d / "model.safetensors")),
        "hf_bad_config": damaged("hf", "hf_bad_config", lambda d: (d / "config.json").write_text(
            (d / "config.json").read_text().replace('"hidden_size"', '"hidden_size" 64, "x"', 1))),
        "meg_bad": damaged("meg", "meg_bad", lambda d: truncate(d / iter_dir / distcp)),
        "export_bad_weights": damaged("export", "export_bad_weights", lambda d: truncate(d / "model.safetensors")),
        "export_bad_config": damaged("export", "export_bad_config",
                                     lambda d: (d / "ualm_config.json").write_text('{"format_version": 1,\n  "model": {')),
        "data": str(root / "data"),
    }


def run_cli(cmd, cwd) -> subprocess.CompletedProcess:
    # this checkout first, then whatever megatron-core the tests were given
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess, *names: str) -> str:
    """Exit status 2, no traceback, exactly one non-empty stderr line ``error: ...`` that
    names every one of ``names``; returns the line."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    print(lines[-1] if lines else "(no stderr)")
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr + proc.stdout
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), lines[0]
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


# --- the trainer ----------------------------------------------------------------------------------
def _train(inputs, tmp_path, *overrides):
    cmd = TRAIN + tiny_overrides(inputs["data"], str(tmp_path / "run"), *overrides)
    start = time.perf_counter()
    proc = run_cli(cmd, tmp_path)
    return proc, time.perf_counter() - start


@pytest.mark.slow
def test_trainer_missing_dataset_is_reported_before_the_model_is_built(inputs, tmp_path):
    missing = str(tmp_path / "tok" / "tta")
    proc, seconds = _train(inputs, tmp_path, f"data.train=[{{path: {missing}, task: caption_to_audio}}]")
    line = assert_one_line_error(proc, "data.train[0].path", missing)
    assert "preprocess" in line  # says what to do
    assert "building the model" not in proc.stdout + proc.stderr
    # The same run with every path right builds the model, then stops at a mistake that can
    # only be seen on the built model: the log line is there when a model is built.
    built, built_seconds = _train(inputs, tmp_path, "training.freeze=[no_such_parameter*]")
    assert built.returncode == 2 and "building the model" in built.stderr, built.stderr[-3000:]
    assert built.stderr.strip().splitlines()[-1].startswith("error: training.freeze: pattern")
    print(f"missing dataset reported after {seconds:.1f} s; a model build and its refusal took {built_seconds:.1f} s")


@pytest.mark.slow
@pytest.mark.parametrize("mistake", ["dataset_task", "checkpoint_missing", "checkpoint_damaged", "setting",
                                     "tokenizer", "codec", "encoder"])
def test_trainer_mistakes_are_one_line(inputs, tmp_path, mistake):
    setting, names = {
        "dataset_task": ("data.valid=[{path: %s/tta, task: text_only}]" % inputs["data"],
                         ["data.valid[0]", "tta.meta.json", "caption_to_audio"]),
        "checkpoint_missing": (f"checkpoint.load={tmp_path}/init", ["checkpoint.load", f"{tmp_path}/init"]),
        "checkpoint_damaged": (f"checkpoint.load={inputs['meg_bad']}", ["checkpoint.load", "meg_bad", ".distcp", "truncated"]),
        "setting": ("optimizer.lr=fast", ["optimizer.lr", "'fast'"]),
        "tokenizer": (f"paths.tokenizer={tmp_path}/tok", ["paths.tokenizer", f"{tmp_path}/tok"]),
        "codec": (f"paths.codec={inputs['hf']}/model.safetensors", ["paths.codec", "model.safetensors"]),
        "encoder": ("model.encoder.random_init=false", ["model.encoder.path: null", "prepare_pretrained.py",
                                                        "model.encoder.random_init=true"]),
    }[mistake]
    proc, _ = _train(inputs, tmp_path, setting)
    assert_one_line_error(proc, *names)
    assert "building the model" not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_trainer_ranks_agree_on_a_mistake_only_one_rank_sees(inputs, tmp_path):
    """Two gloo ranks; the dataset exists for rank 0 only (a node-local path): both ranks
    stop with the same one-line error instead of rank 0 waiting for rank 1 forever."""
    from dist_utils import run_distributed
    results = run_distributed(_rank_local_dataset, 2, inputs["data"], str(tmp_path))
    assert results[0] == results[1]
    assert results[0].startswith("data.train[0].path: ") and "rank1/text" in results[0]
    assert results[0].endswith("(found on rank 1 of 2)")


def _rank_local_dataset(data_root, tmp):
    import torch.distributed as dist

    from megatron_ualm.errors import UserError
    from megatron_ualm.training.loop import pretrain
    from tiny_training import tiny_config
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ["RANK"])
    local = os.path.join(tmp, f"rank{rank}")
    if rank == 0:
        shutil.copytree(data_root, local, dirs_exist_ok=True)
    cfg = tiny_config(data_root, os.path.join(tmp, "run"),
                      f"data.train=[{{path: {local}/text, task: text_only}}]", "data.valid=[]")
    try:
        pretrain(cfg)
    except UserError as e:
        return str(e)
    return "no error"


# --- generate --------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("mistake", ["checkpoint_missing", "checkpoint_damaged", "weights_damaged",
                                     "config_malformed", "requests_missing", "setting_value", "setting_name",
                                     "run_setting", "tokenizer_missing", "tokenizer_moved"])
def test_generate_mistakes_are_one_line(inputs, tmp_path, mistake):
    export, tok = inputs["export"], f"{tmp_path}/tok"
    ckpt, requests = str(tmp_path / "ckpt"), str(tmp_path / "requests.jsonl")
    checkpoint, args, names = {  # --checkpoint, other arguments, what the line names
        "checkpoint_missing": (ckpt, [], ["--checkpoint", ckpt]),
        "checkpoint_damaged": (inputs["meg_bad"], [], ["--checkpoint", "meg_bad", ".distcp"]),
        "weights_damaged": (inputs["export_bad_weights"], [], ["export_bad_weights/model.safetensors"]),
        "config_malformed": (inputs["export_bad_config"], [], ["export_bad_config/ualm_config.json", "line 2"]),
        "requests_missing": (export, ["--requests", requests], ["--requests", requests]),  # the last one wins
        "setting_value": (export, ["guidance_scale=strong"], ["guidance_scale", "'strong'"]),
        "setting_name": (export, ["guidance=3"], ["guidance", "unknown generation setting", "guidance_scale"]),
        "run_setting": (export, ["precision=fp8"], ["precision", "fp8", "bf16"]),
        "tokenizer_missing": (export, [f"tokenizer={tok}"], ["tokenizer", tok]),
        "tokenizer_moved": (export, [], ["paths.tokenizer", "moved_tok", "pass tokenizer=DIR"]),
    }[mistake]
    proc = run_cli(GENERATE + ["--checkpoint", checkpoint, "--requests", inputs["requests"],
                               "--out", str(tmp_path / "out"), "device=cpu", *args], tmp_path)
    assert_one_line_error(proc, *names)
    assert not (tmp_path / "out").exists()


def test_bad_request_lines_still_get_error_records(tmp_path):
    """Only the request file as a whole is a user error; a bad line is one request's error."""
    from megatron_ualm.errors import UserError
    from megatron_ualm.inference.runner import read_requests
    path = tmp_path / "r.jsonl"
    path.write_text('{"id": "a", "prompt": "hi"}\n{"id": \n[1]\n')
    assert read_requests(str(path)) == [{"id": "a", "prompt": "hi"},
                                        {"_invalid": "line 2: Expecting value: line 1 column 8 (char 7)"},
                                        {"_invalid": "line 3: not a JSON object"}]
    path.write_text('[{"id": "a"},\n {"id": }]')
    with pytest.raises(UserError, match=r"r\.jsonl: line 2 column 9: not valid JSON"):
        read_requests(str(path))


# --- the converters --------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("mistake", ["hf_missing", "weights_damaged", "config_malformed", "setting_value",
                                     "encoder_missing"])
def test_hf_to_megatron_mistakes_are_one_line(inputs, tmp_path, mistake):
    missing, encoder = str(tmp_path / "Qwen2.5"), str(tmp_path / "whisper")
    hf, args, names = {  # --hf, other arguments, what the line names
        "hf_missing": (missing, [], [missing, "no such directory"]),
        "weights_damaged": (inputs["hf_bad_weights"], [], ["hf_bad_weights/model.safetensors"]),
        "config_malformed": (inputs["hf_bad_config"], [], ["hf_bad_config/config.json", "line"]),
        "setting_value": (inputs["hf"], ["model.init_method_std=small"], ["model.init_method_std", "'small'"]),
        "encoder_missing": (inputs["hf"], ["--encoder", "whisper", "--encoder-path", encoder], [encoder]),
    }[mistake]
    proc = run_cli(HF_TO_MEGATRON + ["--hf", hf, "--out", str(tmp_path / "out"), *args,
                                     "data.seq_length=128"], tmp_path)  # the tiny model has 256 positions
    assert_one_line_error(proc, *names)
    assert sorted(os.listdir(tmp_path)) == []  # nothing written, not even a temporary directory


@pytest.mark.slow
@pytest.mark.parametrize("mistake", ["checkpoint_missing", "checkpoint_damaged", "setting_value", "usage"])
def test_megatron_to_hf_mistakes_are_one_line(inputs, tmp_path, mistake):
    missing, out = str(tmp_path / "run"), ["--out", str(tmp_path / "out")]
    args, names = {  # arguments, what the line names
        "checkpoint_missing": (["--checkpoint", missing, *out], [missing]),
        "checkpoint_damaged": (["--checkpoint", inputs["meg_bad"], *out], ["meg_bad", ".distcp"]),
        "setting_value": (["--checkpoint", inputs["meg"], *out, "--max-shard-size", "5XB"],
                          ["--max-shard-size", "'5XB'"]),
        "usage": (["--checkpoint", inputs["meg"]], ["--out", "--help"]),
    }[mistake]
    proc = run_cli(MEGATRON_TO_HF + args, tmp_path)
    assert_one_line_error(proc, *names)
    assert sorted(os.listdir(tmp_path)) == []


def test_a_bug_keeps_its_traceback(capsys):
    """Only UserError is turned into one line; anything else is a bug and says where it is."""
    from megatron_ualm.cli import exit_on_user_error
    from megatron_ualm.errors import UserError

    @exit_on_user_error
    def main(kind):
        raise UserError("x.json: line 1\n  column 2: bad") if kind == "user" else KeyError("bug")

    assert main("user") == 2
    assert capsys.readouterr().err == "error: x.json: line 1; column 2: bad\n"
    with pytest.raises(KeyError):
        main("bug")
