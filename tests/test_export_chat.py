"""The HF export works with stock transformers alone: its tokenizer holds the UALM special
tokens at the unified ids, its chat template lays out text conversations as megatron_ualm's
prompts do, and greedy ``model.generate`` (stopping at <|eos|>) gives the answer of
``python -m megatron_ualm.generate`` on the same export. transformers runs in a separate
interpreter that never imports megatron_ualm."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTION = "what is two and two"
CONVERSATIONS = [
    [{"role": "user", "content": QUESTION}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a dog barks"},
     {"role": "user", "content": " near the river?"}],
    [{"role": "user", "content": "what is two"}, {"role": "assistant", "content": "two"},
     {"role": "user", "content": "and two and two"}],
]

SAVE = textwrap.dedent("""
    import sys
    root = sys.argv[1]
    sys.path.insert(0, {tests!r})
    from model_batches import tiny_model_cfg
    from megatron_ualm.config import DataConfig, EncoderConfig, PathsConfig, TrainingConfig, UALMConfig
    from megatron_ualm.data.tokenizer import train_tiny_tokenizer
    from megatron_ualm.model.transformer_config import transformer_config_from
    from megatron_ualm.model.ualm_model import UALMModel
    from megatron_ualm.runtime import init_runtime, shutdown_runtime
    from megatron_ualm.training.checkpoint import save_checkpoint
    train_tiny_tokenizer(["a dog barks near the river", "what is two and two"] * 20, root + "/tok", 280)
    cfg = UALMConfig(model=tiny_model_cfg(init_method_std=0.3, encoder=EncoderConfig(kind="none")),
                     data=DataConfig(seq_length=256), training=TrainingConfig(train_iters=7),
                     paths=PathsConfig(tokenizer=root + "/tok"))
    init_runtime(device="cpu", seed=0)
    model = UALMModel(cfg.model, transformer_config_from(cfg.model, None, "fp32"))
    save_checkpoint(root + "/run/checkpoints", 3, [model], config=cfg)
    shutdown_runtime()
""")

# stock transformers only: PYTHONPATH is empty and the working directory is not the repository
STOCK = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path, conversations, steps = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    out = {"prompts": [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"] for c in conversations],
           "rendered": tok.apply_chat_template(conversations[1], add_generation_prompt=True, tokenize=False),
           "names": tok.convert_ids_to_tokens(list(range(14))), "length": len(tok),
           "encoded": tok.encode("<|bos|><|user|><|text|>" + conversations[0][0]["content"] + "<|eos|>"),
           "text_ids": tok.encode(conversations[0][0]["content"]),
           "special": [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id],
           "generation": model.generation_config.to_dict()}
    out["decoded_specials"] = tok.decode(out["encoded"])
    ids = torch.tensor([out["prompts"][0]])
    with torch.no_grad():
        gen = model.generate(ids, attention_mask=torch.ones_like(ids),
                             **(dict(max_new_tokens=steps) if steps else {}))
    answer = gen[0, ids.shape[1]:].tolist()
    with torch.no_grad():  # the final (normed) hidden states that picked the answer's tokens
        out["hidden"] = model.model(input_ids=gen).last_hidden_state[0, ids.shape[1] - 1:-1].tolist()
    out["answer_ids"] = answer
    body = answer[:-1] if answer and answer[-1] in model.generation_config.eos_token_id else answer
    out["answer_text"] = tok.decode(body)
    out["megatron_ualm_imported"] = any(m.split(".")[0] == "megatron_ualm" for m in sys.modules)
    print("RESULT " + json.dumps(out))
""")


def _env(pythonpath: str) -> dict:
    return {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}


