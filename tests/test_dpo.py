"""DPO: the loss and its gradients against a plain full-vocabulary PyTorch implementation,
pairs kept together in rows, reference scoring (resume after a kill, refusal of another
checkpoint's or dataset's numbers, TP=2 = TP=1), TP=2 / PP=2 training = TP=1, exact resume,
and a few steps that teach the tiny model the preferred side."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dist_utils import run_distributed
from tiny_training import C, K, TEXT_ROWS, TINY_YAML, VOCAB, _meta
from megatron_ualm.config import ConfigError, load_config
from megatron_ualm.data.indexed import DocumentWriter, TokenizedDataset
from megatron_ualm.formats import build_segments
from megatron_ualm.formats import templates as T

HERE = Path(__file__).resolve().parent


# --- fixtures: a starting checkpoint and preference sets -------------------------------------------
def _write_side(prefix, captions, codes):
    w = DocumentWriter(prefix, with_audio=False)
    for cap, c in zip(captions, codes):
        w.add_document(build_segments([T.Message("user", "text", cap), T.Message("assistant", "audio", c)], VOCAB))
    w.finalize(_meta("caption_to_audio", len(captions)))


def write_preference_set(prefix, n, seed):
    """Chosen audio follows the caption (codes count up from its first token); rejected audio
    is random and of another length. Same captions on both sides."""
    rng = np.random.default_rng(seed)
    caps = [rng.integers(1, TEXT_ROWS, size=3).tolist() for _ in range(n)]
    chosen, rejected = [], []
    for cap in caps:
        f = int(rng.integers(4, 9))
        chosen.append((np.arange(f)[None, :] + cap[0] + np.arange(K)[:, None]) % C)
        rejected.append(rng.integers(0, C, size=(K, int(rng.integers(4, 9)))))
    _write_side(f"{prefix}.chosen", caps, chosen)
    _write_side(f"{prefix}.rejected", caps, rejected)
    Path(f"{prefix}.pairs.json").write_text(json.dumps({"pairs": n, "source": "test"}))
    return prefix


def base_overrides(exp):
    return [f"model.text_vocab_size={TEXT_ROWS}", f"model.num_codebooks={K}", f"model.codebook_size={C}",
            "data.seq_length=128", "data.num_workers=0", "data.cfg_dropout_prob=0.2",
            "training.micro_batch_size=2", "training.global_batch_size=4", "training.log_interval=1",
            "training.eval_interval=1000", "optimizer.warmup_iters=0", "optimizer.lr=1e-3",
            f"checkpoint.experiment_dir={exp}", "checkpoint.save_interval=1000", "checkpoint.keep_last=5"]


def dpo_overrides(root, exp, *more):
    return base_overrides(exp) + [
        "training.objective=dpo", "training.train_iters=2",
        f"data.train=[{{path: {root}/pref_a, task: preference, weight: 2}}, "
        f"{{path: {root}/pref_b, task: preference, weight: 1}}]",
        f"data.valid=[{{path: {root}/pref_v, task: preference}}]",
        f"checkpoint.load={root}/start/checkpoints/iter_0000002", *more]


def dpo_config(root, exp, *more):
    return load_config(TINY_YAML, dpo_overrides(root, exp, *more))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from megatron_ualm.training.loop import pretrain
    from megatron_ualm.training.reference import score_reference
    root = tmp_path_factory.mktemp("dpo")
    write_preference_set(root / "pref_a", 24, 1)
    write_preference_set(root / "pref_b", 12, 2)
    write_preference_set(root / "pref_v", 8, 3)
    # a starting checkpoint: two LM steps on the chosen side (checkpoints 1 and 2)
    pretrain(load_config(TINY_YAML, base_overrides(root / "start") + [
        "training.train_iters=2", "checkpoint.save_interval=1",
        f"data.train=[{{path: {root}/pref_a.chosen, task: caption_to_audio}}]"]))
    score_reference(dpo_config(root, root / "unused"))
    return root


# --- the loss against a plain implementation -------------------------------------------------------
def plain_logps(model, batch, P):
    """log pi per packed document from full-vocabulary log_softmax of the model's logits."""
    hidden = model(batch["tokens"], batch["position_ids"], batch["document_ids"])  # final hidden states
    logits = type(model.head).logits
    stream0, streams = logits.__wrapped__(model.head, hidden)  # the sampling logits, with autograd
    labels, w = batch["labels"], batch["loss_weights"]
    lp0 = F.log_softmax(stream0, -1).gather(-1, labels[..., :1])[..., 0]             # [B, S]
    lps = [lp0]
    for k in range(1, K):
        lo = VOCAB.codebook_range(k)[0]
        lps.append(F.log_softmax(streams[:, :, k - 1], -1).gather(-1, (labels[..., k:k + 1] - lo).clamp(min=0))[..., 0])
    logp = torch.stack(lps, -1) * w                                                    # [B, S, K]
    audio = (w[..., 0] > 0) & (w[..., 0] < 1)
    out = torch.zeros(labels.shape[0], 2 * P, dtype=torch.float64)
    for b in range(labels.shape[0]):
        for d in range(2 * P):
            rows = audio[b] & (batch["document_ids"][b] == d)
            out[b, d] = logp[b][rows].sum().double() if rows.any() else 0.0
    sums = -(torch.stack(lps, -1) * w).sum(-1)
    sft = torch.zeros(labels.shape[0], P, dtype=torch.float64)
    for b in range(labels.shape[0]):
        for j in range(P):
            rows = batch["document_ids"][b] == 2 * j
            sft[b, j] = sums[b][rows].sum() / (w[b, rows, 0] > 0).sum().clamp(min=1)
    return out.view(-1, P, 2), sft


