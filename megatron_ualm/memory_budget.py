"""Will a training layout fit in GPU memory? ``python -m megatron_ualm.memory_budget``

    python -m megatron_ualm.memory_budget examples/qwen2.5-7b.yaml --gpus 8 --gpu-gib 80
    python -m megatron_ualm.memory_budget examples/qwen2.5-7b.yaml --gpus 8 --gpu-gib 80 --search
    python -m megatron_ualm.memory_budget examples/qwen2.5-7b.yaml parallel.tensor_parallel=2 --gpus 8

Without ``--search``: the per-rank breakdown of the config's own layout (key=value overrides
as for ``megatron_ualm.train``) and FITS / DOES NOT FIT with the margin; exit status 0 when
it fits, 1 when not. ``--search``: the layouts (TP x PP x SP x recompute) that fit, in a
stated preference order. The terms and formulas: ``megatron_ualm/training/memory_budget.py``.
"""
from __future__ import annotations

import sys

from megatron_ualm.cli import ArgumentParser, exit_on_user_error, quiet_megatron


@exit_on_user_error
def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m megatron_ualm.memory_budget",
                       description="Per-GPU memory budget of a UALM training layout (a fit check, not a speed model).")
    p.add_argument("config", help="run configuration YAML (as for megatron_ualm.train --config)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted setting overrides")
    p.add_argument("--gpus", type=int, default=8, help="GPUs in the run (world size; default 8)")
    p.add_argument("--gpu-gib", type=float, default=80.0, help="memory per GPU in GiB (default 80)")
    p.add_argument("--search", action="store_true", help="list the layouts that fit instead")
    args = p.parse_args(argv)
    from megatron_ualm.config import ConfigError, load_config
    if args.gpus <= 0 or args.gpu_gib <= 0:
        raise ConfigError(f"--gpus / --gpu-gib: must be > 0, got {args.gpus} / {args.gpu_gib}")
    quiet_megatron()
    from megatron_ualm.training import memory_budget as mb
    cfg = load_config(args.config, args.overrides)
    gpu_bytes = int(args.gpu_gib * mb.GiB)
    if args.search:
        print(mb.format_search(mb.search_layouts(cfg, args.gpus, gpu_bytes), args.gpus, gpu_bytes))
        return 0
    budget = mb.memory_budget(cfg, args.gpus, gpu_bytes)
    print(mb.format_budget(budget))
    return 0 if budget.fits else 1


if __name__ == "__main__":
    sys.exit(main())