def _run(cmd, cwd, pythonpath=None):
    """pythonpath: None keeps the test's own (a megatron-core put first included) with the repository."""
    if pythonpath is None:
        pythonpath = os.pathsep.join(p for p in [os.environ.get("PYTHONPATH", ""), ROOT] if p)
    proc = subprocess.run(cmd, cwd=cwd, env=_env(pythonpath), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _stock(export, cwd, steps=0) -> dict:
    proc = _run([sys.executable, "-c", STOCK, str(export), json.dumps(CONVERSATIONS), str(steps)], cwd, "")
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert result["megatron_ualm_imported"] is False
    return result


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_chat")
    _run([sys.executable, "-c", SAVE.format(tests=os.path.join(ROOT, "tests")), str(root)], root)
    proc = _run([sys.executable, os.path.join(ROOT, "checkpoints_convert", "megatron_to_hf.py"),
                 "--checkpoint", str(root / "run"), "--out", str(root / "export"), "--no-progress"], root)
    assert "tokenizer" in proc.stdout and "chat template" in proc.stdout
    return root


@pytest.fixture(scope="module")
def free(export):
    """Stock transformers on the export as written: tokenizer facts, prompts and 6 greedy tokens."""
    return _stock(export / "export", export, steps=6)


def test_tokenizer_template_and_ids_agree_with_megatron_ualm(export, free):
    from megatron_ualm.data.tokenizer import load_tokenizer
    from megatron_ualm.formats.vocab import SPECIAL_TOKENS, UnifiedVocab
    from megatron_ualm.inference.prompts import build_prompt
    stock = free
    text = load_tokenizer(str(export / "tok"))
    vocab = UnifiedVocab(300, 4, 16)
    # the special tokens at their unified ids, round trip
    assert stock["names"] == list(SPECIAL_TOKENS) + ["<|unused_13|>"]
    assert stock["special"] == [1, 2, 0] and stock["length"] == 256 + len(text)
    q_ids = [256 + i for i in text.encode(QUESTION)]
    assert stock["text_ids"] == q_ids
    assert stock["encoded"] == [1, 5, 7, *q_ids, 2]
    assert stock["decoded_specials"] == "<|bos|><|user|><|text|>" + QUESTION + "<|eos|>"
    # the chat template gives megatron_ualm's prompt rows + the text modality row
    for conversation, ids in zip(CONVERSATIONS, stock["prompts"]):
        prompt = build_prompt({"messages": conversation, "modality": "text"}, vocab, text.encode)
        assert ids == prompt.rows[:, 0].tolist() + [7], conversation
    assert stock["rendered"] == ("<|bos|><|system|><|text|>be brief<|eos|><|user|><|text|>a dog barks<|eot|>"
                                 "<|user|><|text|> near the river?<|eos|><|assistant|><|text|>")
    gen = stock["generation"]
    assert gen["eos_token_id"] == [2, 3] and gen["pad_token_id"] == 0 and gen["bos_token_id"] == 1
    assert gen["do_sample"] is False
    suppressed = set(gen["suppress_tokens"])
    assert {0, 13, 255} <= suppressed and not suppressed & {1, 2, 3, 4, 5, 6, 7, 8, 9, 256, 256 + len(text) - 1}
    assert set(range(256 + len(text), 556)) <= suppressed
    with open(export / "export" / "config.json") as f:
        config = json.load(f)
    assert (config["eos_token_id"], config["bos_token_id"], config["pad_token_id"]) == ([2, 3], 1, 0)
    card = (export / "export" / "README.md").read_text()
    for needed in ("apply_chat_template", "megatron_ualm.generate", "| iterations (exported / planned) | 3 / 7 |",
                   "inherit their licences"):
        assert needed in card, needed


def test_stock_greedy_answer_equals_megatron_ualm_generate(export, free):
    """The random model is made to end its answer after 3 tokens: <|eos|>'s head row becomes
    orthogonal to the hidden states that picked tokens 1..3 (its logit 0 there) and gives
    logit 1000 at the next, so both decoders must stop there, by <|eos|>."""
    import torch
    from safetensors.torch import load_file, save_file
    out = export / "export"
    first, hidden = free["answer_ids"], torch.tensor(free["hidden"], dtype=torch.float64)
    assert len(first) == 6 and 2 not in first and 3 not in first
    basis, _ = torch.linalg.qr(hidden[:4].T)  # orthonormal basis of the first 4 hidden states
    r = basis[:, 3] * torch.sign(basis[:, 3] @ hidden[3])
    tensors = load_file(str(out / "model.safetensors"))
    tensors["lm_head.weight"][2] = (r * 1000 / (r @ hidden[3])).float()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})

    stock = _stock(out, export)
    requests = export / "requests.jsonl"
    requests.write_text(json.dumps({"id": "q", "prompt": QUESTION, "modality": "text"}) + "\n")
    _run([sys.executable, "-m", "megatron_ualm.generate", "--checkpoint", str(out), "--requests", str(requests),
          "--out", str(export / "answers"), "device=cpu", "max_new_rows=64"], ROOT)
    record = json.loads((export / "answers" / "answers.jsonl").read_text())
    print("stock:", stock["answer_ids"], repr(stock["answer_text"]), "| megatron_ualm:", repr(record["text"]))
    assert stock["answer_ids"] == first[:3] + [2] and record["finish_reason"] == "eos"
    segment = record["segments"][0]
    assert segment["modality"] == "text" and segment["tokens"] == len(stock["answer_ids"]) - 1
    assert record["text"] == stock["answer_text"]
