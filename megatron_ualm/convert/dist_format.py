"""Megatron ``torch_dist`` checkpoints, written and read one tensor at a time.

A megatron-core distributed checkpoint (format ``torch_dist``) is a
``torch.distributed.checkpoint`` (DCP) directory -- ``.metadata`` plus ``*.distcp`` data
files -- with megatron's ``metadata.json`` (backend names) and ``common.pt`` (the
non-tensor part of the state dict) beside it. Each tensor is stored under its megatron
*sharded key* with its *global* shape, as chunks at offsets; megatron's loader asks DCP for
whatever region each rank holds, so a checkpoint written with one chunking loads at any
TP/PP layout.

Megatron's own saver needs the whole state dict in memory. Here the writer gets a list of
``TensorPiece`` descriptions (key, global shape, offsets, dtype and a ``produce`` callable)
and DCP asks for each piece only when it writes it; pieces of one ``group`` go to one data
file, and DCP keeps a file's tensors alive until the file is closed, so memory is bounded
by the largest group (one decoder layer). The reader reads any region (a whole tensor or
one layer of a layer-stacked one) by building DCP read items for just that region.

Relies on DCP's planner/storage interfaces of torch >= 2.6 (``FileSystemWriter._write_data``
is private; checked with torch 2.13).
"""
from __future__ import annotations

import io
import json
import math
import os
import queue
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata, ChunkStorageMetadata, MetadataIndex, TensorProperties, TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType, LoadPlan, LoadPlanner, ReadItem, SavePlan, TensorWriteData, WriteItem, WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_ualm.convert.errors import ConversionError
from megatron_ualm.fileutil import read_json

MEGATRON_METADATA = "metadata.json"
COMMON_STATE = "common.pt"
DCP_METADATA = ".metadata"
BACKEND = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
           "common_backend": "torch", "common_backend_version": 1}


@dataclass(frozen=True)
class TensorPiece:
    """One chunk of a global tensor, made on demand.

    key: megatron sharded key; global_shape: shape of the whole tensor; offsets/shape: where
    this chunk sits and how big it is; produce(): returns exactly that chunk (shape, dtype);
    group: pieces with the same group are written to one data file, in list order.
    """
    key: str
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], Tensor]
    group: str


@dataclass(frozen=True)
class ObjectPiece:
    """A megatron ``ShardedObject`` (stored as ``[value]``) under its unique key."""
    key: str
    value: Any
    group: str


