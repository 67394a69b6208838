"""checkpoints_convert/prepare_pretrained.py: downloaded HF directories -> pretrained/ as the
example configs expect it -> an initial checkpoint; the audio tower extracted bit for bit
from a sharded full Qwen2.5-Omni checkpoint, reading nothing else; one-line refusals."""
from __future__ import annotations

import json
import os
import shlex
import shutil

import pytest
import torch
from safetensors.torch import save_file

from convert_utils import ROOT, make_hf_qwen2, read_safetensors_dir, script_main
AUDIO = "thinker.audio_tower."


def _make_omni(directory, encoder) -> dict:
    """A full Qwen2.5-Omni checkpoint in HF layout, two shards + index: the audio tower of
    ``encoder`` under thinker.audio_tower.* (spread over both shards) and stand-ins for the
    thinker's text model, the talker and token2wav under their real prefixes."""
    from transformers import Qwen2_5OmniConfig
    os.makedirs(directory)
    config = Qwen2_5OmniConfig(thinker_config={"audio_config": encoder.config.to_dict()})
    config.architectures = ["Qwen2_5OmniForConditionalGeneration"]
    config.to_json_file(os.path.join(directory, "config.json"))
    g = torch.Generator().manual_seed(1)
    audio = {AUDIO + k: v.detach().clone().contiguous() for k, v in encoder.state_dict().items()
             if not k.startswith("positional_embedding")}
    other = {"thinker.model.embed_tokens.weight": torch.randn(64, 32, generator=g),
             "thinker.model.layers.0.mlp.gate_proj.weight": torch.randn(48, 32, generator=g),
             "thinker.lm_head.weight": torch.randn(64, 32, generator=g),
             "talker.model.layers.0.self_attn.q_proj.weight": torch.randn(32, 32, generator=g).bfloat16(),
             "token2wav.code2wav_bigvgan_model.conv_pre.weight": torch.randn(16, 8, 7, generator=g)}
    names = list(audio)
    shards = [{**{n: audio[n] for n in names[::2]}, **dict(list(other.items())[:3])},
              {**{n: audio[n] for n in names[1::2]}, **dict(list(other.items())[3:])}]
    weight_map = {}
    for i, tensors in enumerate(shards):
        file = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file(tensors, os.path.join(directory, file), metadata={"format": "pt"})
        weight_map.update({n: file for n in tensors})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return {**audio, **other}


@pytest.fixture(scope="module")
def downloads(tmp_path_factory):
    """The directories a user would have downloaded, tiny."""
    from megatron_ualm.audio.codec import save_tiny_codec
    from megatron_ualm.data.tokenizer import train_tiny_tokenizer
    from megatron_ualm.model.audio_encoder import build_hf_encoder
    root = tmp_path_factory.mktemp("downloads")
    backbone = make_hf_qwen2(str(root / "Qwen2.5-1.5B"), tied=False, kv_heads=2)
    train_tiny_tokenizer(["hello world, a tiny tokenizer for a tiny model"] * 4, backbone, vocab_size=300)
    codec = save_tiny_codec(root / "xcodec-hubert-general", num_codebooks=8, codebook_size=1024)
    torch.manual_seed(7)
    encoder, _ = build_hf_encoder("qwen2_5_omni", None)
    omni = str(root / "Qwen2.5-Omni-7B")
    tensors = _make_omni(omni, encoder)
    return {"root": root, "backbone": backbone, "codec": codec, "omni": omni, "omni_tensors": tensors}


def _prepare(capsys, *args):
    rc = script_main("prepare_pretrained")([*args, "--no-progress"])
    out, err = capsys.readouterr()
    return rc, out, err


