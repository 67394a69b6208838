"""`python -m megatron_ualm.train --help` / `--print-config`, and the settings they list."""
import dataclasses
import os
import subprocess
import sys
import typing

import pytest
import yaml

from megatron_ualm import demo
from megatron_ualm.config import UALMConfig, load_config, to_dict
from megatron_ualm.config_help import field_comments, settings
from megatron_ualm.config_loader import read_yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "examples", "tiny.yaml")


def _train(*args, cwd=ROOT):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "megatron_ualm.train", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=120)


def _leaf_keys(cls, prefix=""):
    """Every leaf key of the dataclass tree, walked independently of config_help."""
    out = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            out += _leaf_keys(tp, f"{prefix}{f.name}.")
            continue
        out.append(prefix + f.name)
        args = typing.get_args(tp)
        if typing.get_origin(tp) is list and args and dataclasses.is_dataclass(args[0]):
            out += _leaf_keys(args[0], f"{prefix}{f.name}[N].")
    return out


def test_comments_come_from_the_source_including_continuation_lines():
    from megatron_ualm.config import CheckpointConfig, DataConfig, ModelConfig, OptimizerConfig, TrainingConfig
    t = field_comments(TrainingConfig)
    assert t["gc_freeze"] == ("after the first step, exclude the objects alive then (model, optimizer, "
                              "compiled code) from Python's GC scans: shorter pauses")
    assert t["cuda_graphs"].endswith("else eager, and the log says why)") and t["train_iters"] == "optimizer steps"
    c = field_comments(CheckpointConfig)
    assert c["expand_vocab"].startswith("`load` may have fewer text rows") \
        and c["expand_vocab"].endswith("Off: any vocabulary difference is refused")
    assert "async_save" not in c["expand_vocab"] and c["async_save"].endswith("are synchronous)")
    d = field_comments(DataConfig)  # continuation aligned with the other fields' comments, not its own
    assert d["schedule"] == ("curriculum: blend weights over iterations, replacing data.train's weights; "
                             "empty: fixed blend")
    assert field_comments(OptimizerConfig)["adam_beta1"] == ""  # no comment: none invented
    assert field_comments(ModelConfig)["encoder"] == ""


def test_settings_cover_the_tree_with_defaults_types_and_choices():
    found = {s.key: s for s in settings(UALMConfig)}
    assert sorted(found) == sorted(_leaf_keys(UALMConfig)) and len(found) == len(settings(UALMConfig))
    s = found["model.audio_head"]
    assert (s.default, s.type) == ("codebook", "one of 'codebook', 'all_audio'")
    assert s.section_doc == "Decoder shapes (Qwen2 architecture) and the UALM audio heads."
    assert (found["model.kv_channels"].default, found["model.kv_channels"].type) == ("null", "int or null")
    assert (found["data.train[N].path"].default, found["data.train[N].task"].type.split(",")[0]) \
        == ("required", "one of 'text_only'")
    assert found["training.gc_freeze"].default == "true"
    assert found["model.encoder.tiny"].default == "{}"
    # The printed default is the dataclass default: parse it back and compare.
    defaults = to_dict(UALMConfig())
    for key in ("model.num_layers", "optimizer.lr", "checkpoint.experiment_dir", "parallel.device"):
        section, name = key.split(".")
        assert yaml.safe_load(found[key].default) == defaults[section][name]


def test_help_lists_every_setting_and_usage():
    out = _train("--help")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert text.startswith("usage: python -m megatron_ualm.train [--config PATH.yaml] [--print-config] key=value")
    for s in settings(UALMConfig):
        assert f"  {s.key} = {s.default}  ({s.type})" in text
    joined = " ".join(text.split())
    assert "after the first step, exclude the objects alive then (model, optimizer, compiled code)" in joined
    assert "recompute = none (one of 'none', 'selective', 'full')" in joined
    assert "AdamW with linear warmup" in text and "--print-config" in text and out.stderr == ""
    # The examples in the help run as written (as --print-config).
    examples = [line.strip() for line in text.split("examples:\n")[1].split("\n\n")[0].replace("\\\n", "").splitlines()]
    assert len(examples) == 3
    for line in examples:
        args = line.split(" megatron_ualm.train ")[1].split()
        got = _train(*[a for a in args if a != "--print-config"], "--print-config")
        assert got.returncode == 0, (line, got.stderr)


def test_print_config_is_the_resolved_validated_yaml(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text(f"base: {TINY}\ntraining:\n  train_iters: 77\n")
    out = _train("--config", str(child), "optimizer.lr=5e-4", "data.train[1].weight=2.5", "--print-config",
                 cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    printed = yaml.safe_load(out.stdout)
    want = load_config(str(child), ["optimizer.lr=5e-4", "data.train[1].weight=2.5"])
    assert printed == to_dict(want)
    assert printed["training"]["train_iters"] == 77 and printed["model"]["hidden_size"] == 64
    assert printed["optimizer"]["lr"] == 5e-4 and printed["data"]["train"][1]["weight"] == 2.5
    assert not os.path.exists(tmp_path / "runs")  # started nothing, wrote nothing
    bad = _train("--config", TINY, "training.train_iters=0", "--print-config")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip() == "error: training.train_iters: must be > 0, got 0"


def test_tiny_yaml_reads_the_datasets_where_the_demo_writes_them():
    cfg = load_config(TINY)
    assert cfg.data.train
    for spec in cfg.data.train:
        assert spec.path == os.path.join(demo.DEMO_WORKDIR, demo.DEMO_TOKENIZED, spec.task)
    raw = read_yaml(TINY)
    assert all(not os.path.isabs(d["path"]) for d in raw["data"]["train"])


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_needs_no_valid_config(flag):
    out = _train("--config", "missing.yaml", "bogus.key=1", flag)
    assert out.returncode == 0 and "settings (" in out.stdout