def test_loss_and_gradients_equal_plain_pytorch(root):
    from megatron_ualm.model.transformer_config import transformer_config_from
    from megatron_ualm.model.ualm_model import build_ualm_model
    from megatron_ualm.runtime import init_runtime, shutdown_runtime
    from megatron_ualm.training.dpo import dpo_loss_func
    from megatron_ualm.training.providers import build_datasets
    cfg = dpo_config(root, root / "plain", "data.cfg_dropout_prob=0.5", "dpo.sft_weight=0.3")
    init_runtime(device="cpu", seed=3)
    try:
        train, _ = build_datasets(cfg, 8)
        batch = train.collate([train[i] for i in range(3)])
        assert (batch["pair_index"] >= 0).sum() >= 4 and batch["pair_index"].shape[1] > 1  # packed pairs
        model = build_ualm_model(cfg.model, transformer_config_from(cfg.model, cfg.parallel, "fp32",
                                                                    use_cpu_initialization=True))
        params = [p for p in model.parameters() if p.requires_grad]
        out = model(batch["tokens"], batch["position_ids"], batch["document_ids"], batch["labels"],
                    loss_weights=batch["loss_weights"])
        numerator, pairs, report = dpo_loss_func(0.1, 0.3, batch, out)
        loss = numerator / pairs
        grads = torch.autograd.grad(loss, params, allow_unused=True)

        P = batch["pair_index"].shape[1]
        logps, sft = plain_logps(model, batch, P)
        valid = batch["pair_index"] >= 0
        ratio = logps - batch["reference_logps"]
        per_pair = -F.logsigmoid(0.1 * (ratio[..., 0] - ratio[..., 1])) + 0.3 * sft
        expected = per_pair[valid].mean()
        expected_grads = torch.autograd.grad(expected.float(), params, allow_unused=True)
    finally:
        shutdown_runtime()
    assert int(pairs) == int(valid.sum())
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads, expected_grads):
        if e is None:
            assert g is None or not g.abs().any()
            continue
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    # the logged accuracy counts pairs with a positive margin
    margin = 0.1 * (ratio[..., 0] - ratio[..., 1])
    assert report["report"][3].item() == (valid & (margin > 0)).sum().item()


def test_pairs_stay_together_with_one_guidance_decision(root):
    from megatron_ualm.runtime import init_runtime, shutdown_runtime
    from megatron_ualm.training.providers import build_datasets
    cfg = dpo_config(root, root / "rows", "data.cfg_dropout_prob=0.5")
    init_runtime(device="cpu")
    try:
        train, valid = build_datasets(cfg, 40)
    finally:
        shutdown_runtime()
    sides = {name: [TokenizedDataset(f"{root}/{name}.{s}") for s in ("chosen", "rejected")]
             for name in ("pref_a", "pref_b")}
    seen, dropped = set(), 0
    for i in range(40):
        row = train[i]
        for slot, (p, d) in enumerate(zip(row["pair_index"], row["pair_dataset"])):
            name = ("pref_a", "pref_b")[d]
            got = []
            for side in range(2):
                at = row["document_ids"] == 2 * slot + side
                ex = T.layout(sides[name][side].segments(int(p)), VOCAB)
                assert at.sum() == ex.num_rows - 1
                tokens = row["tokens"][at]
                kept = tokens[ex.target_audio_rows[0]:]
                assert np.array_equal(kept, ex.tokens[ex.target_audio_rows[0]:-1])  # its own audio
                got.append(bool((tokens[:ex.target_audio_rows[0]] == 0).all()))
            assert got[0] == got[1]  # one classifier-free-guidance decision per pair
            dropped += got[0]
            seen.add((name, int(p)))
    assert 0 < dropped and len(seen) == 36  # both sets are read
    assert sum(len(valid["preference"][i]["pair_index"]) for i in range(len(valid["preference"]))) == 8


