"""HF <-> Megatron checkpoint conversion, single process: exactness, logits, refusals."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from dist_utils import run_distributed
from convert_utils import (K, assert_hf_roundtrip_exact, make_hf_qwen2, read_safetensors_dir, script_main,
                           ualm_cfg)


@pytest.fixture(scope="module")
def runtime():
    from megatron_ualm.runtime import init_runtime, shutdown_runtime
    rt = init_runtime(device="cpu", seed=5)
    yield rt
    shutdown_runtime()


def _convert(hf_dir, out, **kw):
    from megatron_ualm.convert import convert_hf_to_megatron
    cfg = kw.pop("cfg", None) or ualm_cfg(kw.pop("encoder", "none"), random_init="encoder_path" not in kw)
    return convert_hf_to_megatron(str(hf_dir), str(out), cfg, show_progress=False, **kw)


def _export(ckpt, out, **kw):
    from megatron_ualm.convert import convert_megatron_to_hf
    return convert_megatron_to_hf(str(ckpt), str(out), show_progress=False, **kw)


def _load_megatron(experiment_dir):
    """UALMModel (TP=1) loaded through the trainer's load_checkpoint, strict."""
    from megatron_ualm.config import load_config
    from megatron_ualm.model.transformer_config import transformer_config_from
    from megatron_ualm.model.ualm_model import UALMModel
    from megatron_ualm.training.checkpoint import load_checkpoint
    cfg = load_config(os.path.join(experiment_dir, "config.yaml"))
    model = UALMModel(cfg.model, transformer_config_from(cfg.model, None, "fp32"))
    load_checkpoint(str(experiment_dir), [model], strict=True)
    return model.eval(), cfg


# --- exactness -------------------------------------------------------------------------------------
def test_checkpoint_equals_hf_adapter_and_loads_strictly(tmp_path, runtime):
    from transformers import Qwen2ForCausalLM
    from megatron_ualm.model.hf_adapter import hf_to_ualm, qwen2_shape
    hf_dir = make_hf_qwen2(str(tmp_path / "hf"), tied=True, kv_heads=2)
    report = _convert(hf_dir, tmp_path / "meg", encoder="qwen2_5_omni", seed=3)
    print(report.format())
    model, cfg = _load_megatron(tmp_path / "meg")
    hf = Qwen2ForCausalLM.from_pretrained(hf_dir)
    full = hf_to_ualm(hf.state_dict(), qwen2_shape(hf.config), model.vocab,
                      init_std=cfg.model.init_method_std, seed=3)
    state = model.state_dict()
    for name, value in full.items():
        assert torch.equal(state[name], value), name
    assert torch.count_nonzero(state["embedding.word_embeddings.weight"][0]) == 0
    assert cfg.checkpoint.load.endswith("checkpoints/iter_0000000")
    assert cfg.model.num_codebooks == K and cfg.model.num_layers == 2 and cfg.model.text_vocab_size == 300


@pytest.mark.parametrize("tied,kv_heads,dtype", [(True, 2, torch.float32), (False, 4, torch.float32),
                                                 (True, 4, torch.bfloat16)])
def test_hf_megatron_hf_is_bit_exact(tmp_path, tied, kv_heads, dtype):
    hf_dir = make_hf_qwen2(str(tmp_path / "hf"), tied=tied, kv_heads=kv_heads, dtype=dtype)
    _convert(hf_dir, tmp_path / "meg")
    report = _export(tmp_path / "meg", tmp_path / "out")
    print(report.format())
    assert_hf_roundtrip_exact(hf_dir, str(tmp_path / "out"), tied)
    with open(tmp_path / "out" / "config.json") as f:
        config = json.load(f)
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["vocab_size"] == 256 + 300
    assert config["tie_word_embeddings"] is False
    extras = read_safetensors_dir(str(tmp_path / "out"), ["ualm_extras.safetensors"])
    assert "special_embedding" not in extras and extras["audio_embedding"].shape == (K * 17, 64)
    backbone = read_safetensors_dir(str(tmp_path / "out"), ["model.safetensors"])
    assert torch.count_nonzero(backbone["model.embed_tokens.weight"][0]) == 0  # <|pad|> embeds to zero


def test_sharded_export_loads_in_transformers(tmp_path):
    from transformers import Qwen2ForCausalLM
    hf_dir = make_hf_qwen2(str(tmp_path / "hf"), tied=False, kv_heads=2)
    _convert(hf_dir, tmp_path / "meg")
    _export(tmp_path / "meg", tmp_path / "out", max_shard_bytes=60_000)
    files = sorted(os.listdir(tmp_path / "out"))
    assert "model.safetensors.index.json" in files and "model-00001-of-" in " ".join(files)
    assert_hf_roundtrip_exact(hf_dir, str(tmp_path / "out"), tied=False)
    model = Qwen2ForCausalLM.from_pretrained(str(tmp_path / "out"))
    ref = Qwen2ForCausalLM.from_pretrained(hf_dir)
    for (n, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a[256:] if n in ("model.embed_tokens.weight", "lm_head.weight") else a, b), n


