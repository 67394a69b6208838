"""What makes an exported directory usable by stock transformers for text chat: a tokenizer in
unified ids, the UALM chat template, eos/bos/pad ids, a generation config and a model card.

The exported backbone's rows are the unified vocabulary's rows [0, audio_start): the 256
special slots then the text rows (``formats.vocab``). The exported tokenizer uses the same
ids: the run's text tokenizer with every id shifted by 256 and the 256 special slots
(``<|pad|>`` = 0, ``<|bos|>`` = 1, ..., ``<|unused_13|>`` ...) added as special tokens at ids
0..255. So ``AutoTokenizer`` + ``AutoModelForCausalLM`` hold the UALM text format as is.

A copy of the unshifted text tokenizer goes to ``text_tokenizer/``: megatron_ualm reads text
ids (without the shift) from it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

from megatron_ualm.convert.errors import ConversionError
from megatron_ualm.formats import vocab as V
from megatron_ualm.formats.vocab import NUM_SPECIAL_SLOTS, UnifiedVocab

TEXT_TOKENIZER_DIR = "text_tokenizer"
END_IDS = [V.EOS, V.EOT]  # an assistant text message ends with one of them (SPEC section 4)

# SPEC section 4 for text messages: <|bos|>, then per message <|role|> <|text|> content END,
# END = <|eot|> when the next message has the same role, else <|eos|> (templates.build_segments).
# The generation prompt is the assistant header with the text modality (prompts.build_prompt
# plus a forced "text" modality row).
CHAT_TEMPLATE = (
    "{{- '<|bos|>' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('UALM roles are system, user and assistant, got ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- if message['content'] is not string -%}"
    "{{- raise_exception('only text content is supported here; audio needs megatron_ualm.generate') -}}"
    "{%- endif -%}"
    "{{- '<|' + message['role'] + '|><|text|>' + message['content'] -}}"
    "{%- if not loop.last and messages[loop.index0 + 1]['role'] == message['role'] -%}"
    "{{- '<|eot|>' -}}{%- else -%}{{- '<|eos|>' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|><|text|>' -}}{%- endif -%}"
)


def special_slot_names() -> list[str]:
    vocab = UnifiedVocab(1)
    return [vocab.special_name(i) for i in range(NUM_SPECIAL_SLOTS)]


def read_tokenizer(path: str, key: str) -> dict:
    """The Rust tokenizer of a local HF tokenizer directory, as its JSON document."""
    if not os.path.isdir(path):
        raise ConversionError(f"{key}: {path} is not a directory; pass --tokenizer DIR, the run's local HF "
                              "tokenizer directory (the one preprocessing used)")
    from megatron_ualm.data.tokenizer import load_tokenizer
    try:
        return json.loads(load_tokenizer(path).backend.to_str())
    except (OSError, ValueError) as e:
        raise ConversionError(f"{key}: {path}: cannot be read as a fast HF tokenizer ({e}); pass --tokenizer "
                              "DIR, the run's HF tokenizer directory") from None


def unified_tokenizer_json(doc: dict, vocab: UnifiedVocab, where: str) -> dict:
    """The text tokenizer ``doc`` (tokenizer.json) with ids shifted into the unified
    vocabulary and the 256 special slots added as special tokens at ids 0..255."""
    doc = json.loads(json.dumps(doc))
    model = doc.get("model") or {}
    if model.get("type") not in ("BPE", "WordPiece", "WordLevel") or not isinstance(model.get("vocab"), dict):
        raise ConversionError(f"{where}: a {model.get('type')} tokenizer cannot be exported with shifted ids "
                              "(BPE, WordPiece and WordLevel can)")
    shift = vocab.text_offset
    model["vocab"] = {tok: i + shift for tok, i in model["vocab"].items()}
    added = [dict(a, id=a["id"] + shift) for a in doc.get("added_tokens") or []]
    top = max([*model["vocab"].values(), *(a["id"] for a in added)], default=shift - 1)
    if top >= vocab.audio_start:
        raise ConversionError(f"{where}: has ids up to {top - shift} but the model has {vocab.text_vocab_size} "
                              "text rows; pass the tokenizer the run used")
    names = set(special_slot_names())
    clash = sorted(names & (set(model["vocab"]) | {a["content"] for a in added}))
    if clash:
        raise ConversionError(f"{where}: already has tokens named like UALM special tokens: {clash[:4]}")
    specials = [{"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": False, "special": True} for i, name in enumerate(special_slot_names())]
    doc["added_tokens"] = specials + added
    # the model's vocabulary holds them too: tokenizers gives an added token that is not in
    # it the next free id, whatever id the document says
    model["vocab"] = {**{t["content"]: t["id"] for t in specials}, **model["vocab"]}
    for a in added:
        model["vocab"].setdefault(a["content"], a["id"])
    post = doc.get("post_processor")
    for proc in ([post] + list(post.get("processors", []))) if isinstance(post, dict) else []:
        for tok in (proc.get("special_tokens") or {}).values():  # TemplateProcessing
            tok["ids"] = [i + shift for i in tok.get("ids", [])]
        for key in ("sep", "cls"):  # BertProcessing / RobertaProcessing: [token, id]
            if isinstance(proc.get(key), list) and len(proc[key]) == 2:
                proc[key] = [proc[key][0], proc[key][1] + shift]
    return doc


@dataclass
class ChatSource:
    """The tokenizer an export gets: ``path`` with its documents, or ``missing`` saying why none."""
    path: Optional[str] = None
    text: Optional[dict] = None
    unified: Optional[dict] = None
    missing: Optional[str] = None


def prepare_tokenizer(explicit: Optional[str], recorded: Optional[str], vocab: UnifiedVocab) -> ChatSource:
    """Read and check the tokenizer given with --tokenizer, else the checkpoint config's
    ``paths.tokenizer``. A path that is not a directory here is only recorded (the run may
    have used another machine): no tokenizer files then, and ``missing`` says so in one line."""
    path, key = (explicit, "--tokenizer") if explicit else (recorded, "paths.tokenizer")
    if path is None:
        return ChatSource(missing="none given and the checkpoint's config names none: no tokenizer files, chat "
                                  "template or generation config exported; pass --tokenizer DIR (the run's HF tokenizer)")
    if not os.path.isdir(path):
        return ChatSource(missing=f"{key} {path} is not a directory here: no tokenizer files, chat template or "
                                  "generation config exported; pass --tokenizer DIR (a local HF tokenizer directory)")
    text = read_tokenizer(path, key)
    return ChatSource(path, text, unified_tokenizer_json(text, vocab, f"{key}: {path}"))


def write_chat_files(directory: str, chat: ChatSource, vocab: UnifiedVocab, max_length: int) -> Optional[int]:
    """The tokenizer files and generation_config.json of ``chat`` (nothing when it is
    missing). Returns the text tokenizer's length, or None."""
    if chat.missing:
        return None
    length = write_tokenizer(directory, chat.text, chat.unified, max_length)
    write_generation_config(directory, vocab, length)
    return length


