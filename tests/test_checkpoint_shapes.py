"""A checkpoint whose shapes or vocabulary layout differ from the config: refused before
megatron loads it, with one line naming both values; TP padding is no difference;
``checkpoint.expand_vocab`` grows the text rows keeping every old row at its id; the HF export
refuses a config.yaml that does not describe its tensors.

Real checkpoints of a tiny UALM (64 text rows, 4 codebooks of 16 codes: 388 rows, padded to
512), saved once per module with the trainer's ``save_checkpoint``.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_utils import run_distributed
from tiny_training import C, K, TEXT_ROWS, tiny_config

ROOT = Path(__file__).resolve().parents[1]
TABLES = ("embedding.word_embeddings.weight", "head.output_layer.weight")


def _cfg(data: str, exp: str, *overrides: str):
    """The trainer's tiny config without the audio encoder (faster to build)."""
    return tiny_config(data, exp, "model.encoder.kind=none", *overrides)


def _model(model_cfg, tp: int = 1):
    from megatron_ualm.config import ParallelConfig
    from megatron_ualm.model.transformer_config import transformer_config_from
    from megatron_ualm.model.ualm_model import build_ualm_model
    return build_ualm_model(model_cfg, transformer_config_from(model_cfg, ParallelConfig(tensor_parallel=tp), "fp32"))


def _weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


@pytest.fixture(scope="module")
def runtime():
    from megatron_ualm.runtime import init_runtime, shutdown_runtime
    saved = {v: os.environ.pop(v) for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
             if v in os.environ}
    rt = init_runtime(device="cpu", seed=11)
    yield rt
    shutdown_runtime()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, runtime):
    """{"cfg": the run config, "weights": the model's, "with_config" / "without_config" /
    "wrong_config": checkpoint dirs (config.yaml of the run / none / one with codebook_size=8)}."""
    from megatron_ualm.training.checkpoint import save_checkpoint
    root = tmp_path_factory.mktemp("shapes")
    cfg = _cfg(str(root / "data"), str(root / "run"))
    model = _model(cfg.model)
    with torch.no_grad():  # every row distinct from a fresh init, the <|pad|> row stays zero
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.1)
        model.embedding.word_embeddings.weight[0].zero_()
    wrong = _cfg(str(root / "data"), str(root / "run"), "model.codebook_size=8")
    out = {"cfg": cfg, "weights": _weights(model), "root": root}
    for name, config in (("with_config", cfg), ("without_config", None), ("wrong_config", wrong)):
        out[name] = save_checkpoint(root / name / "checkpoints", 100, [model], config=config, save_rng=False)
    return out


def _refusal(path, model_cfg, **kw) -> str:
    """Load ``path`` into a model built from ``model_cfg``: must be refused, the model untouched."""
    from megatron_ualm.training.checkpoint import CheckpointError, load_checkpoint
    model = _model(model_cfg)
    before = _weights(model)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, [model], **{"load_optimizer": False, "load_rng": False, **kw})
    message = str(info.value)
    print("refused:", message)
    assert "\n" not in message and str(path) in message
    after = _weights(model)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    return message


# --- refusals ---------------------------------------------------------------------------------

@pytest.mark.parametrize("override,was,now", [
    ("model.codebook_size=8", f"model.codebook_size={C} (4 x 17 = 68 audio rows)",
     "model.codebook_size=8 (4 x 9 = 36 audio rows)"),
    ("model.num_codebooks=2", f"model.num_codebooks={K} (4 x 17 = 68 audio rows)",
     "model.num_codebooks=2 (2 x 17 = 34 audio rows)"),
    ("model.text_vocab_size=32", f"model.text_vocab_size={TEXT_ROWS} (text rows [256, 320))",
     "model.text_vocab_size=32 (text rows [256, 288))"),
    ("model.num_layers=4", "model.num_layers=2", "model.num_layers=4"),
    ("model.hidden_size=128", "model.hidden_size=64, model.kv_channels=16",
     "model.hidden_size=128, model.kv_channels=32"),
    ("model.ffn_hidden_size=96", "model.ffn_hidden_size=128", "model.ffn_hidden_size=96"),
    ("model.num_query_groups=4", "model.num_query_groups=2", "model.num_query_groups=4"),
])
def test_a_shape_or_vocabulary_mismatch_is_refused_naming_both_values(saved, override, was, now):
    path = saved["with_config"]
    run = _cfg(str(saved["root"] / "data"), str(saved["root"] / "run"), override).model
    message = _refusal(path, run)
    fix = " ".join(re.findall(r"model\.\w+=\w+", was))  # the settings to set, as CLI overrides
    assert message == (f"checkpoint {path} was trained with {was} but the config says {now}; set {fix} to load "
                       f"it (its settings: {path}/config.yaml)")
    # expand_vocab only grows text rows: the other differences stay refused
    message = _refusal(path, run, expand_vocab=True)
    assert message.startswith(f"checkpoint {path} was trained with {was} but the config says {now}")


