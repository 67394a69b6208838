"""Typed configuration: defaults, YAML + overrides, examples, round trip, one-line errors."""
import glob
import os

import pytest

from megatron_ualm.config import (
    ConfigError, DatasetSpec, UALMConfig, load_config, parse_cli, save_config, tasks, to_dict,
    from_dict, validate,
)

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


def example(name: str) -> str:
    return os.path.join(EXAMPLES, name)


def write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# --- loading --------------------------------------------------------------------------------

def test_defaults_load_and_are_the_dataclass_defaults():
    cfg = load_config(None, [])
    assert cfg == UALMConfig()
    assert cfg.model.encoder.kind == "qwen2_5_omni"
    assert cfg.data.train == [] and cfg.data.seq_length == 4096
    assert cfg.model.head_dim == cfg.model.hidden_size // cfg.model.num_attention_heads


def test_yaml_then_overrides(tmp_path):
    path = write(tmp_path, "run.yaml", """
model:
  num_layers: 4
  encoder: {path: /models/omni}
data:
  train:
    - {path: d/text, task: text_only, weight: 2}
    - {path: d/tta, task: caption_to_audio}
optimizer:
  lr: 1e-4          # PyYAML reads this as a string; the float field accepts it
""")
    cfg = load_config(path, [
        "model.num_layers=8", "parallel.tensor_parallel=2", "model.encoder.path=null",
        "data.train[1].weight=0.5", "data.valid=[{path: d/v, task: audio_only}]",
        "checkpoint.experiment_dir=2024", "model.kv_channels=128", "training.freeze=['encoder.*']",
    ])
    assert cfg.model.num_layers == 8
    assert cfg.parallel.tensor_parallel == 2
    assert cfg.model.encoder.path is None
    assert cfg.data.train == [DatasetSpec("d/text", "text_only", 2.0), DatasetSpec("d/tta", "caption_to_audio", 0.5)]
    assert cfg.data.valid == [DatasetSpec("d/v", "audio_only", 1.0)]
    assert cfg.checkpoint.experiment_dir == "2024"       # str field keeps the literal text
    assert cfg.optimizer.lr == 1e-4 and isinstance(cfg.optimizer.lr, float)
    assert cfg.model.head_dim == 128
    assert cfg.training.freeze == ["encoder.*"]
    assert cfg.training.train_iters == UALMConfig().training.train_iters  # untouched default


def test_int_is_accepted_for_float():
    cfg = load_config(None, ["model.rotary_base=10000", "data.train=[{path: p, task: text_only, weight: 3}]"])
    assert cfg.model.rotary_base == 10000.0 and isinstance(cfg.model.rotary_base, float)
    assert isinstance(cfg.data.train[0].weight, float)


def test_base_inheritance_is_relative_and_deep(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path, "common.yaml", "model: {num_layers: 6, hidden_size: 128, num_attention_heads: 4, "
                                   "num_query_groups: 2}\ntraining: {train_iters: 7}\n")
    path = write(tmp_path / "sub", "size.yaml", "base: ../common.yaml\nmodel: {num_layers: 2}\n")
    cfg = load_config(path, [])
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.training.train_iters) == (2, 128, 7)


def test_parse_cli():
    cfg = parse_cli(["--config", example("tiny.yaml"), "model.num_layers=4", "training.train_iters=3"])
    assert cfg.model.num_layers == 4 and cfg.training.train_iters == 3
    assert cfg.parallel.device == "cpu"
    assert parse_cli([f"--config={example('tiny.yaml')}"]).model.hidden_size == 64
    with pytest.raises(ConfigError, match=r"^--verbose: unexpected argument"):
        parse_cli(["--verbose"])


# --- examples -------------------------------------------------------------------------------

@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(EXAMPLES, "*.yaml"))),
                         ids=os.path.basename)
def test_every_example_loads_and_validates(path):
    cfg = load_config(path, [])
    validate(cfg)
    tp, pp, cp = cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel, cfg.parallel.context_parallel
    validate(cfg, world_size=tp * pp * cp)                  # one data-parallel replica
    if os.path.basename(path).startswith("qwen2.5-"):
        validate(cfg, world_size=tp * pp * cp * 64)         # a 64-replica run splits the batch evenly


@pytest.mark.parametrize("name, shape", [
    ("qwen2.5-0.5b.yaml", (24, 896, 4864, 14, 2, 151936)),
    ("qwen2.5-1.5b.yaml", (28, 1536, 8960, 12, 2, 151936)),
    ("qwen2.5-3b.yaml", (36, 2048, 11008, 16, 2, 151936)),
    ("qwen2.5-7b.yaml", (28, 3584, 18944, 28, 4, 152064)),
])
def test_qwen_shapes(name, shape):
    m = load_config(example(name), []).model
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads,
            m.num_query_groups, m.text_vocab_size) == shape
    assert (m.rotary_base, m.norm_epsilon, m.max_position_embeddings) == (1e6, 1e-6, 32768)
    assert load_config(example(name), []).training.precision == "bf16"