def test_mismatched_reference_is_refused_naming_both(root, tmp_path):
    from megatron_ualm.data.pair_rows import PreferenceError
    from megatron_ualm.runtime import init_runtime, shutdown_runtime
    from megatron_ualm.training.providers import build_datasets
    start = root / "start" / "checkpoints"
    init_runtime(device="cpu")
    try:
        cfg = dpo_config(root, tmp_path / "x", f"dpo.reference_checkpoint={start}/iter_0000001")
        with pytest.raises(PreferenceError) as e:
            build_datasets(cfg, 4)
        # another version of the dataset: one pair's rejected audio rebuilt
        for f in root.glob("pref_v*"):
            if ".reference." in f.name or f.name.startswith("pref_v."):
                (shutil.copytree if f.is_dir() else shutil.copy)(f, tmp_path / f.name)
        write_preference_set(tmp_path / "pref_v", 8, 4)
        cfg2 = load_config(TINY_YAML, dpo_overrides(root, tmp_path / "y") + [
            f"data.valid=[{{path: {tmp_path}/pref_v, task: preference}}]"])
        with pytest.raises(PreferenceError) as e2:
            build_datasets(cfg2, 4)
    finally:
        shutdown_runtime()
    msg = str(e.value)
    assert "\n" not in msg and "iter_0000002" in msg and "iter_0000001" in msg and "score_reference" in msg
    msg2 = str(e2.value)
    assert "\n" not in msg2 and "pref_v" in msg2 and msg2.count("on dataset") == 2
    # the CLI says it in one line too
    with pytest.raises(ConfigError):
        load_config(TINY_YAML, dpo_overrides(root, tmp_path / "z", "dpo.beta=0"))


def copy_sets(root, to):
    """The preference sets without their reference numbers, and the starting checkpoint."""
    to.mkdir()
    for f in root.glob("pref_*"):
        if ".reference." not in f.name:
            shutil.copy(f, to / f.name)
    (to / "start").symlink_to(root / "start")
    return to


def test_config_ties_the_objective_to_preference_sets(tmp_path):
    with pytest.raises(ConfigError, match=r"^data.train\[0\].task: training.objective=dpo trains on preference"):
        load_config(TINY_YAML, base_overrides(tmp_path) + ["training.objective=dpo", "checkpoint.load=x"])
    with pytest.raises(ConfigError, match=r"^data.train\[0\].task: a preference dataset needs training.objective=dpo"):
        load_config(TINY_YAML, base_overrides(tmp_path) + ["data.train=[{path: p, task: preference}]"])
    with pytest.raises(ConfigError, match=r"^dpo.reference_checkpoint: .* set checkpoint.load"):
        load_config(TINY_YAML, base_overrides(tmp_path) + [
            "training.objective=dpo", "data.train=[{path: p, task: preference}]", "data.valid=[]"])


SCORE_RUNNER = """
import os, sys
sys.path.insert(0, {here!r})
from megatron_ualm.training import reference
save, written = reference._save_npy, []
def dying_save(path, values):
    save(path, values)
    written.append(path)
    if len(written) == 2:
        os._exit(9)  # killed after two chunks
reference._save_npy = dying_save
from test_dpo import dpo_config
cfg = dpo_config(sys.argv[1], sys.argv[2])
reference.score_reference(cfg, reference.ScoreOptions(chunk_pairs=5))
"""


