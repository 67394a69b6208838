"""Checkpoints: exact resume, resharding across TP/PP, atomicity, checksums, retention,
asynchronous saves, preemption.

A tiny megatron GPTModel (local spec) stands in for the UALM model: the checkpoint layer only
sees `sharded_state_dict()`, which the UALM model exposes the same way.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_utils import run_distributed
from megatron_ualm.training import checkpoint as ckpt
from megatron_ualm.training import checkpoint_files as ckpt_files
from megatron_ualm.training.signals import REQUEUE_EXIT_CODE, PreemptionHandler

ROOT = Path(__file__).resolve().parents[1]
VOCAB, HIDDEN, HEADS, LAYERS, SEQ, MB = 64, 32, 4, 2, 16, 2
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


# --- helpers (module level: spawned ranks unpickle them) -------------------------------------

def _setup(tp=1, pp=1, seed=1234, distributed_optimizer=True, vocab=VOCAB):
    """init_runtime + tiny GPT in mcore DDP + megatron Adam + cosine scheduler (``vocab``
    rows of embedding and of output layer: 65536 makes each of its two files > 16 MiB)."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.transformer import TransformerConfig
    from megatron.core.distributed import finalize_model_grads

    from megatron_ualm.runtime import init_runtime

    rt = init_runtime(tensor_parallel=tp, pipeline_parallel=pp, seed=seed, device="cpu")
    config = TransformerConfig(
        num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS,
        hidden_dropout=0.1, attention_dropout=0.0,  # dropout: the TP RNG tracker matters
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        pipeline_dtype=torch.float32, use_cpu_initialization=True,
        gradient_accumulation_fusion=False, bias_dropout_fusion=False,
        masked_softmax_fusion=False, persist_layer_norm=False)
    model = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(),
                     vocab_size=vocab, max_sequence_length=SEQ,
                     pre_process=parallel_state.is_pipeline_first_stage(),
                     post_process=parallel_state.is_pipeline_last_stage(),
                     share_embeddings_and_output_weights=False)
    ddp = DistributedDataParallel(
        config=config, module=model,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=distributed_optimizer))
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, min_lr=1e-3, weight_decay=0.01, clip_grad=1.0, bf16=False,
                        fp16=False, params_dtype=torch.float32,
                        use_distributed_optimizer=distributed_optimizer), [ddp])
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=1e-2, min_lr=1e-3, lr_warmup_steps=2, lr_decay_steps=10,
        lr_decay_style="cosine", start_wd=0.01, end_wd=0.01, wd_incr_steps=10,
        wd_incr_style="constant")
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp.no_sync
    return rt, [ddp], optimizer, scheduler