def test_vocab_of_the_public_configuration():
    vocab = load_config(example("qwen2.5-1.5b.yaml"), []).model.vocab(pad_multiple=1)
    assert vocab.size == 256 + 151_936 + 8 * 1025 == 160_392
    assert vocab.padded_size == 160_392
    assert load_config(example("qwen2.5-1.5b.yaml"), []).model.vocab(128).padded_size % 128 == 0


def test_tiny_example_is_a_cpu_demo():
    cfg = load_config(example("tiny.yaml"), [])
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.data.seq_length) == (2, 64, 512)
    assert (cfg.parallel.device, cfg.training.precision) == ("cpu", "fp32")
    assert cfg.model.encoder.path is None


# --- round trip -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny.yaml", "qwen2.5-7b.yaml"])
def test_save_load_round_trip_is_exact(tmp_path, name):
    cfg = load_config(example(name), ["optimizer.adam_eps=1e-8", "model.encoder.tiny={d_model: 32}"])
    out = str(tmp_path / "ckpt" / "config.yaml")
    save_config(cfg, out)
    again = load_config(out, [])
    assert again == cfg
    assert to_dict(again) == to_dict(cfg)
    assert from_dict(UALMConfig, to_dict(cfg)) == cfg
    save_config(again, str(tmp_path / "again.yaml"))
    assert (tmp_path / "again.yaml").read_text() == (tmp_path / "ckpt" / "config.yaml").read_text()


def test_tasks_are_those_of_the_spec():
    # the seven of section 4, then reasoning (section 9); the order fixes the task ids; then the
    # paired preference sets of DPO (section 9), which hold caption_to_audio examples
    assert tasks() == ("text_only", "caption_to_audio", "audio_to_caption", "audio_to_conversation",
                       "audio_only", "transcription_to_speech", "speech_to_transcription", "reasoning", "preference")
    from megatron_ualm.formats.templates import TASKS
    assert tasks() == TASKS + ("preference",)


# --- errors: one line, naming the key and what is allowed -----------------------------------

DATA = "data.train=[{path: p, task: text_only}]"

