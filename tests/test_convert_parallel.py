"""HF -> Megatron -> (load at TP x PP over gloo, save with the trainer's checkpoint code) -> HF
is bit-exact, for tied / untied embeddings and GQA ratios 1 and 2."""
from __future__ import annotations

import os

import pytest
import torch

from convert_utils import assert_hf_roundtrip_exact, make_hf_qwen2, ualm_cfg
from dist_utils import run_distributed

pytestmark = pytest.mark.slow  # multi-process (gloo)

MODELS = {"tied_gqa2": dict(tied=True, kv_heads=2), "untied_gqa1": dict(tied=False, kv_heads=4)}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from megatron_ualm.convert import convert_hf_to_megatron
    root = tmp_path_factory.mktemp("convert_parallel")
    out = {}
    for name, kw in MODELS.items():
        hf_dir = make_hf_qwen2(str(root / f"{name}_hf"), layers=4, seed=len(out), **kw)
        convert_hf_to_megatron(hf_dir, str(root / f"{name}_meg"), ualm_cfg("qwen2_5_omni"), show_progress=False)
        out[name] = (hf_dir, str(root / f"{name}_meg"))
    return root, out


def _reload_and_save(experiments: dict, layouts: list, dst: str):
    """Every rank, for each (tp, pp) layout in turn: build the model, load each converted
    checkpoint, save it again with the trainer's save_checkpoint."""
    from megatron_ualm.config import load_config
    from megatron_ualm.model.transformer_config import transformer_config_from
    from megatron_ualm.model.ualm_model import build_ualm_model
    from megatron.core import parallel_state
    from megatron_ualm.runtime import init_runtime
    from megatron_ualm.training.checkpoint import load_checkpoint, save_checkpoint
    layers = {}
    for tp, pp in layouts:
        init_runtime(tensor_parallel=tp, pipeline_parallel=pp, device="cpu")
        for name, meg in experiments.items():
            cfg = load_config(os.path.join(meg, "config.yaml"))
            cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel = tp, pp
            model = build_ualm_model(cfg.model, transformer_config_from(cfg.model, cfg.parallel, "fp32"))
            load_checkpoint(meg, [model], strict=True)
            save_checkpoint(os.path.join(dst, f"tp{tp}pp{pp}", name, "checkpoints"), 7, [model], config=cfg,
                            save_rng=False)
            layers[(tp, pp, name)] = len(model.decoder.layers)
        parallel_state.destroy_model_parallel()  # the next layout reuses the process group
    return layers


def _check_export(root, models, layout_dir):
    from convert_utils import read_safetensors_dir
    from megatron_ualm.convert import convert_megatron_to_hf
    for name, (hf_dir, meg) in models.items():
        out = os.path.join(layout_dir, f"{name}_hf")
        report = convert_megatron_to_hf(os.path.join(layout_dir, name), out, show_progress=False)
        print(report.format())
        assert_hf_roundtrip_exact(hf_dir, out, tied=MODELS[name]["tied"])
        ref = os.path.join(root, f"{name}_hf_ref")  # the UALM-only rows and the encoder survive too
        if not os.path.isdir(ref):
            convert_megatron_to_hf(meg, ref, show_progress=False)
        a = read_safetensors_dir(ref, ["ualm_extras.safetensors"])
        b = read_safetensors_dir(out, ["ualm_extras.safetensors"])
        assert sorted(a) == sorted(b)
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)


# world size -> the layouts it runs one after the other (TP=1 x PP=1: test_convert.py)
LAYOUTS = {2: [(2, 1), (1, 2)], 4: [(2, 2)]}


@pytest.mark.parametrize("world", sorted(LAYOUTS))
def test_roundtrip_through_parallel_layouts_is_bit_exact(converted, world):
    root, models = converted
    dst = str(root / f"world{world}")
    results = run_distributed(_reload_and_save, world, {n: m for n, (_, m) in models.items()},
                              LAYOUTS[world], dst, timeout=300)
    for tp, pp in LAYOUTS[world]:
        assert all(r[(tp, pp, "tied_gqa2")] == 4 // pp for r in results)
        _check_export(root, models, os.path.join(dst, f"tp{tp}pp{pp}"))