def test_layout_matches_the_configs_and_converts(downloads, tmp_path, monkeypatch, capsys):
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniAudioEncoder
    from megatron_ualm.config import load_config
    from megatron_ualm.convert.dist_format import DistCheckpointReader
    from megatron_ualm.convert.encoder_weights import open_encoder
    monkeypatch.chdir(tmp_path)
    rc, out, err = _prepare(capsys, "--backbone", downloads["backbone"], "--codec", downloads["codec"],
                            "--encoder", downloads["omni"], "--name", "qwen2.5-1.5b", "--max-shard-gb",
                            str(20_000 / 2**30))
    print(out)
    assert rc == 0, err
    # every path examples/qwen2.5-1.5b.yaml names is there
    cfg = load_config(os.path.join(ROOT, "examples", "qwen2.5-1.5b.yaml"))
    for key, path in (("paths.backbone", cfg.paths.backbone), ("paths.tokenizer", cfg.paths.tokenizer),
                      ("paths.codec", cfg.paths.codec), ("model.encoder.path", cfg.model.encoder.path)):
        assert os.path.isfile(os.path.join(path, "config.json")), key
    # backbone and codec: links to the downloaded files
    for src, dst in ((downloads["backbone"], cfg.paths.backbone), (downloads["codec"], cfg.paths.codec)):
        assert sorted(os.listdir(dst)) == sorted(os.listdir(src))
        assert all(os.path.realpath(os.path.join(dst, f)) == os.path.realpath(os.path.join(src, f))
                   for f in os.listdir(src))
    # the encoder: exactly the audio tower, bit for bit, sharded, standalone config
    enc_dir = cfg.model.encoder.path
    files = sorted(os.listdir(enc_dir))
    assert "model.safetensors.index.json" in files and "model-00002-of-" in " ".join(files)
    with open(os.path.join(enc_dir, "config.json")) as f:
        assert json.load(f)["model_type"] == "qwen2_5_omni_audio_encoder"
    extracted = read_safetensors_dir(enc_dir)
    originals = {k[len(AUDIO):]: v for k, v in downloads["omni_tensors"].items() if k.startswith(AUDIO)}
    assert sorted(extracted) == sorted(originals)
    for name, value in originals.items():
        assert extracted[name].dtype == value.dtype and torch.equal(extracted[name], value), name
    alone = Qwen2_5OmniAudioEncoder.from_pretrained(enc_dir)
    state = alone.state_dict()
    assert all(torch.equal(state[k], v) for k, v in originals.items())
    weights = open_encoder("qwen2_5_omni", enc_dir)
    assert weights.width == alone.config.output_dim
    weights.close()
    # the summary names the next command; it runs as printed (plus the tiny model's sequence length)
    next_line = next(line for line in out.splitlines() if line.strip().startswith("next"))
    command = shlex.split(next_line.split("next", 1)[1])
    assert command[:2] == ["python", "checkpoints_convert/hf_to_megatron.py"]
    assert "examples/qwen2.5-1.5b.yaml" in command and "checkpoints/qwen2.5-1.5b-init" in command
    args = [os.path.join(ROOT, a) if a.startswith("examples/") else a for a in command[2:]]
    rc = script_main("hf_to_megatron")(args + ["--no-progress", "data.seq_length=128"])
    conv_out, err = capsys.readouterr()
    assert rc == 0, err
    print(conv_out)
    meg = tmp_path / "checkpoints" / "qwen2.5-1.5b-init"
    reader = DistCheckpointReader(str(meg / "checkpoints" / "iter_0000000"))
    for name, value in originals.items():
        assert torch.equal(reader.read([(f"audio_encoder.encoder.{name}", None)])[0], value), name
    assert load_config(str(meg / "config.yaml")).model.encoder.path == str(meg / "audio_encoder")


