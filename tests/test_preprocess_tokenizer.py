"""The light tokenizer loader gives the same ids, length and decode as transformers' AutoTokenizer."""
from transformers import AutoTokenizer

from megatron_ualm.data.tokenizer import (
    check_text_vocab, encode_batch, load_tokenizer, tokenizer_identity, train_tiny_tokenizer,
)

TEXTS = ["a dog barks in the rain", "Héllo wörld — ünïcode 🐶!", "  spaces  and\nnewlines\t", ""]


def test_light_loader_matches_autotokenizer(tmp_path):
    train_tiny_tokenizer(TEXTS * 20 + ["the quick brown fox jumps"] * 10, tmp_path / "tok", vocab_size=300)
    ours, hf = load_tokenizer(tmp_path / "tok"), AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert len(ours) == len(hf) == 300
    for text, ids in zip(TEXTS, encode_batch(ours, TEXTS)):
        assert ids.tolist() == hf(text, add_special_tokens=False)["input_ids"]
        assert ours.decode(ids) == text
    assert tokenizer_identity(ours)["vocab_sha256"] == tokenizer_identity(hf)["vocab_sha256"]
    check_text_vocab(ours, 300)
    try:
        check_text_vocab(ours, 299)
        raise AssertionError("expected ValueError")
    except ValueError as e:
        assert "text_vocab_size >= 300" in str(e)