def test_scoring_resumes_after_a_kill_with_identical_numbers(root, tmp_path):
    data = copy_sets(root, tmp_path / "data")
    script = tmp_path / "runner.py"
    script.write_text(SCORE_RUNNER.format(here=str(HERE)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, str(script), str(data), str(tmp_path / "e")], env=env,
                            capture_output=True, text=True, timeout=200)
    assert killed.returncode == 9, killed.stderr[-2000:]
    parts = list(data.glob("pref_a.reference.*.parts/chunk-*.npy"))
    assert len(parts) == 2 and not list(data.glob("pref_a.reference.*.npy"))
    cmd = [sys.executable, "-m", "megatron_ualm.score_reference", "--config", TINY_YAML, "--chunk-pairs", "5",
           *dpo_overrides(data, tmp_path / "e")]
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=200)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "pairs in" in again.stdout
    for name in ("pref_a", "pref_b", "pref_v"):
        [got] = data.glob(f"{name}.reference.*.npy")
        [want] = root.glob(f"{name}.reference.*.npy")
        assert got.name == want.name
        assert np.array_equal(np.load(got), np.load(want))  # bitwise, chunking aside
    assert not list(data.glob("*.parts"))


# --- training -----------------------------------------------------------------------------------
def _metrics(exp, kind="train"):
    out = []
    for line in (Path(exp) / "logs" / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["kind"] == kind:
            out.append(r)
    return out


def test_dpo_steps_learn_the_preference_and_resume_exactly(root, tmp_path):
    from megatron_ualm.training.loop import pretrain
    exp = tmp_path / "run"
    more = ["training.train_iters=8", "checkpoint.save_interval=4", "training.eval_interval=4",
            "training.eval_iters=4", "optimizer.lr=3e-3", "dpo.beta=0.5", "data.cfg_dropout_prob=0",
            f"data.valid=[{{path: {root}/pref_a, task: preference}}]"]
    pretrain(dpo_config(root, exp, *more))
    train = _metrics(exp)
    assert [r["step"] for r in train] == list(range(1, 9))
    for key in ("dpo/reward_margin", "dpo/accuracy", "dpo/chosen_logratio", "dpo/rejected_logratio"):
        assert key in train[0]
    assert abs(train[0]["loss"] - np.log(2)) < 1e-4  # policy = reference at the first step
    valid = _metrics(exp, "valid")
    assert valid[-1]["loss/preference"] < valid[0]["loss/preference"] < np.log(2)
    assert valid[-1]["dpo/accuracy/preference"] > 0.7

    shutil.rmtree(exp / "checkpoints" / "iter_0000008")
    pretrain(dpo_config(root, exp, *more))
    again = _metrics(exp)[8:]
    assert [r["step"] for r in again] == [5, 6, 7, 8]
    assert [r["loss"] for r in again] == [r["loss"] for r in train[4:]]  # bitwise


def _parallel_train(root, exp, tp, pp):
    from megatron_ualm.training.loop import pretrain
    pretrain(dpo_config(root, exp, f"parallel.tensor_parallel={tp}", f"parallel.pipeline_parallel={pp}"))


def _parallel_score(root, exp, tp):
    from megatron_ualm.training.reference import score_reference
    score_reference(dpo_config(root, exp, f"parallel.tensor_parallel={tp}"))


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_tp2_pp2_equal_tp1(root, tmp_path, tp, pp):
    from megatron_ualm.training.loop import pretrain
    single = root / "single"
    if not single.exists():
        pretrain(dpo_config(root, single))
    score_dir = None
    if tp == 2:  # scoring at TP=2 gives TP=1's numbers (a copy of the sets, same checkpoint)
        score_dir = copy_sets(root, tmp_path / "data")
        run_distributed(_parallel_score, 2, str(score_dir), str(tmp_path / "score"), tp, timeout=240)
    run_distributed(_parallel_train, 2, str(root), str(tmp_path / "run"), tp, pp, timeout=240)
    want, got = _metrics(single), _metrics(tmp_path / "run")
    assert len(got) == len(want) == 2
    for a, b in zip(got, want):  # step 2 runs on the weights after one optimizer step
        for key in ("loss", "dpo/reward_margin", "dpo/chosen_logratio"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-5), (key, a["step"])
    if score_dir:
        for name in ("pref_a", "pref_b", "pref_v"):
            [g] = score_dir.glob(f"{name}.reference.*.npy")
            [w] = root.glob(f"{name}.reference.*.npy")
            np.testing.assert_allclose(np.load(g), np.load(w), rtol=1e-5, atol=1e-5)