# --- writing ---------------------------------------------------------------------------------------
class _LazySavePlanner(DefaultSavePlanner):
    """A save plan made from piece descriptions; the data is produced in ``resolve_data``."""

    def __init__(self, pieces: Sequence[TensorPiece], objects: Sequence[ObjectPiece],
                 on_piece: Optional[Callable[[TensorPiece], None]]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._pieces = {(p.key, tuple(p.offsets)): p for p in pieces}
        self._objects = {o.key: o for o in objects}
        self._on_piece = on_piece
        self._items = [WriteItem(index=MetadataIndex(p.key, torch.Size(p.offsets)), type=WriteItemType.SHARD,
                                 tensor_data=TensorWriteData(
                                     chunk=ChunkStorageMetadata(torch.Size(p.offsets), torch.Size(p.shape)),
                                     properties=TensorProperties(dtype=p.dtype), size=torch.Size(p.global_shape)))
                       for p in pieces]
        self._items += [WriteItem(index=MetadataIndex(o.key), type=WriteItemType.BYTE_IO) for o in objects]

    def create_local_plan(self) -> SavePlan:
        self.plan = SavePlan(items=list(self._items))
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        index = write_item.index
        if write_item.type == WriteItemType.BYTE_IO:
            buffer = io.BytesIO()
            torch.save([self._objects[index.fqn].value], buffer)  # megatron stores a list per key
            buffer.seek(0)
            return buffer
        piece = self._pieces[(index.fqn, tuple(index.offset))]
        tensor = piece.produce()
        if tuple(tensor.shape) != tuple(piece.shape) or tensor.dtype != piece.dtype:
            raise RuntimeError(f"internal: {piece.key} at {piece.offsets} was produced as "
                                  f"{tuple(tensor.shape)} {tensor.dtype}, planned {piece.shape} {piece.dtype}")
        if self._on_piece is not None:
            self._on_piece(piece)
        return tensor.detach().contiguous()


class _GroupedFileSystemWriter(FileSystemWriter):
    """One ``.distcp`` data file per piece group (DCP's default is one file per rank, which
    would keep every tensor of the checkpoint alive until that single file is closed)."""

    def __init__(self, path: str, group_of: dict):
        super().__init__(path, single_file_per_rank=True, sync_files=True, thread_count=1)
        self._group_of = group_of

    def storage_meta(self):
        return None  # DCP would pickle the checkpoint path (a PosixPath); megatron's writer stores none

    def write_data(self, plan: SavePlan, planner):
        buckets: dict[str, list[WriteItem]] = {}
        for item in plan.items:
            buckets.setdefault(self._group_of[(item.index.fqn, tuple(item.index.offset or ()))], []).append(item)
        files: queue.Queue = queue.Queue()
        for n, items in enumerate(buckets.values()):
            name = f"{plan.storage_data.prefix}{n}.distcp"
            files.put((self.fs.concat_path(self.path, name), name, items))
        return self._write_data(planner, files)


def write_dist_checkpoint(directory: str, pieces: Sequence[TensorPiece], objects: Sequence[ObjectPiece] = (),
                          common: Optional[dict] = None,
                          on_piece: Optional[Callable[[TensorPiece], None]] = None) -> None:
    """Write a megatron ``torch_dist`` checkpoint into ``directory`` (created; should be empty).

    Pieces are produced in list order, grouped into files by ``group``; DCP checks that the
    pieces of each key tile its global shape exactly. ``common`` goes to ``common.pt``.
    """
    os.makedirs(directory, exist_ok=True)
    group_of = {(p.key, tuple(p.offsets)): p.group for p in pieces}
    group_of.update({(o.key, ()): o.group for o in objects})
    planner = _LazySavePlanner(pieces, objects, on_piece)
    dcp.save({}, storage_writer=_GroupedFileSystemWriter(directory, group_of), planner=planner, no_dist=True)
    torch.save(common or {}, os.path.join(directory, COMMON_STATE))
    with open(os.path.join(directory, MEGATRON_METADATA), "w") as f:
        json.dump(BACKEND, f)


# --- reading ---------------------------------------------------------------------------------------
class _RegionLoadPlanner(LoadPlanner):
    """Reads requested regions (and objects) of a checkpoint into preallocated tensors."""

    def __init__(self, requests: dict[str, tuple[Tensor, tuple[int, ...]]], objects: Iterable[str]):
        self.requests = requests
        self.object_keys = list(objects)
        self.objects: dict[str, Any] = {}
        self.copied: dict[str, int] = {k: 0 for k in requests}

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        items = []
        for key, (buffer, offsets) in self.requests.items():
            md = self.metadata.state_dict_metadata[key]
            items += create_read_items_for_chunk_list(
                key, md, [ChunkStorageMetadata(torch.Size(offsets), torch.Size(buffer.shape))])
        for key in self.object_keys:
            index = MetadataIndex(key)
            items.append(ReadItem(type=LoadItemType.BYTE_IO, dest_index=index, dest_offsets=torch.Size((0,)),
                                  storage_index=index, storage_offsets=torch.Size((0,)), lengths=torch.Size((0,))))
        return LoadPlan(items)

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        return global_plan

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        self.objects[read_item.dest_index.fqn] = torch.load(value, weights_only=False)

    def resolve_tensor(self, read_item: ReadItem) -> Tensor:
        buffer = self.requests[read_item.dest_index.fqn][0]
        view = buffer
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            view = view.narrow(dim, start, length)
        return view

    def commit_tensor(self, read_item: ReadItem, tensor: Tensor) -> None:
        self.copied[read_item.dest_index.fqn] += math.prod(read_item.lengths)


class DistCheckpointReader:
    """Random access to the tensors of a megatron ``torch_dist`` checkpoint directory."""

    def __init__(self, directory: str):
        self.directory = directory
        meta_path = os.path.join(directory, MEGATRON_METADATA)
        if not os.path.isfile(meta_path) or not os.path.isfile(os.path.join(directory, DCP_METADATA)):
            raise ConversionError(f"{directory}: not a megatron distributed checkpoint (no {MEGATRON_METADATA} "
                                  f"or {DCP_METADATA}); pass an iter_XXXXXXX directory written by the trainer "
                                  "or by hf_to_megatron")
        backend = read_json(meta_path, "the checkpoint is damaged: load an older one", ConversionError)
        sharded = backend.get("sharded_backend") if isinstance(backend, dict) else None
        if sharded != "torch_dist":
            raise ConversionError(f"{meta_path}: sharded_backend {sharded!r} is not "
                                  "supported; only 'torch_dist' checkpoints can be converted")
        self.metadata = FileSystemReader(directory).read_metadata()

    @property
    def tensors(self) -> dict[str, TensorStorageMetadata]:
        return {k: v for k, v in self.metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}

    @property
    def objects(self) -> list[str]:
        return [k for k, v in self.metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensor_md(key).size)

    def dtype(self, key: str) -> torch.dtype:
        return self._tensor_md(key).properties.dtype

    def _tensor_md(self, key: str) -> TensorStorageMetadata:
        md = self.metadata.state_dict_metadata.get(key)
        if not isinstance(md, TensorStorageMetadata):
            raise ConversionError(f"{self.directory}: the checkpoint has no tensor {key!r}")
        return md

    def read(self, requests: Sequence[tuple[str, Optional[int]]], dtype: Optional[torch.dtype] = None) -> list[Tensor]:
        """Read several regions in one pass: (key, None) = the whole tensor, (key, i) = slice i
        of axis 0 (one layer of a layer-stacked tensor), returned without that axis."""
        buffers, plan = [], {}
        for key, index in requests:
            shape = list(self.shape(key))
            offsets = [0] * len(shape)
            if index is not None:
                if not 0 <= index < shape[0]:
                    raise ConversionError(f"{self.directory}: {key} has {shape[0]} layers, asked for {index}")
                offsets[0], shape[0] = index, 1
            buffer = torch.empty(shape, dtype=self.dtype(key))
            if key in plan:
                raise ValueError(f"{key} requested twice in one read")
            plan[key] = (buffer, tuple(offsets))
            buffers.append(buffer[0] if index is not None else buffer)
        planner = _RegionLoadPlanner(plan, ())
        dcp.load({}, storage_reader=FileSystemReader(self.directory), planner=planner, no_dist=True)
        for key, (buffer, _) in plan.items():
            if planner.copied[key] != buffer.numel():
                raise ConversionError(f"{self.directory}: {key} is incomplete: the stored chunks cover "
                                      f"{planner.copied[key]} of {buffer.numel()} requested elements; "
                                      "the checkpoint is damaged, convert another iteration")
        return [b.to(dtype) if dtype is not None else b for b in buffers]

    def read_object(self, key: str) -> Any:
        planner = _RegionLoadPlanner({}, [key])
        dcp.load({}, storage_reader=FileSystemReader(self.directory), planner=planner, no_dist=True)
        return planner.objects[key]