ERRORS = [
    (["model.num_layer=3"], "model.num_layer: unknown key; allowed keys at 'model': num_layers, ",
     "(did you mean 'num_layers'?)"),
    (["modle.num_layers=3"], "modle: unknown key; allowed keys at top level: model, data, parallel",
     "(did you mean 'model'?)"),
    ([DATA, "data.train[0].wieght=2"], "data.train[0].wieght: unknown key; allowed keys at "
     "'data.train[0]': path, task, weight", "(did you mean 'weight'?)"),
    (["model.num_layers=abc"], "model.num_layers: expected int, got 'abc'", None),
    (["model.num_layers=2.5"], "model.num_layers: expected int, got 2.5", None),
    (["optimizer.lr=abc"], "optimizer.lr: expected a finite float, got 'abc'", None),
    (["optimizer.lr=.nan"], "optimizer.lr: expected a finite float, got nan", None),
    (["parallel.sequence_parallel=maybe"], "parallel.sequence_parallel: expected bool, got 'maybe'", None),
    (["model.kv_channels=x"], "model.kv_channels: expected int or null, got 'x'", None),
    (["data.train=p"], "data.train: expected list of mapping (section DatasetSpec), got 'p'", None),
    (["training.precision=fp16"], "training.precision: expected one of 'bf16', 'fp32', got 'fp16'", None),
    (["data.train=[{path: p, task: tts}]"], "data.train[0].task: expected one of 'text_only', "
     "'caption_to_audio'", "got 'tts'"),
    (["data.train=[{path: p}]"], "data.train[0].task: missing required key; expected one of 'text_only'", None),
    (["model.num_attention_heads=12", "parallel.tensor_parallel=5"],
     "parallel.tensor_parallel: must divide model.num_attention_heads=12, got 5 (allowed: 1, 2, 3, 4, 6, 12)", None),
    (["model.num_attention_heads=12", "model.num_query_groups=2", "parallel.tensor_parallel=4"],
     "parallel.tensor_parallel: must divide model.num_query_groups=2, got 4 (allowed: 1, 2)", None),
    (["model.num_query_groups=5"], "model.num_query_groups: must divide model.num_attention_heads=12", None),
    (["model.num_layers=28", "parallel.pipeline_parallel=3"],
     "parallel.pipeline_parallel: pipeline_parallel * virtual_pipeline_parallel = 3 must divide "
     "model.num_layers=28 (allowed products: 1, 2, 4, 7, 14, 28)", None),
    (["model.num_layers=28", "parallel.pipeline_parallel=2", "parallel.virtual_pipeline_parallel=4"],
     "parallel.pipeline_parallel: pipeline_parallel * virtual_pipeline_parallel = 8 must divide", None),
    (["model.num_layers=28", "parallel.pipeline_parallel=3", "parallel.first_stage_layers=9"],
     "parallel.first_stage_layers: with model.num_layers=28 and pipeline_parallel=3 the other 2 stage(s) must "
     "share the rest evenly, got 9 (allowed: [2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26])", None),
    (["model.num_layers=28", "parallel.pipeline_parallel=2", "parallel.first_stage_layers=28"],
     "parallel.first_stage_layers: with model.num_layers=28 and pipeline_parallel=2", "got 28"),
    (["parallel.first_stage_layers=1"],
     "parallel.first_stage_layers: needs parallel.pipeline_parallel > 1 without virtual_pipeline_parallel, "
     "got pipeline_parallel=1, virtual_pipeline_parallel=None; set it to null", None),
    (["parallel.virtual_pipeline_parallel=2"],
     "parallel.virtual_pipeline_parallel: needs parallel.pipeline_parallel > 1; allowed with "
     "pipeline_parallel=1: null", None),
    (["parallel.sequence_parallel=true"],
     "parallel.sequence_parallel: needs parallel.tensor_parallel > 1; allowed with tensor_parallel=1: false", None),
    (["training.micro_batch_size=3", "training.global_batch_size=8"],
     "training.global_batch_size: must be a multiple of training.micro_batch_size=3, got 8", None),
    (["model.hidden_size=0"], "model.hidden_size: must be > 0, got 0", None),
    (["training.micro_batch_size=-1"], "training.micro_batch_size: must be > 0, got -1", None),
    (["data.cfg_dropout_prob=1.0"], "data.cfg_dropout_prob: must be in [0, 1), got 1.0", None),
    (["data.cfg_dropout_prob=-0.1"], "data.cfg_dropout_prob: must be in [0, 1), got -0.1", None),
    (["data.train=[{path: p, task: text_only, weight: 0}]"], "data.train[0].weight: must be > 0, got 0.0", None),
    (["model.hidden_size=1000", "model.num_attention_heads=12", "model.num_query_groups=2"],
     "model.num_attention_heads: must divide model.hidden_size=1000 when model.kv_channels is null, "
     "got 12 (allowed: 1, 2, 4, 5, 8, 10,", None),
    (["data.seq_length=40000"], "data.seq_length: must be <= model.max_position_embeddings=32768, got 40000", None),
    (["optimizer.min_lr=1.0", "optimizer.lr=0.1"], "optimizer.min_lr: must be <= optimizer.lr=0.1, got 1.0", None),
    (["parallel.overlap_param_gather=true"], "parallel.overlap_param_gather: needs "
     "parallel.use_distributed_optimizer and parallel.overlap_grad_reduce both true", None),
    (["model.encoder.kind=hubert"], "model.encoder.kind: expected one of 'qwen2_5_omni', 'whisper', "
     "'none', got 'hubert'", None),
    (["model.encoder=3"], "model.encoder: expected mapping (section EncoderConfig), got 3", None),
    (["model.num_layers"], "'model.num_layers': expected an override of the form key=value", None),
    (["model..num_layers=2"], "model..num_layers: malformed key", None),
    ([DATA, "data.train[3].weight=2"], "data.train[3]: no such list item", None),
]


@pytest.mark.parametrize("overrides, start, tail", ERRORS, ids=lambda x: str(x)[:60])
def test_error_is_one_line_naming_the_key(overrides, start, tail):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(start), message
    if tail:
        assert message.endswith(tail) or tail in message, message
    assert isinstance(info.value, ValueError)


def test_errors_in_yaml_files_name_the_key(tmp_path):
    path = write(tmp_path, "bad.yaml", "training:\n  precision: fp16\n")
    with pytest.raises(ConfigError, match=r"^training\.precision: expected one of 'bf16', 'fp32', got 'fp16'$"):
        load_config(path, [])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "missing.yaml"), [])
    write(tmp_path, "a.yaml", "base: b.yaml\n")
    write(tmp_path, "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="^base: circular inheritance"):
        load_config(str(tmp_path / "a.yaml"), [])


def test_world_size_checks():
    cfg = load_config(None, ["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2",
                             "training.micro_batch_size=2", "training.global_batch_size=12"])
    validate(cfg, world_size=12)                      # dp = 3, 12 % (2 * 3) == 0
    with pytest.raises(ConfigError, match=r"^parallel: world size 6 is not a multiple of tensor_parallel \* "
                                          r"pipeline_parallel \* context_parallel = 4$"):
        validate(cfg, world_size=6)
    with pytest.raises(ConfigError, match=r"^training\.global_batch_size: must be a multiple of "
                                          r"micro_batch_size \* data_parallel = 2 \* 4 = 8, got 12$"):
        validate(cfg, world_size=16)
    with pytest.raises(ConfigError, match=r"^training\.global_batch_size"):
        load_config(None, ["training.global_batch_size=12"], world_size=8)