def test_more_text_rows_without_expand_vocab_says_how_to_expand(saved):
    path = saved["with_config"]
    run = _cfg(str(saved["root"] / "data"), str(saved["root"] / "run"), "model.text_vocab_size=96").model
    assert _refusal(path, run).endswith(
        "set model.text_vocab_size=64 to load it (its settings: "
        f"{path}/config.yaml), or checkpoint.expand_vocab=true to add the 32 new text rows (existing rows "
        "keep their ids, each codebook block moves up by 32)")
    # a resume (optimizer state to load) cannot grow: said before any optimizer is touched
    message = _refusal(path, run, expand_vocab=True, optimizer=object(), load_optimizer=True)
    assert message == (f"checkpoint.expand_vocab: {path} is resumed with its optimizer state, which cannot grow "
                       f"from 64 to 96 text rows; expand in a model-only load: checkpoint.load={path} with a new "
                       "checkpoint.experiment_dir")


def test_without_config_yaml_the_tensor_shapes_are_compared(saved):
    """save_checkpoint(config=None): the metadata's global shapes are all there is."""
    from megatron_ualm.training.checkpoint import load_checkpoint
    path = saved["without_config"]
    root = saved["root"]
    message = _refusal(path, _cfg(str(root / "data"), str(root / "run"), "model.num_layers=4").model)
    assert message == (f"checkpoint {path}: decoder.layers.input_layernorm.weight has shape (2, 64) but the model "
                       f"built from the config has (4, 64); {path} has no config.yaml to name the settings: set "
                       "the model.* settings it was trained with")
    message = _refusal(path, _cfg(str(root / "data"), str(root / "run"), "model.codebook_size=100").model)
    assert message == (f"checkpoint {path}: embedding.word_embeddings.weight has shape (512, 64), but the config's "
                       "vocabulary (model.text_vocab_size=64, model.num_codebooks=4, model.codebook_size=100: 724 "
                       "rows) padded for the TP=1 it was saved at (a multiple of 128) and model.hidden_size=64 "
                       f"give (768, 64); {path} has no config.yaml to name the settings: set the model.* settings "
                       "it was trained with")
    model = _model(saved["cfg"].model)  # the right config loads
    load_checkpoint(path, [model], load_optimizer=False, load_rng=False)
    assert all(torch.equal(v, saved["weights"][k]) for k, v in _weights(model).items())


def test_a_config_yaml_that_does_not_describe_its_tensors_is_refused(saved):
    """Saved from a codebook_size=16 model with a codebook_size=8 config: the tables have
    512 rows, that config's 356 rows pad to 384."""
    path = saved["wrong_config"]
    run = _cfg(str(saved["root"] / "data"), str(saved["root"] / "run"), "model.codebook_size=8").model
    assert _refusal(path, run) == (
        f"checkpoint {path}: embedding.word_embeddings.weight has shape (512, 64), but its config.yaml's "
        "vocabulary (model.text_vocab_size=64, model.num_codebooks=4, model.codebook_size=8: 356 rows) padded "
        "for the TP=1 it was saved at (a multiple of 128) and model.hidden_size=64 give (384, 64); its "
        "config.yaml does not describe its tensors; load it with the config of the run that saved it")


