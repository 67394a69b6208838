"""HuggingFace directories, read lazily and written one tensor at a time.

Reading: ``HFCheckpoint`` opens every ``*.safetensors`` file of a directory (through
``model.safetensors.index.json`` when there is one) with ``safe_open`` and reads a tensor
only when asked; names, shapes and dtypes come from the file headers.

Writing: ``SafetensorsStreamWriter`` writes the safetensors format directly -- an 8-byte
little-endian header length, a JSON header with every tensor's dtype, shape and byte
range, then the raw bytes in header order -- so the header is fixed before any data is
produced and each tensor is written (and freed) as soon as it exists. ``write_sharded``
splits a list of tensors into ``model-0000i-of-0000n.safetensors`` files of at most
``max_shard_bytes`` plus ``model.safetensors.index.json`` (or one ``model.safetensors``),
the layout ``from_pretrained`` reads.
"""
from __future__ import annotations

import json
import os
import struct
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from megatron_ualm.convert.errors import ConversionError
from megatron_ualm.errors import one_line
from megatron_ualm.fileutil import read_json

INDEX_FILE = "model.safetensors.index.json"
_REFETCH = "the directory is damaged or incomplete: copy, download or export it again"
SINGLE_FILE = "model.safetensors"

DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
               torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
               torch.bool: "BOOL"}
DTYPES = {v: k for k, v in DTYPE_NAMES.items()}


class HFCheckpoint:
    """Lazy access to the tensors of a local HF directory (safetensors only).

    ``names``: every tensor name; ``shape(name)``/``dtype(name)`` from the headers;
    ``get(name)`` reads one tensor. Use as a context manager (closes the files)."""

    def __init__(self, directory: str, prefix: str = "", files: Optional[Sequence[str]] = None):
        self.directory = directory
        self.prefix = prefix  # read only names starting with it, addressed without it
        if not os.path.isdir(directory):
            raise ConversionError(f"{directory}: no such directory (expected a local HF model directory)")
        index = os.path.join(directory, INDEX_FILE)
        if files is not None:
            files = list(files)
        elif os.path.isfile(index):
            doc = read_json(index, _REFETCH, ConversionError)
            weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
            if not isinstance(weight_map, dict):
                raise ConversionError(f"{index}: no \"weight_map\" object; {_REFETCH}")
            files = sorted(set(weight_map.values()))
        elif os.path.isfile(os.path.join(directory, SINGLE_FILE)):
            files = [SINGLE_FILE]
        else:
            files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
        if not files:
            bins = [f for f in os.listdir(directory) if f.endswith(".bin") or f.endswith(".pt")]
            hint = (f" (it has {bins[:3]}: load it with transformers and save_pretrained(..., "
                    "safe_serialization=True) first)") if bins else ""
            raise ConversionError(f"{directory}: no *.safetensors files{hint}")
        self._stack = ExitStack()
        self._where: dict[str, object] = {}
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.isfile(path):
                raise ConversionError(f"{path}: listed in {INDEX_FILE} but missing; the download is incomplete")
            try:
                handle = self._stack.enter_context(safe_open(path, framework="pt"))
            except (SafetensorError, OSError) as e:
                self.close()
                raise ConversionError(f"{path}: not a readable safetensors file ({one_line(e)}); "
                                      f"{_REFETCH}") from None
            for key in handle.keys():
                if not key.startswith(prefix):
                    continue
                sl = handle.get_slice(key)
                dtype = DTYPES.get(sl.get_dtype())
                if dtype is None:
                    raise ConversionError(f"{path}: tensor {key} has dtype {sl.get_dtype()}, which is not supported")
                short = key[len(prefix):]
                self._where[short] = handle
                self._meta[short] = (tuple(sl.get_shape()), dtype)

    @property
    def names(self) -> list[str]:
        return list(self._meta)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][0]

    def dtype(self, name: str) -> torch.dtype:
        return self._meta[name][1]

    def get(self, name: str) -> Tensor:
        if name not in self._where:
            raise ConversionError(f"{self.directory}: tensor {name!r} not found")
        return self._where[name].get_tensor(self.prefix + name)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.isdir(directory):
        raise ConversionError(f"{directory}: no such directory; pass a local HF model directory (nothing is "
                              "downloaded)")
    if not os.path.isfile(path):
        raise ConversionError(f"{directory}: no config.json; pass a local HF model directory ({_REFETCH})")
    config = read_json(path, _REFETCH, ConversionError)
    if not isinstance(config, dict):
        raise ConversionError(f"{path}: expected a JSON object, got {type(config).__name__}; {_REFETCH}")
    return config


# --- writing -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = torch.tensor([], dtype=self.dtype).element_size()
        for s in self.shape:
            n *= s
        return n


class SafetensorsStreamWriter:
    """Write a safetensors file whose tensors (``specs``, in order) arrive one at a time."""

    def __init__(self, path: str, specs: Sequence[TensorSpec], metadata: Optional[dict] = None):
        self.path = path
        self.specs = list(specs)
        header: dict = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        for s in self.specs:
            header[s.name] = {"dtype": DTYPE_NAMES[s.dtype], "shape": list(s.shape),
                              "data_offsets": [offset, offset + s.nbytes]}
            offset += s.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)
        self._next = 0

    def write(self, name: str, tensor: Tensor) -> None:
        if self._next >= len(self.specs):
            raise RuntimeError(f"internal: {self.path}: unexpected tensor {name}")
        spec = self.specs[self._next]
        if name != spec.name or tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise RuntimeError(f"internal: {self.path}: expected {spec}, got {name} "
                                  f"{tuple(tensor.shape)} {tensor.dtype}")
        data = tensor.detach().contiguous().cpu()
        if data.numel():  # raw little-endian bytes, written from the tensor's memory without a copy
            self._file.write(data.reshape(-1).view(torch.uint8).numpy())
        self._next += 1

    def close(self) -> None:
        if self._next != len(self.specs):
            missing = [s.name for s in self.specs[self._next:]]
            self._file.close()
            raise RuntimeError(f"internal: {self.path}: tensors never written: {missing[:5]}")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


def plan_shards(specs: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Split tensors (kept in order) into consecutive shards of at most ``max_shard_bytes``
    (a tensor larger than that gets a shard of its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def write_sharded(directory: str, specs: Sequence[TensorSpec], tensors: Iterable[tuple[str, Tensor]],
                  max_shard_bytes: int, on_tensor: Optional[Callable[[str], None]] = None) -> list[str]:
    """Write ``tensors`` (yielded in ``specs`` order) as an HF safetensors checkpoint into
    ``directory``; returns the file names written."""
    shards = plan_shards(specs, max_shard_bytes)
    names = [SINGLE_FILE] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    stream = iter(tensors)
    for file_name, shard in zip(names, shards):
        writer = SafetensorsStreamWriter(os.path.join(directory, file_name), shard)
        for _ in shard:
            name, tensor = next(stream)
            writer.write(name, tensor)
            del tensor
            if on_tensor is not None:
                on_tensor(name)
        writer.close()
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(s.nbytes for s in specs)},
                 "weight_map": {s.name: f for f, shard in zip(names, shards) for s in shard}}
        with open(os.path.join(directory, INDEX_FILE), "w") as f:
            json.dump(index, f, indent=2)
    return names
