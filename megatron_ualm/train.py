"""Train UALM: ``python -m megatron_ualm.train --config examples/tiny.yaml key=value ...``

Launch one process per GPU (torchrun, or srun with one task per GPU: see slurm/); on a
machine without GPUs the same command trains over gloo on CPU.
"""
from __future__ import annotations

import logging
import sys
import warnings

from megatron_ualm.config import ConfigError, parse_cli


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # megatron-core narrates every index it opens and every fallback it takes at INFO/warning.
    logging.getLogger("megatron.core").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*not installed.*")
    try:
        cfg = parse_cli(sys.argv[1:] if argv is None else argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from megatron_ualm.training.loop import pretrain  # heavy imports after the config is valid
    pretrain(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
