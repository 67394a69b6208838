"""Does a checkpoint fit the model it is loaded into? Decided before megatron reads a tensor.

Why: megatron-core loads the two vocabulary tables (input embedding, output head) with
``allow_shape_mismatch``, because their padding for tensor parallelism (a multiple of
128 * TP rows) differs between TP sizes, and it copies whatever rows overlap. A checkpoint
of another vocabulary layout (``model.text_vocab_size``, ``num_codebooks``,
``codebook_size``; SPEC section 3) would load with every audio row under the wrong id and
no error; other shape differences fail deep inside megatron.

Two checks (``training.checkpoint.load_checkpoint`` runs both, then megatron loads):

1. ``check_layout``: the shape-defining ``model.*`` settings (``SHAPE_SETTINGS``) of the
   checkpoint's ``config.yaml`` -- the resolved config of the run that saved it; the
   HF -> Megatron converter writes one too -- against the config the model was built from.
   The TP padding is no setting, so resharding is never refused.
2. ``check_tensor_shapes``: every model tensor's global shape in the checkpoint metadata
   against the model's. It is the only check of a checkpoint without ``config.yaml``
   (``save_checkpoint(config=None)``) and it refuses a ``config.yaml`` that does not describe
   its tensors. The vocabulary tables must hold exactly the rows of the checkpoint's
   vocabulary padded for the TP it was saved at; a vocabulary change that stays inside the
   padding shows in ``config.yaml`` only.

Each refusal is a ``CheckpointError`` of one line: the checkpoint, the setting or tensor,
both values, and what to set.

Vocabulary expansion (``checkpoint.expand_vocab``, a model-only load): the config may have
more text rows than the checkpoint; everything else must match. ``VocabExpansion`` builds
the new tables ``[special | old text | new text | codebook blocks | padding]``: old rows keep
their ids, each codebook block moves up by the number of new text rows, and the new rows are
drawn as the HF -> Megatron converter draws its new rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor

from megatron_ualm.config import ConfigError, ModelConfig, from_dict
from megatron_ualm.config_loader import read_yaml
from megatron_ualm.formats.vocab import UnifiedVocab, pad_to_multiple
from megatron_ualm.model.hf_adapter import EMBEDDING, HEAD
from megatron_ualm.training.checkpoint_files import CONFIG_FILE, CheckpointError

__all__ = ["SHAPE_SETTINGS", "VOCAB_TABLES", "VocabExpansion", "saved_model_config", "check_layout",
           "saved_tensor_shapes", "check_tensor_shapes", "table_rows_problem"]

# The model.* settings that decide a tensor shape (kv_channels: the resolved head width).
SHAPE_SETTINGS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                  "num_query_groups", "kv_channels", "qkv_bias", "text_vocab_size", "num_codebooks",
                  "codebook_size")
_VOCAB_SETTINGS = ("text_vocab_size", "num_codebooks", "codebook_size")
# The tables whose rows are the unified vocabulary (padded for TP), by checkpoint key.
VOCAB_TABLES = (EMBEDDING, HEAD)


# --- the settings of config.yaml ----------------------------------------------------------

def saved_model_config(ckpt: Path) -> Optional[ModelConfig]:
    """The shape settings of ``<ckpt>/config.yaml`` as a ModelConfig (None: no such file).

    Only ``SHAPE_SETTINGS`` are read, so a config.yaml of an older or newer code version
    (other keys) still tells the layout."""
    path = Path(ckpt) / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        model = read_yaml(str(path)).get("model") or {}
        return from_dict(ModelConfig, {k: v for k, v in model.items() if k in SHAPE_SETTINGS}, "model")
    except (ConfigError, AttributeError) as exc:
        raise CheckpointError(f"{path}: cannot read the model settings of the run that saved the "
                              f"checkpoint ({exc}); restore the file or copy that run's config.yaml there") from None


def _value(m: ModelConfig, name: str):
    return m.head_dim if name == "kv_channels" else getattr(m, name)


def _describe(m: ModelConfig, name: str) -> str:
    """``model.codebook_size=16 (4 x 17 = 68 audio rows)``: a setting and, for the
    vocabulary, which rows it gives."""
    text = f"model.{name}={_value(m, name)}"
    vocab = m.vocab()
    if name == "text_vocab_size":
        return f"{text} (text rows [{vocab.text_offset}, {vocab.audio_start}))"
    if name in ("num_codebooks", "codebook_size"):
        return f"{text} ({vocab.num_codebooks} x {vocab.block_size} = {vocab.size - vocab.audio_start:,} audio rows)"
    return text


def check_layout(ckpt: Path, saved: Optional[ModelConfig], run: ModelConfig,
                 expand_vocab: bool) -> Optional["VocabExpansion"]:
    """Refuse a checkpoint whose shape settings (``saved``, from its config.yaml) differ from
    the run's; returns the expansion to apply when ``expand_vocab`` allows the difference."""
    if saved is None:
        return None
    differ = [n for n in SHAPE_SETTINGS if _value(saved, n) != _value(run, n)]
    if not differ:
        return None
    grown = run.text_vocab_size - saved.text_vocab_size
    only_text_grows = differ == ["text_vocab_size"] and grown > 0
    if only_text_grows and expand_vocab:
        return VocabExpansion(saved.vocab(), run.vocab())
    was = ", ".join(_describe(saved, n) for n in differ)
    now = ", ".join(_describe(run, n) for n in differ)
    fix = " ".join(f"model.{n}={_value(saved, n)}" for n in differ)
    message = (f"checkpoint {ckpt} was trained with {was} but the config says {now}; set {fix} "
               f"to load it (its settings: {Path(ckpt) / CONFIG_FILE})")
    if only_text_grows:
        message += (f", or checkpoint.expand_vocab=true to add the {grown} new text rows (existing rows "
                    f"keep their ids, each codebook block moves up by {grown})")
    elif expand_vocab and "text_vocab_size" in differ:
        message += "; checkpoint.expand_vocab=true only adds text rows, every other setting must match"
    raise CheckpointError(message)


