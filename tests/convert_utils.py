"""Tiny random HF Qwen2 directories and comparisons for the conversion tests."""
from __future__ import annotations

import importlib.util
import os

import torch
from safetensors import safe_open

K, C = 4, 16  # codebooks, codes per codebook of the tiny UALM
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def script_main(name: str):
    """``main`` of checkpoints_convert/<name>.py, called in this process."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "checkpoints_convert", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def make_hf_qwen2(directory: str, *, tied: bool, kv_heads: int, seed: int = 0, dtype=torch.float32,
                  layers: int = 2) -> str:
    """A random Qwen2ForCausalLM (4 query heads, ``kv_heads`` KV heads) saved as safetensors;
    every weight (norms, biases) perturbed so that each one matters."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=256,
                         tie_word_embeddings=tied, rms_norm_eps=1e-6)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.to(dtype).save_pretrained(directory)
    return directory


def ualm_cfg(encoder: str = "none", random_init: bool = True):
    """The run config of the tiny UALM (shapes come from the HF directory); a real encoder kind
    gets the random tiny encoder unless ``random_init`` is False (a path is given then)."""
    from megatron_ualm.config import UALMConfig
    cfg = UALMConfig()
    cfg.model.num_codebooks, cfg.model.codebook_size = K, C
    cfg.model.encoder.kind = encoder
    cfg.model.encoder.random_init = random_init and encoder != "none"
    cfg.model.attention_backend = "sdpa"
    cfg.data.seq_length = 128
    return cfg


def read_safetensors_dir(directory: str, files=None) -> dict[str, torch.Tensor]:
    files = files or sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    out = {}
    for name in files:
        with safe_open(os.path.join(directory, name), framework="pt") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key)
    return out


def assert_hf_roundtrip_exact(src: str, exported: str, tied: bool) -> None:
    """Every backbone tensor of ``exported`` equals the source bit for bit; a tied source
    comes back untied with lm_head == embed_tokens. The exported vocabulary tables hold the
    256 special rows first (HF ids = unified ids): their text rows are compared."""
    a = read_safetensors_dir(src)
    b = read_safetensors_dir(exported, [f for f in os.listdir(exported)
                                        if f.endswith(".safetensors") and f != "ualm_extras.safetensors"])
    expected = dict(a)
    if tied:
        assert "lm_head.weight" not in a
        expected["lm_head.weight"] = a["model.embed_tokens.weight"]
    assert sorted(b) == sorted(expected), set(b) ^ set(expected)
    for name, value in expected.items():
        got = b[name]
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert got.shape[0] == 256 + value.shape[0], name
            got = got[256:]
        assert got.dtype == value.dtype and torch.equal(got, value), name