def test_only_the_audio_tower_is_read(downloads, tmp_path, monkeypatch):
    """Extraction materialises the audio-tower tensors and nothing else of the full model."""
    from megatron_ualm.convert import hf_io
    from megatron_ualm.convert.prepare import PrepareOptions, prepare_pretrained
    read = []
    real_safe_open = hf_io.safe_open

    class Recording:
        def __init__(self, path, **kw):
            self.inner = real_safe_open(path, **kw)

        def __enter__(self):
            self.handle = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.handle.keys()

        def get_slice(self, name):
            return self.handle.get_slice(name)

        def get_tensor(self, name):
            read.append(name)
            return self.handle.get_tensor(name)

    monkeypatch.setattr(hf_io, "safe_open", Recording)
    _, parts = prepare_pretrained(PrepareOptions(encoder=downloads["omni"], out=str(tmp_path / "p"),
                                                 show_progress=False))
    audio = sorted(k for k in downloads["omni_tensors"] if k.startswith(AUDIO))
    assert sorted(read) == audio  # each audio tensor once, no other tensor
    assert parts[0].dtypes == {"float32": len(audio)}


def _make_whisper(directory):
    from transformers import WhisperConfig, WhisperForConditionalGeneration
    config = WhisperConfig(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                           decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=100,
                           num_mel_bins=128, max_source_positions=1500, max_target_positions=32,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    WhisperForConditionalGeneration(config).save_pretrained(directory)
    return "model.encoder.", "whisper-encoder"


def _make_audio_flamingo3(directory):
    """AF-Whisper inside a (tiny) Audio Flamingo 3 model: tensors audio_tower.*."""
    from transformers import AudioFlamingo3Config, AudioFlamingo3ForConditionalGeneration
    config = AudioFlamingo3Config(
        audio_config={"model_type": "audioflamingo3_encoder", "hidden_size": 32, "num_hidden_layers": 1,
                      "num_attention_heads": 2, "intermediate_size": 64},
        text_config={"model_type": "qwen2", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "num_key_value_heads": 1, "intermediate_size": 64, "vocab_size": 200}, audio_token_id=5)
    AudioFlamingo3ForConditionalGeneration(config).save_pretrained(directory)
    return "audio_tower.", "af-whisper-encoder"


@pytest.mark.parametrize("make", [_make_whisper, _make_audio_flamingo3], ids=["whisper", "audio_flamingo3"])
def test_whisper_encoder_is_extracted(tmp_path, capsys, make):
    from transformers.models.whisper.modeling_whisper import WhisperEncoder
    from megatron_ualm.convert.encoder_weights import open_encoder
    torch.manual_seed(3)
    prefix, name = make(str(tmp_path / "src"))
    source = read_safetensors_dir(str(tmp_path / "src"))
    rc, out, err = _prepare(capsys, "--encoder", str(tmp_path / "src"), "--out", str(tmp_path / "p"))
    assert rc == 0, err
    print(out)
    target = str(tmp_path / "p" / name)
    assert f"model.encoder.kind=whisper model.encoder.path={target}" in out
    with open(os.path.join(target, "config.json")) as f:
        assert json.load(f)["model_type"] == "whisper"
    expected = {k[len(prefix):]: v for k, v in source.items() if k.startswith(prefix)}
    assert sorted(read_safetensors_dir(target)) == sorted(expected)
    state = WhisperEncoder.from_pretrained(target).state_dict()
    assert all(torch.equal(state[k], v) for k, v in expected.items())
    for directory in (target, str(tmp_path / "src")):  # hf_to_megatron --encoder whisper reads either
        weights = open_encoder("whisper", directory)
        assert weights.width == 32 and torch.equal(weights.get("conv1.weight"), expected["conv1.weight"])
        weights.close()


def test_backbone_size_names_match_the_example_configs():
    from megatron_ualm.config import load_config
    from megatron_ualm.convert.prepare import BACKBONE_SIZES, backbone_name
    for (hidden, layers), size in BACKBONE_SIZES.items():
        cfg = load_config(os.path.join(ROOT, "examples", f"qwen2.5-{size}.yaml"))
        assert (cfg.model.hidden_size, cfg.model.num_layers) == (hidden, layers)
        name = backbone_name({"hidden_size": hidden, "num_hidden_layers": layers}, "d")
        assert cfg.paths.backbone == cfg.paths.tokenizer == f"pretrained/{name}"


# --- refusals ----------------------------------------------------------------------------------
def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _edit_json(path, **changes):
    with open(path) as f:
        doc = json.load(f)
    doc.update(changes)
    with open(path, "w") as f:
        json.dump(doc, f)


def _missing_shard(d, tmp):
    omni = _copy(d["omni"], tmp / "omni")
    os.remove(os.path.join(omni, "model-00002-of-00002.safetensors"))
    return ["--encoder", omni], [omni, "model-00002-of-00002.safetensors", "missing", "fetch"]


def _wrong_model_type(d, tmp):
    codec = _copy(d["codec"], tmp / "codec")
    _edit_json(os.path.join(codec, "config.json"), model_type="encodec")
    return ["--codec", codec], [codec + "/config.json", "'encodec'", "XcodecModel"]


def _shape_mismatch(d, tmp):
    backbone = _copy(d["backbone"], tmp / "qwen")
    _edit_json(os.path.join(backbone, "config.json"), intermediate_size=128)
    return ["--backbone", backbone, "--name", "x"], [backbone, "shape mismatch", "mlp"]


def _encoder_shape_mismatch(d, tmp):
    omni = _copy(d["omni"], tmp / "omni")
    path = os.path.join(omni, "config.json")
    with open(path) as f:
        doc = json.load(f)
    doc["thinker_config"]["audio_config"]["encoder_ffn_dim"] = 96
    with open(path, "w") as f:
        json.dump(doc, f)
    return ["--encoder", omni], [omni, "shape mismatch", "fc1"]


def _missing_tokenizer(d, tmp):
    backbone = _copy(d["backbone"], tmp / "qwen")
    os.remove(os.path.join(backbone, "tokenizer.json"))
    return ["--backbone", backbone, "--name", "x"], [backbone, "tokenizer.json", "tokenizer files"]


def _integer_weights(d, tmp):
    codec = _copy(d["codec"], tmp / "codec")
    tensors = read_safetensors_dir(codec)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].to(torch.int8)
    save_file(tensors, os.path.join(codec, "model.safetensors"), metadata={"format": "pt"})
    return ["--codec", codec], [codec, name, "torch.int8", "unquantized"]