# --- the tensors of the checkpoint ---------------------------------------------------------

def saved_tensor_shapes(ckpt: Path) -> dict[str, tuple[int, ...]]:
    """Global shape of every tensor in a torch_dist checkpoint, by key (from ``.metadata``;
    the caller has checked it with ``check_safe_to_unpickle``)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    metadata = FileSystemReader(str(ckpt)).read_metadata()
    return {k: tuple(v.size) for k, v in metadata.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)}


def table_rows_problem(key: str, shape: Sequence[int], vocab: UnifiedVocab, hidden: int,
                       saved_tp: Optional[int], whose: str) -> Optional[str]:
    """Why a vocabulary table of ``shape`` cannot hold ``vocab`` padded for ``saved_tp``
    (None: it can). ``whose`` names where ``vocab`` comes from, e.g. "its config.yaml's"."""
    from megatron_ualm.model.ualm_model import TP_VOCAB_MULTIPLE  # megatron-core: only when asked
    rows, width = shape[0], tuple(shape[1:])
    settings = ", ".join(f"model.{n}={getattr(vocab, n)}" for n in _VOCAB_SETTINGS)
    if saved_tp is None:  # no layout in the manifest: at least every real row must be there
        expected, padding = vocab.size, "(at least)"
        ok = rows >= vocab.size
    else:
        multiple = TP_VOCAB_MULTIPLE * saved_tp
        expected = pad_to_multiple(vocab.size, multiple)
        padding = f"padded for the TP={saved_tp} it was saved at (a multiple of {multiple})"
        ok = rows == expected
    if ok and width == (hidden,):
        return None
    return (f"{key} has shape {tuple(shape)}, but {whose} vocabulary ({settings}: {vocab.size:,} rows) "
            f"{padding} and model.hidden_size={hidden} give ({expected}, {hidden})")


def check_tensor_shapes(ckpt: Path, saved: Mapping[str, tuple[int, ...]],
                        model: Mapping[str, tuple[int, ...]], tables: Sequence[str],
                        vocab: Optional[UnifiedVocab], hidden: Optional[int], saved_tp: Optional[int],
                        has_config: bool) -> Optional[str]:
    """The first difference between the checkpoint's tensors (``saved``: key -> global shape)
    and the model's, as a one-line message (None: they fit).

    model: global shapes of the model's tensors that must match exactly; tables: keys of its
    vocabulary tables, checked against ``vocab`` (the checkpoint's vocabulary: from its
    config.yaml, else the run's) and ``hidden``; vocab None: not a UALM model, tables skipped.
    Tensors absent on either side are left to megatron's strictness handling."""
    if has_config:
        fix = "its config.yaml does not describe its tensors; load it with the config of the run that saved it"
    else:
        fix = (f"{ckpt} has no {CONFIG_FILE} to name the settings: set the model.* settings it was "
               "trained with")
    for key, shape in model.items():
        if key in saved and tuple(saved[key]) != tuple(shape):
            return (f"checkpoint {ckpt}: {key} has shape {tuple(saved[key])} but the model built from the "
                    f"config has {tuple(shape)}; {fix}")
    if vocab is None:
        return None
    whose = "its config.yaml's" if has_config else "the config's"
    for key in tables:
        if key in saved:
            problem = table_rows_problem(key, saved[key], vocab, hidden, saved_tp, whose)
            if problem:
                return f"checkpoint {ckpt}: {problem}; {fix}"
    return None


# --- growing the text rows -----------------------------------------------------------------

def _normal(n: int, hidden: int, std: float, generator: torch.Generator) -> Tensor:
    # the HF -> Megatron converter's new rows: normal(0, std) drawn in float32, cast by the caller
    return torch.randn(n, hidden, generator=generator, dtype=torch.float32) * std


@dataclass(frozen=True)
class VocabExpansion:
    """The checkpoint's vocabulary ``old`` grown to the run's ``new`` (more text rows only).

    New table = ``[old special + text | new text rows | old codebook blocks | padding]``.
    ``new_rows`` draws the new text rows and the padding rows, i.i.d. normal(0, std) in
    float32 from ``torch.Generator().manual_seed(seed)``, in the order: embedding's text rows,
    head's text rows, embedding's padding, head's padding -- so the text rows do not depend
    on the TP the tables are padded for.
    """
    old: UnifiedVocab
    new: UnifiedVocab

    @property
    def grown(self) -> int:
        return self.new.text_vocab_size - self.old.text_vocab_size

    def new_rows(self, padded_size: int, hidden: int, std: float, seed: int) -> dict[str, tuple[Tensor, Tensor]]:
        """table key -> (new text rows, padding rows) for tables of ``padded_size`` rows."""
        generator = torch.Generator().manual_seed(seed)
        text = [_normal(self.grown, hidden, std, generator) for _ in VOCAB_TABLES]
        padding = [_normal(padded_size - self.new.size, hidden, std, generator) for _ in VOCAB_TABLES]
        return {key: (t, p) for key, t, p in zip(VOCAB_TABLES, text, padding)}

    def table(self, old_table: Tensor, new_text: Tensor, padding: Tensor) -> Tensor:
        """The grown table (old_table: the checkpoint's, any padding)."""
        old, dtype = self.old, old_table.dtype
        return torch.cat([old_table[:old.audio_start], new_text.to(dtype),
                          old_table[old.audio_start:old.size], padding.to(dtype)])