def test_padding_for_another_tp_is_no_mismatch():
    """Rows padded for the saved TP are right whatever TP loads them (resharding end to end:
    test_convert_parallel.py and test_training.py)."""
    from megatron_ualm.formats.vocab import UnifiedVocab
    from megatron_ualm.training.checkpoint_shapes import check_tensor_shapes
    vocab = UnifiedVocab(300, K, C)  # 624 rows: 640 at TP=1, 768 at TP=2, 1024 at TP=4
    tables = {TABLES[0]: (768, 64), TABLES[1]: (768, 64), "head.stream_embeddings": (3, 64)}
    args = dict(model={"head.stream_embeddings": (3, 64)}, tables=TABLES, vocab=vocab, hidden=64, has_config=True)
    assert check_tensor_shapes(Path("ck"), tables, saved_tp=2, **args) is None
    assert "768, 64), but its config.yaml's vocabulary" in check_tensor_shapes(Path("ck"), tables, saved_tp=4, **args)
    assert "(640, 64)" in check_tensor_shapes(Path("ck"), tables, saved_tp=1, **args)


# --- vocabulary expansion ---------------------------------------------------------------------

def _expanded(path, model_cfg, tp: int = 1, seed: int = 3):
    from megatron_ualm.training.checkpoint import load_checkpoint
    model = _model(model_cfg, tp)
    load_checkpoint(path, [model], load_optimizer=False, load_rng=False, expand_vocab=True, new_rows_seed=seed)
    return model


def test_expand_vocab_keeps_every_row_at_its_id_and_the_logits(saved):
    from megatron_ualm.formats.vocab import PAD, UnifiedVocab
    path, cfg = saved["with_config"], saved["cfg"]
    grown_cfg = _cfg(str(saved["root"] / "data"), str(saved["root"] / "run"), "model.text_vocab_size=96").model
    model = _expanded(path, grown_cfg).eval()
    old, new = UnifiedVocab(TEXT_ROWS, K, C), UnifiedVocab(96, K, C)
    got, ref = _weights(model), saved["weights"]
    assert got.keys() == ref.keys()
    for name in got.keys() - set(TABLES):
        assert torch.equal(got[name], ref[name]), name
    # the new rows: normal(0, init_method_std) in float32, embedding's then head's, seed 3
    g = torch.Generator().manual_seed(3)
    new_rows = [torch.randn(32, 64, generator=g) * cfg.model.init_method_std for _ in TABLES]
    for name, rows in zip(TABLES, new_rows):
        table, before = got[name], ref[name]
        assert table.shape == (512, 64)  # 452 rows, padded to 512
        assert torch.equal(table[:old.audio_start], before[:old.audio_start])  # special + text rows
        assert torch.equal(table[old.audio_start:new.audio_start], rows)
        assert torch.equal(table[new.audio_start:new.size], before[old.audio_start:old.size])  # codebooks
        for k in range(K):
            assert table[new.codebook_range(k)[0]].equal(before[old.codebook_range(k)[0]])
    assert torch.count_nonzero(got[TABLES[0]][PAD]) == 0

    # Old tokens (audio ids moved to their new offsets) give the old logits at the new offsets.
    reference = _model(cfg.model).eval()
    reference.load_state_dict(ref, strict=False)
    g = torch.Generator().manual_seed(0)
    tokens = torch.full((2, 12, K), PAD, dtype=torch.long)
    tokens[:, :6, 0] = torch.randint(old.text_offset, old.audio_start, (2, 6), generator=g)
    codes = torch.randint(0, C, (K, 6), generator=g).numpy()
    tokens[:, 6:, :] = torch.as_tensor(old.codes_to_unified(codes)).T
    moved = tokens.clone()
    moved[:, 6:, :] = torch.as_tensor(new.codes_to_unified(codes)).T
    positions = torch.arange(12).expand(2, 12)
    with torch.no_grad():
        l0, lk = reference.logits(tokens, positions)
        m0, mk = model.logits(moved, positions)
    assert torch.equal(m0[..., :old.audio_start], l0[..., :old.audio_start])
    assert torch.equal(m0[..., new.audio_start:new.size], l0[..., old.audio_start:old.size])
    assert torch.equal(mk, lk)


def _tables_at_tp2(path: str, overrides: list):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron_ualm.config import load_config
    from megatron_ualm.runtime import init_runtime
    init_runtime(tensor_parallel=2, device="cpu")
    model_cfg = load_config(os.path.join(path, "config.yaml"), overrides).model
    model = _expanded(path, model_cfg, tp=2)
    return [(sh.key, tuple(sh.global_shape), sh.global_slice(), sh.data.detach().clone())
            for sh in model.sharded_state_dict().values() if isinstance(sh, ShardedTensor) and sh.key in TABLES]


