"""The README.md (model card) of an exported directory: what the model is, what stock
transformers does with it, what needs megatron_ualm, and how it was trained."""
from __future__ import annotations

from typing import Optional

from megatron_ualm.config import UALMConfig
from megatron_ualm.formats.vocab import UnifiedVocab


def model_card(cfg: UALMConfig, vocab: UnifiedVocab, iteration: Optional[int], has_tokenizer: bool) -> str:
    m, t, d = cfg.model, cfg.training, cfg.data
    tasks = sorted({spec.task for spec in d.train})
    encoder = "none (no audio inputs)" if m.encoder.kind == "none" else m.encoder.kind
    understood = "" if m.encoder.kind == "none" else f" and understood through a {m.encoder.kind} audio encoder"
    stock = ("""```python
from transformers import AutoModelForCausalLM, AutoTokenizer

path = "<this directory>"
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path)
messages = [{"role": "user", "content": "What is an upward chirp?"}]
ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                    return_dict=True)["input_ids"]
out = model.generate(ids, max_new_tokens=200)  # greedy; stops at <|eos|> or <|eot|>
print(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
```

The chat template renders `{"role", "content"}` text messages (roles system, user,
assistant) in the UALM conversation format, `<|bos|>` then per message
`<|role|><|text|>content<|eos|>` (`<|eot|>` when the next message has the same role); the
generation prompt is `<|assistant|><|text|>`. `generation_config.json` decodes greedily,
stops at `<|eos|>` or `<|eot|>` and suppresses the ids a text answer never holds (the
unused special slots and the text rows above the tokenizer), as megatron_ualm does, so the
greedy answer equals `python -m megatron_ualm.generate`'s text answer."""
             if has_tokenizer else
             "This export has no tokenizer files (none was given when it was exported): export again "
             "with `--tokenizer DIR` (the run's HF tokenizer directory) to use it with `AutoTokenizer`.")
    return f"""# UALM (Unified Audio Language Model)

A decoder-only language model that answers text questions, understands audio and generates
audio from text, trained with megatron_ualm on a Qwen2.5-architecture backbone. Audio is
generated as codec tokens ({m.num_codebooks} codebooks of {m.codebook_size} codes, delay
pattern){understood}.

## Files

| file | what |
|---|---|
| `config.json`, `model*.safetensors` | the backbone as `Qwen2ForCausalLM`; its rows are the unified ids [0, {vocab.audio_start}): 256 special tokens, then {m.text_vocab_size} text rows |
| `tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja` | the text tokenizer in the same ids (text id + 256) with the UALM special tokens at 0..255 (`<|pad|>` 0, `<|bos|>` 1, `<|eos|>` 2, `<|eot|>` 3, `<|system|>` 4, `<|user|>` 5, `<|assistant|>` 6, `<|text|>` 7, `<|audio|>` 8, `<|speech|>` 9, ...) |
| `generation_config.json` | greedy text chat, stops at `<|eos|>`/`<|eot|>` |
| `ualm_extras.safetensors`, `ualm_config.json` | the audio rows, codebook stream embeddings, audio encoder and adapter; the vocabulary layout and the UALM model config |
| `text_tokenizer/` | the text tokenizer with its own ids (what megatron_ualm reads) |

## Text chat with stock transformers

{stock}

## Audio needs megatron_ualm

Audio inputs (understanding) and audio outputs (text-to-audio, speech) use the codebook
streams, the audio encoder and classifier-free guidance, which transformers does not have:

```bash
cat > requests.jsonl <<'EOF'
{{"id": "q1", "prompt": "What is an upward chirp?"}}
{{"id": "a1", "audio": "clip.wav", "prompt": "<sound>\\nWhat is this sound?"}}
{{"id": "t1", "caption": "a dog barks twice"}}
EOF
python -m megatron_ualm.generate --checkpoint <this directory> --requests requests.jsonl --out answers \\
    codec=<X-Codec directory> guidance_scale=3 audio_temperature=0.8
```

Answers go to `answers/answers.jsonl`, audio to `answers/wavs/`.

## Training

| setting | value |
|---|---|
| layers, hidden, FFN | {m.num_layers}, {m.hidden_size}, {m.ffn_hidden_size} |
| attention heads, KV groups | {m.num_attention_heads}, {m.num_query_groups} |
| text rows, codebooks x codes | {m.text_vocab_size}, {m.num_codebooks} x {m.codebook_size} |
| audio encoder | {encoder} |
| max positions, sequence length | {m.max_position_embeddings}, {d.seq_length} |
| iterations (exported / planned) | {iteration if iteration is not None else "unknown"} / {t.train_iters} |
| global batch (sequences) | {t.global_batch_size} |
| tasks | {", ".join(tasks) if tasks else "not recorded"} |

## Licence

The weights derive from the base models they were initialised from (the Qwen2.5 backbone, the
audio encoder, the codec) and inherit their licences; the training data's terms apply as well.
"""