def _step(rt, chunks, optimizer, scheduler, step_seed) -> float | None:
    """One training step on a batch drawn from `step_seed`; the loss on the last stage."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    g = torch.Generator().manual_seed(step_seed)
    seq = torch.randint(0, VOCAB, (MB, SEQ + 1), generator=g)
    tokens, labels = seq[:, :-1], seq[:, 1:]
    positions = torch.arange(SEQ).expand(MB, SEQ)

    def forward_step(it, chunk):
        next(it)
        out = chunk(tokens, positions, None, labels=labels)
        return out, lambda o: (o.float().mean(), {"loss": o.float().mean().detach().clone()})

    for c in chunks:
        c.zero_grad_buffer()
    optimizer.zero_grad()
    out = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([None]), model=chunks,
        num_microbatches=1, seq_length=SEQ, micro_batch_size=MB, forward_only=False)
    ok, _, _ = optimizer.step()
    assert ok
    scheduler.step(1)
    return float(out[0]["loss"]) if out else None


def _draws() -> dict:
    """One draw from every RNG a step uses (python, numpy, torch, megatron's TP tracker)."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
    with get_cuda_rng_tracker().fork():
        tracker = torch.rand(4)
    return {"python": random.random(), "numpy": float(np.random.rand()),
            "torch": torch.rand(4), "tracker": tracker}


def _params(chunks) -> dict:
    return {k: v.detach().clone() for k, v in ckpt._unwrap(chunks[0]).state_dict().items()
            if not k.endswith("_extra_state")}


def _global_pieces(chunks) -> list:
    """(key, global shape, global slice, data) of every main-replica model tensor shard."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, is_main_replica
    pieces = []
    for chunk in chunks:
        for sh in ckpt._unwrap(chunk).sharded_state_dict().values():
            if isinstance(sh, ShardedTensor) and is_main_replica(sh.replica_id):
                pieces.append((sh.key, tuple(sh.global_shape), sh.global_slice(),
                               sh.data.detach().clone()))
    return pieces


def _assemble(results: list) -> dict:
    full = {}
    for pieces in results:
        for key, shape, where, data in pieces:
            t = full.setdefault(key, torch.full(shape, float("nan")))
            t[where] = data
    for key, t in full.items():
        assert not torch.isnan(t).any(), f"{key}: not every part was gathered"
    return full


def _clear_env(monkeypatch):
    for var in _TORCHRUN_VARS:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def runtime_guard(monkeypatch):
    _clear_env(monkeypatch)
    yield
    from megatron_ualm.runtime import shutdown_runtime
    shutdown_runtime()


# --- exact resume ---------------------------------------------------------------------------

def test_round_trip_is_exact(tmp_path, runtime_guard):
    from megatron_ualm.config import UALMConfig, load_config
    root = tmp_path / "checkpoints"
    rt, chunks, opt, sched = _setup()
    for s in range(3):
        _step(rt, chunks, opt, sched, s)
    cfg = UALMConfig()
    cfg.checkpoint.experiment_dir = str(tmp_path)
    state = ckpt.TrainState(iteration=3, consumed_rows=24, extra={"loader": {"epoch": 1, "pos": 7}})
    path = ckpt.save_checkpoint(root, 3, chunks, opt, sched, state, cfg)
    # The uninterrupted run continues: RNG draws, then one more step.
    expect_draws = _draws()
    expect_loss = _step(rt, chunks, opt, sched, 3)
    expect_params, expect_lr = _params(chunks), opt.param_groups[0]["lr"]

    from megatron_ualm.runtime import shutdown_runtime
    shutdown_runtime()
    rt, chunks, opt, sched = _setup(seed=999)  # different init and RNG: all must come from disk
    loaded = ckpt.load_checkpoint(root, chunks, opt, sched)
    assert loaded == state
    got_draws = _draws()
    for k in expect_draws:
        assert torch.equal(torch.as_tensor(got_draws[k]), torch.as_tensor(expect_draws[k])), k
    assert _step(rt, chunks, opt, sched, 3) == expect_loss
    got = _params(chunks)
    assert got.keys() == expect_params.keys()
    for k in got:
        assert torch.equal(got[k], expect_params[k]), k
    assert opt.param_groups[0]["lr"] == expect_lr

    # On-disk layout: marker, state, config, latest.
    assert path == root / "iter_0000003"
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000003", "latest"]
    assert (root / "latest").read_text() == "iter_0000003\n"
    assert json.loads((path / "train_state.json").read_text())["extra"]["loader"]["pos"] == 7
    assert load_config(str(path / "config.yaml")) == cfg
    manifest = ckpt.read_manifest(path)
    # every file is listed (megatron-core < 0.19 also writes common.pt; 0.19 keeps that state
    # inside the sharded files), the ranks' digest files are gone
    on_disk = {str(f.relative_to(path)) for f in path.rglob("*") if f.is_file() and f.name != "COMPLETE"}
    assert {"train_state.json", "config.yaml", ".metadata"} <= set(manifest["files"]) == on_disk
    assert manifest["layout"]["tp"] == 1 and manifest["contents"]["optimizer"]
    # every file has checksums; one piece of a small file is its plain sha256
    assert manifest["sha256_chunk_bytes"] == ckpt.SHA256_CHUNK_BYTES
    for rel, entry in manifest["files"].items():
        assert entry["sha256_chunks"] == [hashlib.sha256((path / rel).read_bytes()).hexdigest()], rel


def test_model_only_checkpoint_needs_load_optimizer_false(tmp_path, runtime_guard):
    root = tmp_path / "checkpoints"
    rt, chunks, opt, sched = _setup()
    _step(rt, chunks, opt, sched, 0)
    ckpt.save_checkpoint(root, 0, chunks)  # what the HF -> Megatron converter writes
    weights = _params(chunks)
    from megatron_ualm.runtime import shutdown_runtime
    shutdown_runtime()
    rt, chunks, opt, sched = _setup(seed=5)
    with pytest.raises(ckpt.CheckpointError, match="load_optimizer=False"):
        ckpt.load_checkpoint(root, chunks, opt, sched)
    state = ckpt.load_checkpoint(root, chunks, opt, sched, load_optimizer=False)
    assert state.iteration == 0
    for k, v in _params(chunks).items():
        assert torch.equal(v, weights[k]), k
    # The distributed optimizer's fp32 main params follow the loaded weights: a step with
    # lr=0 must leave them unchanged.
    for g in opt.param_groups:
        g["lr"], g["weight_decay"] = 0.0, 0.0
    sched.max_lr = sched.min_lr = 0.0
    _step(rt, chunks, opt, sched, 1)
    for k, v in _params(chunks).items():
        assert torch.equal(v, weights[k]), k


# --- atomicity, corruption, retention -------------------------------------------------------

@pytest.fixture(scope="module")
def three_checkpoints(tmp_path_factory):
    """iter_0000001..3 of a tiny model-only run, saved once; tests copy the tree."""
    saved = {v: os.environ.pop(v) for v in _TORCHRUN_VARS if v in os.environ}
    root = tmp_path_factory.mktemp("ckpts") / "checkpoints"
    from megatron_ualm.runtime import shutdown_runtime
    try:
        rt, chunks, opt, sched = _setup()
        for it in (1, 2, 3):
            ckpt.save_checkpoint(root, it, chunks, train_state=ckpt.TrainState(it, it * 8))
    finally:
        shutdown_runtime()
        os.environ.update(saved)
    return root


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "checkpoints"
    shutil.copytree(src, dst)
    return dst


def _big_file(path: Path) -> Path:
    return max((p for p in path.iterdir() if p.is_file()), key=lambda p: p.stat().st_size)


def test_partial_and_corrupt_checkpoints_are_skipped(three_checkpoints, tmp_path, caplog):
    root = _copy(three_checkpoints, tmp_path)
    assert ckpt.find_latest_checkpoint(root) == root / "iter_0000003"
    # A save killed mid-way: a newer .tmp- dir (ignored) and a dir without COMPLETE (skipped).
    shutil.copytree(root / "iter_0000003", root / "iter_0000005.tmp-abc123")
    shutil.copytree(root / "iter_0000003", root / "iter_0000004")
    (root / "iter_0000004" / "COMPLETE").unlink()
    # A truncated tensor file in the newest complete one.
    victim = _big_file(root / "iter_0000003")
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    with caplog.at_level("WARNING"):
        assert ckpt.find_latest_checkpoint(root) == root / "iter_0000002"
    assert "iter_0000004" in caplog.text and "no COMPLETE marker" in caplog.text
    assert "iter_0000003" in caplog.text and victim.name in caplog.text and "truncated" in caplog.text
    assert "tmp-abc123" not in caplog.text
    # A bit flip in a small (checksummed) file.
    meta = root / "iter_0000002" / "train_state.json"
    meta.write_text(meta.read_text().replace('"consumed_rows": 16', '"consumed_rows": 99'))
    assert "checksum" in " ".join(ckpt.verify_checkpoint(root / "iter_0000002"))
    assert ckpt.find_latest_checkpoint(root) == root / "iter_0000001"
    # Asking for a corrupt one explicitly is refused with what is wrong.
    with pytest.raises(ckpt.CheckpointError, match=r"refusing to load .*iter_0000003.*truncated"):
        ckpt.resolve_checkpoint(root / "iter_0000003")
    with pytest.raises(ckpt.CheckpointError, match="no COMPLETE marker"):
        ckpt.resolve_checkpoint(root / "iter_0000004")
    # An experiment dir or checkpoints dir resolves to the newest valid one.
    assert ckpt.resolve_checkpoint(tmp_path) == root / "iter_0000001"


def test_retention_and_stale_cleanup(three_checkpoints, tmp_path, runtime_guard):
    root = _copy(three_checkpoints, tmp_path)
    (root / "latest").write_text("iter_0000001\n")  # e.g. a user pinned an old one
    assert ckpt.apply_retention(root, keep_last=1) == [root / "iter_0000002"]
    assert sorted(p.name for p in root.glob("iter_*")) == ["iter_0000001", "iter_0000003"]
    # A save cleans up leftovers of killed saves and keeps the last N after it completed.
    (root / "iter_0000009.tmp-deadbeef").mkdir()
    (root / "latest").write_text("iter_0000003\n")
    rt, chunks, opt, sched = _setup()
    ckpt.save_checkpoint(root, 4, chunks, keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000003", "iter_0000004", "latest"]
    assert ckpt.save_checkpoint(root, 4, chunks) == root / "iter_0000004"  # already there: kept


def test_unsafe_pickle_is_refused(three_checkpoints, tmp_path):
    root = _copy(three_checkpoints, tmp_path)
    path = root / "iter_0000003"

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (path / ".metadata").write_bytes(__import__("pickle").dumps(Evil()))
    with pytest.raises(ckpt.CheckpointError, match="refusing to unpickle"):
        ckpt.check_safe_to_unpickle(path)


def test_manifests_from_before_checksums_of_large_files_still_load(three_checkpoints, tmp_path):
    """COMPLETE as written before every file was hashed: a sha256 for files up to 16 MiB."""
    root = _copy(three_checkpoints, tmp_path)
    path = root / "iter_0000003"
    manifest = ckpt.read_manifest(path)
    del manifest["sha256_chunk_bytes"]
    manifest["files"] = {rel: {"size": e["size"], "sha256": e["sha256_chunks"][0] if e["size"] <= 16 * 2**20 else None}
                         for rel, e in manifest["files"].items()}
    (path / "COMPLETE").write_text(json.dumps(manifest))
    assert ckpt.verify_checkpoint(path) == [] and ckpt.find_latest_checkpoint(root) == path
    _flip(path / "train_state.json", 2, 1)
    assert [p.split(":")[0] for p in ckpt.verify_checkpoint(path)] == ["train_state.json"]
    assert "checksum" in ckpt.verify_checkpoint(path)[0]


# --- every file checksummed: bytes flipped after the save -----------------------------------

BIG_VOCAB = 65536  # the embedding and the output layer then put each .distcp file over 16 MiB


@pytest.fixture(scope="module")
def two_big_checkpoints(tmp_path_factory):
    """iter_0000001 and iter_0000002 of a model + distributed Adam run, each of whose .distcp
    files is over 16 MiB (once checked by size only), and the weights at iteration 1."""
    saved = {v: os.environ.pop(v) for v in _TORCHRUN_VARS if v in os.environ}
    root = tmp_path_factory.mktemp("big") / "checkpoints"
    from megatron_ualm.runtime import shutdown_runtime
    try:
        rt, chunks, opt, sched = _setup(vocab=BIG_VOCAB)
        _step(rt, chunks, opt, sched, 1)
        ckpt.save_checkpoint(root, 1, chunks, opt, sched, ckpt.TrainState(1, MB))
        weights = _params(chunks)
        _step(rt, chunks, opt, sched, 2)
        ckpt.save_checkpoint(root, 2, chunks, opt, sched, ckpt.TrainState(2, 2 * MB))
    finally:
        shutdown_runtime()
        os.environ.update(saved)
    return root, weights


def _flip(path: Path, offset: int, n: int = 64) -> None:
    """Invert ``n`` bytes of ``path`` from ``offset`` (its size stays the same)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        data = f.read(n)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


def _in_large_shard(ckpt_dir: Path) -> tuple[Path, int]:
    victim = _big_file(ckpt_dir)
    assert victim.suffix == ".distcp" and victim.stat().st_size > 16 * 2**20
    return victim, victim.stat().st_size // 2


def _in_adam_state(ckpt_dir: Path) -> tuple[Path, int]:
    """The middle of the largest Adam second-moment tensor (torch DCP's index says where)."""
    from torch.distributed.checkpoint import FileSystemReader
    storage = FileSystemReader(str(ckpt_dir)).read_metadata().storage_data
    info = max((s for i, s in storage.items() if ".exp_avg_sq." in i.fqn), key=lambda s: s.length)
    return ckpt_dir / info.relative_path, info.offset + info.length // 2


@pytest.mark.parametrize("where", [_in_large_shard, _in_adam_state], ids=["large_shard", "adam_state"])
def test_flipped_bytes_mean_fall_back_on_resume_and_refusal_by_name(two_big_checkpoints, where, tmp_path,
                                                                    runtime_guard, caplog):
    src, weights_at_1 = two_big_checkpoints
    root = _copy(src, tmp_path)
    victim, offset = where(root / "iter_0000002")
    _flip(victim, offset)
    rt, chunks, opt, sched = _setup(vocab=BIG_VOCAB, seed=5)
    # Auto-resume (the checkpoints dir): the previous checkpoint, after one warning line.
    with caplog.at_level(logging.WARNING):
        assert ckpt.load_checkpoint(root, chunks, opt, sched).iteration == 1
    for k, v in _params(chunks).items():
        assert torch.equal(v, weights_at_1[k]), k
    ours = [r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING and r.name.startswith("megatron_ualm")]
    assert len(ours) == 1 and "\n" not in ours[0], ours
    assert "iter_0000002" in ours[0] and f"{victim.name}: checksum" in ours[0]
    # Named explicitly: refused in one line naming the file, the bytes and what to do.
    with pytest.raises(ckpt.CheckpointError) as refused:
        ckpt.load_checkpoint(root / "iter_0000002", chunks, opt, sched)
    message = str(refused.value)
    first = offset - offset % ckpt.SHA256_CHUNK_BYTES
    assert "\n" not in message and message.startswith(
        f"refusing to load {root / 'iter_0000002'}: {victim.name}: checksum (sha256) of bytes {first}..")
    assert "Load an older checkpoint" in message
    for k, v in _params(chunks).items():  # nothing was loaded
        assert torch.equal(v, weights_at_1[k]), k


def test_parallel_hashing_of_pieces_matches_sha256_of_the_whole(tmp_path):
    f = tmp_path / "blob"
    f.write_bytes(os.urandom(3 * 1000 + 17))
    whole = ckpt_files.chunk_digests([f], threads=2, chunk_bytes=1000)[f]
    data = f.read_bytes()
    assert whole == {"size": len(data),
                     "sha256_chunks": [hashlib.sha256(data[i:i + 1000]).hexdigest() for i in range(0, len(data), 1000)]}
    (tmp_path / "empty").write_bytes(b"")
    assert ckpt_files.chunk_digests([tmp_path / "empty"])[tmp_path / "empty"]["sha256_chunks"] == [
        hashlib.sha256(b"").hexdigest()]


# --- asynchronous saves ---------------------------------------------------------------------

def test_async_save_holds_the_state_of_the_call_while_training_goes_on(tmp_path, runtime_guard):
    rt, chunks, opt, sched = _setup()
    for s in range(2):
        _step(rt, chunks, opt, sched, s)
    at_save = _params(chunks)
    reference = ckpt.save_checkpoint(tmp_path / "sync", 2, chunks, opt, sched)
    root = tmp_path / "async"
    saves = ckpt.AsyncSaves()
    final = ckpt.save_checkpoint(root, 2, chunks, opt, sched, async_saves=saves)
    # Sealed only by a poll/wait after every rank's writer ended: until then a .tmp- dir.
    assert saves.pending == [final] and not final.exists()
    assert [p.name[:len("iter_0000002.tmp-")] for p in root.iterdir()] == ["iter_0000002.tmp-"]
    _step(rt, chunks, opt, sched, 2)  # training goes on and changes the weights in place
    # The next save finishes the pending one first.
    ckpt.save_checkpoint(root, 3, chunks, opt, sched, async_saves=saves)
    assert saves.pending == [root / "iter_0000003"] and ckpt.verify_checkpoint(final) == []
    assert saves.wait() == [root / "iter_0000003"] and saves.pending == []
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000002", "iter_0000003", "latest"]
    # The same bytes as the synchronous save of that moment (model, Adam state, RNG), so
    # resuming from either is the same; and loading gives the weights of the save call.
    sync_files, async_files = ckpt.read_manifest(reference)["files"], ckpt.read_manifest(final)["files"]
    assert sync_files.keys() == async_files.keys()
    assert all(sync_files[f] == async_files[f] for f in sync_files if f != ".metadata")  # it holds a unique id
    from megatron_ualm.runtime import shutdown_runtime
    shutdown_runtime()
    rt, chunks, opt, sched = _setup(seed=7)
    assert ckpt.load_checkpoint(final, chunks, opt, sched).iteration == 2
    for k, v in _params(chunks).items():
        assert torch.equal(v, at_save[k]), k


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _save_async_dp2(root: str):
    rt, chunks, opt, sched = _setup()  # 2 ranks, TP=PP=1: data-parallel, distributed optimizer
    _step(rt, chunks, opt, sched, 0)
    records = _Records()
    logging.getLogger("megatron_ualm").addHandler(records)
    saves = ckpt.AsyncSaves()
    ckpt.save_checkpoint(root, 1, chunks, opt, sched, async_saves=saves)
    _step(rt, chunks, opt, sched, 1)
    return {"done": [str(p) for p in saves.wait()], "warnings": records.messages}


@pytest.mark.slow
def test_async_save_of_two_ranks_has_every_file_hashed_by_its_writer(tmp_path):
    root = tmp_path / "checkpoints"
    results = run_distributed(_save_async_dp2, 2, str(root))
    assert [r["done"] for r in results] == [[str(root / "iter_0000001")]] * 2
    assert [r["warnings"] for r in results] == [[], []]  # rank 0 re-hashed nothing
    manifest = ckpt.read_manifest(root / "iter_0000001")
    writers = {f.split("_")[2] for f in manifest["files"] if f.endswith(".distcp")}
    assert writers == {"0", "1"} and ckpt.verify_checkpoint(root / "iter_0000001") == []
    assert not list((root / "iter_0000001").glob(".digests*"))


# --- resharding (multi-process) -------------------------------------------------------------

def _save_tp2(root: str):
    rt, chunks, opt, sched = _setup(tp=2)
    for s in range(2):
        _step(rt, chunks, opt, sched, s)
    # A signal on one rank stops both (all-reduce MAX inside should_stop).
    handler = PreemptionHandler()
    if rt.rank == 1:
        os.kill(os.getpid(), signal.SIGUSR1)
    stop = handler.should_stop()
    handler.uninstall()
    ckpt.save_checkpoint(root, 2, chunks, opt, sched, ckpt.TrainState(2, 4))
    return {"stop": stop, "pieces": _global_pieces(chunks)}


def _load_at_and_report(root: str, tp: int, pp: int):
    rt, chunks, opt, sched = _setup(tp=tp, pp=pp, seed=77)
    state = ckpt.load_checkpoint(root, chunks, opt, sched)
    pieces = _global_pieces(chunks)
    loss = _step(rt, chunks, opt, sched, 2)
    return {"iteration": state.iteration, "pieces": pieces, "loss": loss,
            "lr": opt.param_groups[0]["lr"]}


@pytest.mark.slow
def test_reshard_tp2_to_tp1_and_pp2(tmp_path, runtime_guard):
    root = str(tmp_path / "checkpoints")
    saved = run_distributed(_save_tp2, 2, root)
    assert [r["stop"] for r in saved] == [True, True]
    reference = _assemble([r["pieces"] for r in saved])
    for world, tp, pp in ((1, 1, 1), (2, 1, 2)):
        if world == 1:  # single process: this one (saves a process start on 2 cores)
            results = [_load_at_and_report(root, tp, pp)]
            from megatron_ualm.runtime import shutdown_runtime
            shutdown_runtime()
        else:
            results = run_distributed(_load_at_and_report, world, root, tp, pp)
        got = _assemble([r["pieces"] for r in results])
        assert got.keys() == reference.keys()
        for key in got:
            assert torch.equal(got[key], reference[key]), (tp, pp, key)
        assert all(r["iteration"] == 2 for r in results)
        losses = [r["loss"] for r in results if r["loss"] is not None]
        assert losses and all(np.isfinite(losses))
        assert len({r["lr"] for r in results}) == 1


# --- preemption -----------------------------------------------------------------------------

_FAKE_TRAINER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from test_checkpoint import _setup, _step
    from megatron_ualm.training import checkpoint as ckpt
    from megatron_ualm.training.signals import PreemptionHandler
    from megatron_ualm.runtime import shutdown_runtime

    def main():
        rt, chunks, opt, sched = _setup()
        preemption = PreemptionHandler()
        it = 0
        try:
            while it < 10_000:
                _step(rt, chunks, opt, sched, it)
                it += 1
                if it == 1:
                    print("READY", flush=True)
                time.sleep(0.05)
                if preemption.should_stop():
                    ckpt.save_checkpoint({root!r}, it, chunks, opt, sched, ckpt.TrainState(it, it))
                    preemption.exit_for_requeue()
        finally:
            shutdown_runtime()

    if __name__ == "__main__":  # megatron's checkpoint writer spawns a helper process
        main()
""")


@pytest.mark.slow
def test_sigterm_saves_and_exits_for_requeue(tmp_path):
    root = tmp_path / "checkpoints"
    script = tmp_path / "fake_trainer.py"
    script.write_text(_FAKE_TRAINER.format(tests=str(ROOT / "tests"), root=str(root)))
    env = {k: v for k, v in os.environ.items() if k not in _TORCHRUN_VARS}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=str(tmp_path))
    try:
        assert proc.stdout.readline().strip() == "READY"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == REQUEUE_EXIT_CODE, err[-3000:]
    latest = ckpt.find_latest_checkpoint(root)
    assert latest is not None and not ckpt.verify_checkpoint(latest)
    state = ckpt.TrainState.from_json((latest / "train_state.json").read_text())
    assert state.iteration >= 1 and latest.name == ckpt.checkpoint_name(state.iteration)