def write_tokenizer(directory: str, text: dict, unified: dict, max_length: int) -> int:
    """Write the unified tokenizer ``unified`` (tokenizer.json, tokenizer_config.json with
    the chat template, special_tokens_map.json) and the text tokenizer ``text`` (both from
    ``read_tokenizer`` / ``unified_tokenizer_json``) into text_tokenizer/. Returns the text
    tokenizer's length."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(json.dumps(unified))
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|bos|>", eos_token="<|eos|>",
                                   pad_token="<|pad|>", additional_special_tokens=["<|eot|>"],
                                   model_max_length=max_length, clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    text_dir = os.path.join(directory, TEXT_TOKENIZER_DIR)
    os.makedirs(text_dir)
    text_backend = Tokenizer.from_str(json.dumps(text))
    text_backend.save(os.path.join(text_dir, "tokenizer.json"))
    return text_backend.get_vocab_size(with_added_tokens=True)


def suppressed_ids(vocab: UnifiedVocab, tokenizer_length: Optional[int]) -> list[int]:
    """Ids a text answer never holds (what megatron_ualm's text mask excludes): <|pad|>, the
    unused special slots and the text rows above the tokenizer (embedding padding)."""
    ids = [V.PAD] + list(range(len(V.SPECIAL_TOKENS), NUM_SPECIAL_SLOTS))
    if tokenizer_length is not None:
        ids += list(range(vocab.text_offset + tokenizer_length, vocab.audio_start))
    return ids


def token_ids() -> dict:
    """The special ids of the exported config.json and generation_config.json."""
    return {"bos_token_id": V.BOS, "eos_token_id": list(END_IDS), "pad_token_id": V.PAD}


def write_generation_config(directory: str, vocab: UnifiedVocab, tokenizer_length: Optional[int]) -> None:
    """Greedy text chat (megatron_ualm's text default), stopping at <|eos|> or <|eot|>."""
    from transformers import GenerationConfig
    GenerationConfig(**token_ids(), do_sample=False, max_new_tokens=1024,
                     suppress_tokens=suppressed_ids(vocab, tokenizer_length)).save_pretrained(directory)