@pytest.mark.slow
def test_expand_vocab_at_tp2_gives_the_rows_of_tp1(saved):
    """200 text rows: 524 rows, padded to 640 at TP=1 and to 768 at TP=2."""
    from megatron_ualm.formats.vocab import UnifiedVocab
    path = saved["with_config"]
    tp1 = _weights(_expanded(path, _cfg(str(saved["root"] / "data"), str(saved["root"] / "run"),
                                        "model.text_vocab_size=200").model))
    full = {}
    for result in run_distributed(_tables_at_tp2, 2, str(path), ["model.text_vocab_size=200",
                                                                 "parallel.tensor_parallel=2"]):
        for key, shape, where, data in result:
            full.setdefault(key, torch.full(shape, float("nan")))[where] = data
    size = UnifiedVocab(200, K, C).size
    for key in TABLES:
        assert tp1[key].shape == (640, 64) and full[key].shape == (768, 64)
        assert torch.equal(full[key][:size], tp1[key][:size]), key
        assert not full[key].isnan().any(), key


# --- the trainer and the HF export ------------------------------------------------------------

@pytest.mark.slow
def test_trainer_cli_refuses_the_checkpoint_with_one_line(saved, tmp_path):
    """End to end: ``checkpoint.load`` of the saved run with another layer count: one line on
    stderr, exit 2, nothing written. (Another codebook_size would be refused earlier, by the
    data's vocabulary check, before the model is built.)"""
    path = saved["with_config"]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "megatron_ualm.train", "--config", str(path / "config.yaml"),
                        "model.num_layers=4", f"checkpoint.load={path}",
                        f"checkpoint.experiment_dir={tmp_path / 'run'}"],
                       capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300)
    expected = (f"checkpoint {path} was trained with model.num_layers=2 but the config says model.num_layers=4; "
                "set model.num_layers=2 to load it")
    # the log of the model build precedes it on stderr; the error itself is the one last line
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert lines[-1].startswith("error: ") and expected in lines[-1], lines[-3:]
    assert not (tmp_path / "run" / "checkpoints").exists()


def _export_cli():
    spec = importlib.util.spec_from_file_location("megatron_to_hf", ROOT / "checkpoints_convert" / "megatron_to_hf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_hf_export_refuses_a_config_inconsistent_with_the_tensors(saved, tmp_path, capsys):
    """Before: exit 0, the codebook rows cut at config.yaml's (wrong) offsets."""
    from megatron_ualm.convert import ConversionError, convert_megatron_to_hf
    path = saved["wrong_config"]
    expected = (f"{path}: embedding.word_embeddings.weight has shape (512, 64), but config.yaml's vocabulary "
                "(model.text_vocab_size=64, model.num_codebooks=4, model.codebook_size=8: 356 rows) padded for the "
                "TP=1 it was saved at (a multiple of 128) and model.hidden_size=64 give (384, 64); config.yaml "
                "does not describe this checkpoint (the export would cut its rows at the wrong offsets): put the "
                "config.yaml of the run that saved it there")
    with pytest.raises(ConversionError) as info:
        convert_megatron_to_hf(str(path), str(tmp_path / "a"), show_progress=False)
    assert str(info.value) == expected
    assert _export_cli()(["--checkpoint", str(path), "--out", str(tmp_path / "b"), "--no-progress"]) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {expected}"]
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    # the consistent checkpoint of the same model exports
    assert _export_cli()(["--checkpoint", str(saved["with_config"]), "--out", str(tmp_path / "c"),
                          "--no-progress"]) == 0


def test_hf_import_refuses_rows_its_ualm_config_does_not_give(saved, tmp_path):
    """load_ualm_from_hf of an export whose ualm_config.json says codebook_size=8."""
    from megatron_ualm.convert import ConversionError, convert_megatron_to_hf, load_ualm_from_hf
    out = tmp_path / "hf"
    convert_megatron_to_hf(str(saved["with_config"]), str(out), show_progress=False)
    doc = json.loads((out / "ualm_config.json").read_text())
    doc["model"]["codebook_size"] = 8
    (out / "ualm_config.json").write_text(json.dumps(doc))
    with pytest.raises(ConversionError) as info:
        load_ualm_from_hf(str(out))
    assert str(info.value) == (f"{out}: audio_embedding has 68 rows but ualm_config.json says model.num_codebooks=4 "
                               "x (1 + model.codebook_size=8) = 36 audio rows; the files do not belong together: "
                               "export the checkpoint again")