# --- logits ----------------------------------------------------------------------------------------
def _transformers_logits(directory, text):
    from transformers import Qwen2ForCausalLM
    model = Qwen2ForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(input_ids=text).logits


def test_exported_backbone_gives_megatron_stream0_logits(tmp_path, runtime):
    from megatron_ualm.convert import load_ualm_from_hf
    from megatron_ualm.formats.vocab import PAD
    hf_dir = make_hf_qwen2(str(tmp_path / "hf"), tied=False, kv_heads=2, seed=1)
    _convert(hf_dir, tmp_path / "meg", encoder="qwen2_5_omni")
    _export(tmp_path / "meg", tmp_path / "out")
    megatron, cfg = _load_megatron(tmp_path / "meg")

    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, 300, (2, 24), generator=g)
    tokens = torch.full((2, 24, K), PAD, dtype=torch.long)
    tokens[..., 0] = text + 256
    positions = torch.arange(24).expand(2, 24)
    tokens[:, 0, 0] = 1  # <|bos|>: the HF ids are the unified ids, special rows included
    with torch.no_grad():
        l0, _ = megatron.logits(tokens, positions)
        ours = l0[..., :256 + 300]
    # transformers in a fresh process: after init_runtime(device="cpu") its RoPE buffers come
    # out of from_pretrained uninitialised (cpu_compat's torch factory patches)
    theirs = run_distributed(_transformers_logits, 1, str(tmp_path / "out"), tokens[..., 0])[0]
    diff = (ours - theirs).abs().max().item()
    cos = torch.nn.functional.cosine_similarity(ours.reshape(-1, 556), theirs.reshape(-1, 556), dim=-1)
    top1 = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    print(f"stream-0 logits vs transformers: max abs diff {diff:.2e}, "
          f"min cosine {cos.min().item():.8f}, top-1 agreement {top1:.4f}")
    assert diff < 1e-4 and top1 == 1.0

    rebuilt, rcfg = load_ualm_from_hf(str(tmp_path / "out"))
    assert rcfg.model.num_codebooks == K
    with torch.no_grad():
        r0, rk = rebuilt.logits(tokens, positions)
        m0, mk = megatron.logits(tokens, positions)
    vocab_size = megatron.vocab.size
    assert torch.equal(r0[..., :vocab_size], m0[..., :vocab_size]) and torch.equal(rk, mk)
    enc_a = dict(rebuilt.audio_encoder.named_parameters())
    for name, p in megatron.audio_encoder.named_parameters():
        assert torch.equal(enc_a[name], p), name


# --- encoder weights from a Qwen2.5-Omni directory ---------------------------------------------------
def test_encoder_from_omni_directory(tmp_path, runtime):
    from megatron_ualm.convert.dist_format import DistCheckpointReader
    from megatron_ualm.model.audio_encoder import build_hf_encoder
    torch.manual_seed(7)
    enc, _ = build_hf_encoder("qwen2_5_omni", None)
    omni = tmp_path / "omni"
    omni.mkdir()
    save_file({f"thinker.audio_tower.{k}": v.contiguous() for k, v in enc.state_dict().items()},
              str(omni / "model.safetensors"))
    (omni / "config.json").write_text(json.dumps({"model_type": "qwen2_5_omni",
                                                  "thinker_config": {"audio_config": enc.config.to_dict()}}))
    hf_dir = make_hf_qwen2(str(tmp_path / "hf"), tied=True, kv_heads=2)
    _convert(hf_dir, tmp_path / "meg", encoder="qwen2_5_omni", encoder_path=str(omni))
    reader = DistCheckpointReader(str(tmp_path / "meg" / "checkpoints" / "iter_0000000"))
    for name, value in enc.state_dict().items():
        assert torch.equal(reader.read([(f"audio_encoder.encoder.{name}", None)])[0], value), name
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniAudioEncoder
    alone = Qwen2_5OmniAudioEncoder.from_pretrained(str(tmp_path / "meg" / "audio_encoder"))
    assert all(torch.equal(alone.state_dict()[k], v) for k, v in enc.state_dict().items())
    model, cfg = _load_megatron(tmp_path / "meg")  # builds the encoder from <out>/audio_encoder
    assert cfg.model.encoder.path == str(tmp_path / "meg" / "audio_encoder")
    _export(tmp_path / "meg", tmp_path / "out")
    extras = read_safetensors_dir(str(tmp_path / "out"), ["ualm_extras.safetensors"])
    for name, value in enc.state_dict().items():
        assert torch.equal(extras[f"audio_encoder.encoder.{name}"], value), name


