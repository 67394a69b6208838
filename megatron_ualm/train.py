"""Train UALM: ``python -m megatron_ualm.train --config examples/tiny.yaml key=value ...``

Launch one process per GPU (torchrun, or srun with one task per GPU: see slurm/); on a
machine without GPUs the same command trains over gloo on CPU.
"""
from __future__ import annotations

import sys

from megatron_ualm.cli import exit_on_user_error, setup_logging
from megatron_ualm.config import parse_cli


@exit_on_user_error
def main(argv=None) -> int:
    setup_logging()
    cfg = parse_cli(sys.argv[1:] if argv is None else argv)
    from megatron_ualm.training.loop import pretrain  # heavy imports after the config is valid
    pretrain(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