def _unknown_size(d, tmp):
    return ["--backbone", d["backbone"]], [d["backbone"], "hidden_size=64", "--name"]


@pytest.mark.parametrize("mistake", [_missing_shard, _wrong_model_type, _shape_mismatch, _encoder_shape_mismatch,
                                     _missing_tokenizer, _integer_weights, _unknown_size],
                         ids=lambda f: f.__name__.strip("_"))
def test_refusals_are_one_line_and_write_nothing(downloads, tmp_path, capsys, mistake):
    args, names = mistake(downloads, tmp_path / "in")
    out_dir = tmp_path / "pretrained"
    rc, _, err = _prepare(capsys, *args, "--out", str(out_dir))
    print(err)
    assert rc == 2 and err.startswith("error: ") and len(err.splitlines()) == 1
    for name in names:
        assert name in err, name
    assert not out_dir.exists() or os.listdir(out_dir) == []


def test_existing_part_needs_overwrite(downloads, tmp_path, capsys):
    args = ["--codec", downloads["codec"], "--out", str(tmp_path / "p")]
    assert _prepare(capsys, *args)[0] == 0
    rc, _, err = _prepare(capsys, *args)
    assert rc == 2 and "xcodec-hubert-general" in err and "--overwrite" in err
    rc, out, _ = _prepare(capsys, *args, "--copy", "--overwrite")
    assert rc == 0 and "copied" in out
    assert not os.path.islink(tmp_path / "p" / "xcodec-hubert-general" / "config.json")


def test_trainer_from_scratch_needs_encoder_path_or_random_init():
    from megatron_ualm.config import UALMConfig
    from megatron_ualm.training.preflight import check_run_inputs
    cfg = UALMConfig()
    assert any(p.startswith("model.encoder.path: null") and "random_init" in p and "prepare_pretrained" in p
               for p in check_run_inputs(cfg))
    cfg.model.encoder.random_init = True
    assert not any("random_init" in p for p in check_run_inputs(cfg))