# --- refusals --------------------------------------------------------------------------------------
def _rewrite(hf_dir, edit):
    path = os.path.join(hf_dir, "model.safetensors")
    tensors = read_safetensors_dir(hf_dir)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _edit_config(hf_dir, **changes):
    path = os.path.join(hf_dir, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump(config, f)


@pytest.fixture
def hf_dir(tmp_path):
    return make_hf_qwen2(str(tmp_path / "hf"), tied=False, kv_heads=2)


def _refused(match, fn, *args, **kw):
    from megatron_ualm.convert import ConversionError
    with pytest.raises(ConversionError, match=match) as info:
        fn(*args, **kw)
    print("refused:", info.value)
    return info.value


def test_refuses_missing_tensor(hf_dir, tmp_path):
    _rewrite(hf_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    _refused(r"missing, e\.g\. \['model\.layers\.1\.mlp\.up_proj\.weight'\]", _convert, hf_dir, tmp_path / "o")
    assert not os.path.exists(tmp_path / "o")


def test_refuses_extra_tensor(hf_dir, tmp_path):
    _rewrite(hf_dir, lambda t: t.update({"model.layers.2.mlp.up_proj.weight": torch.zeros(96, 64)}))
    _refused(r"not part of a Qwen2ForCausalLM.*model\.layers\.2\.mlp\.up_proj", _convert, hf_dir, tmp_path / "o")


def test_refuses_shape_mismatch(hf_dir, tmp_path):
    _edit_config(hf_dir, intermediate_size=100)
    _refused(r"shape mismatch: .*gate_proj\.weight: \(96, 64\) \(config says \(100, 64\)\)",
             _convert, hf_dir, tmp_path / "o")


def test_refuses_unknown_architecture(hf_dir, tmp_path):
    _edit_config(hf_dir, model_type="llama", architectures=["LlamaForCausalLM"])
    _refused(r"model_type 'llama'.*only Qwen2", _convert, hf_dir, tmp_path / "o")


def test_refuses_tp_that_does_not_divide_heads(hf_dir, tmp_path):
    _refused(r"tensor parallel size 3 does not divide num_attention_heads=4.*allowed sizes: \[1, 2, 4\]",
             _convert, hf_dir, tmp_path / "o", tensor_parallel=3)
    _refused(r"tensor parallel size 4 does not divide num_key_value_heads=2",
             _convert, hf_dir, tmp_path / "o", tensor_parallel=4)


def test_real_encoder_needs_a_path_or_random_init(hf_dir, tmp_path, capsys):
    """A real encoder kind without weights is refused (no silent random encoder); the random
    tiny one only with model.encoder.random_init, never together with a path."""
    from megatron_ualm.config import ConfigError, load_config, validate
    err = _refused(r"model\.encoder\.kind=qwen2_5_omni but no encoder weights: set model\.encoder\.path",
                   _convert, hf_dir, tmp_path / "o", cfg=ualm_cfg("qwen2_5_omni", random_init=False))
    assert "prepare_pretrained.py" in str(err) and "model.encoder.random_init=true" in str(err)
    assert not os.path.exists(tmp_path / "o")
    rc = script_main("hf_to_megatron")(["--hf", hf_dir, "--out", str(tmp_path / "o"), "--num-codebooks", "4",
                                 "--codebook-size", "16", "--no-progress", "data.seq_length=128"])
    line = capsys.readouterr().err
    assert rc == 2 and len(line.splitlines()) == 1 and "model.encoder.path" in line and "prepare_pretrained" in line
    _refused(r"--encoder-path .* model\.encoder\.random_init=true", _convert, hf_dir, tmp_path / "o",
             encoder_path=str(tmp_path), cfg=ualm_cfg("qwen2_5_omni"))
    cfg = ualm_cfg("qwen2_5_omni")
    cfg.model.encoder.path = "pretrained/qwen2.5-omni-audio-encoder"
    with pytest.raises(ConfigError, match=r"model\.encoder\.random_init: true .*path=pretrained"):
        validate(cfg)
    _convert(hf_dir, tmp_path / "meg", encoder="qwen2_5_omni")
    saved = load_config(str(tmp_path / "meg" / "config.yaml")).model.encoder
    assert saved.random_init and saved.path is None


def test_refuses_partial_or_damaged_checkpoint(hf_dir, tmp_path):
    _convert(hf_dir, tmp_path / "meg")
    iter_dir = tmp_path / "meg" / "checkpoints" / "iter_0000000"
    data = sorted(f for f in os.listdir(iter_dir) if f.endswith(".distcp"))[0]
    with open(iter_dir / data, "ab") as f:
        f.write(b"junk")
    _refused(r"refusing to load .*size|bytes on disk", _export, iter_dir, tmp_path / "o1")
    os.remove(iter_dir / "COMPLETE")
    _refused(r"no COMPLETE marker", _export, iter_dir, tmp_path / "o2")
    _refused(r"no complete checkpoint", _export, tmp_path / "meg", tmp_path / "o3")
    assert not os.path.exists(tmp_path / "o1") and not os.path.exists(tmp_path / "o2")


def test_output_is_never_half_written(hf_dir, tmp_path, monkeypatch):
    from megatron_ualm.convert import hf_to_megatron
    out = tmp_path / "meg"
    _convert(hf_dir, out)
    before = sorted(os.listdir(out))
    _refused(r"exists and is not empty.*--overwrite", _convert, hf_dir, out)

    def crash(directory, *a, **k):  # dies after writing part of the new checkpoint
        os.makedirs(directory)
        open(os.path.join(directory, "__0_0.distcp"), "w").close()
        raise RuntimeError("disk full")
    monkeypatch.setattr(hf_to_megatron, "write_dist_checkpoint", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        _convert(hf_dir, out, overwrite=True)
    assert sorted(os.listdir(out)) == before and sorted(os.listdir(tmp_path)) == ["hf", "meg"]
    monkeypatch.undo()
    _convert(hf_dir, out, overwrite=True, seed=9)  # replaced as a whole
    assert sorted(os.listdir(tmp_path)) == ["hf", "meg"]
    _export(out, tmp_path / "x")


def _tree_bytes(root) -> dict:
    return {os.path.relpath(os.path.join(d, n), root): open(os.path.join(d, n), "rb").read()
            for d, _, names in os.walk(root) for n in names}


def test_rerun_removes_leftovers_of_killed_conversions(hf_dir, tmp_path):
    """A conversion killed mid-write leaves ``.<out>.tmp-<pid>``; one killed while swapping in
    its output also ``.<out>.old-<pid>`` and no <out>. The next run deletes both (any pid)."""
    _convert(hf_dir, tmp_path / "ref")
    for pid in (4242, 4343):
        (tmp_path / f".meg.tmp-{pid}" / "checkpoints").mkdir(parents=True)
        (tmp_path / f".meg.tmp-{pid}" / "checkpoints" / "__0_0.distcp").write_bytes(b"partial")
    (tmp_path / ".meg.old-4141").mkdir()
    (tmp_path / ".meg.old-4141" / "config.yaml").write_text("model: {}\n")
    _convert(hf_dir, tmp_path / "meg")
    assert sorted(os.listdir(tmp_path)) == ["hf", "meg", "ref"]
    meg, ref = _tree_bytes(tmp_path / "meg"), _tree_bytes(tmp_path / "ref")
    assert sorted(meg) == sorted(ref)
    # the config names its own experiment directory (and COMPLETE hashes the config)
    own_path = {"config.yaml", "checkpoints/iter_0000000/config.yaml", "checkpoints/iter_0000000/COMPLETE"}
    assert [k for k in meg if meg[k] != ref[k] and k not in own_path] == []


def test_cli_round_trip_and_refusal(hf_dir, tmp_path, capsys):
    rc = script_main("hf_to_megatron")(["--hf", hf_dir, "--out", str(tmp_path / "meg"), "--num-codebooks", "4",
                                "--codebook-size", "16", "--encoder", "none", "--no-progress",
                                "data.seq_length=128"])
    out = capsys.readouterr().out
    assert rc == 0 and "new rows" in out and "padding" in out
    rc = script_main("megatron_to_hf")(["--checkpoint", str(tmp_path / "meg"), "--out", str(tmp_path / "hf2"),
                                "--no-progress"])
    assert rc == 0
    assert_hf_roundtrip_exact(hf_dir, str(tmp_path / "hf2"), tied=False)
    rc = script_main("hf_to_megatron")(["--hf", hf_dir, "--out", str(tmp_path / "meg"), "--no-progress",
                                "data.seq_length=128"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "--overwrite" in err and len(err.splitlines()) == 1


def test_reload_and_save_with_trainer_code_at_tp1_pp1(hf_dir, tmp_path, runtime):
    """TP=1 x PP=1 leg of the parallel round trip (the others: test_convert_parallel.py)."""
    from megatron_ualm.training.checkpoint import save_checkpoint
    _convert(hf_dir, tmp_path / "meg", encoder="qwen2_5_omni")
    model, cfg = _load_megatron(tmp_path / "meg")
    save_checkpoint(str(tmp_path / "again" / "checkpoints"), 3, [model], config=cfg, save_rng=False)
    _export(tmp_path / "again", tmp_path / "out")
    assert_hf_roundtrip_exact(hf_dir, str(tmp_path / "out"), tied=False)
