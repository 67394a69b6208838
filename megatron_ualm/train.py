"""Train UALM: ``python -m megatron_ualm.train --config examples/tiny.yaml key=value ...``

Launch one process per GPU (torchrun, or srun with one task per GPU: see slurm/); on a
machine without GPUs the same command trains over gloo on CPU. ``--help`` lists every
setting; ``--print-config`` prints the resolved configuration and exits.
"""
from __future__ import annotations

import sys

from megatron_ualm.cli import exit_on_user_error, setup_logging
from megatron_ualm.config import UALMConfig, parse_cli, to_dict
from megatron_ualm.config_help import settings_help
from megatron_ualm.config_loader import format_yaml

USAGE = """\
usage: python -m megatron_ualm.train [--config PATH.yaml] [--print-config] key=value ...
       torchrun --nproc-per-node=N -m megatron_ualm.train [--config PATH.yaml] key=value ...

Train UALM. The settings are the defaults below <- the --config file (and the files its
`base:` key names, in turn) <- the key=value overrides, left to right.

options:
  --config PATH.yaml, -c PATH.yaml   YAML file of settings (sections as below)
  --print-config                     print the resolved, validated settings as YAML and exit
                                     (starts no processes; plain python, no torchrun needed)
  -h, --help                         show this help and exit
  key=value                          override one setting: dotted key, YAML value

examples:
  python -m megatron_ualm.train --config examples/tiny.yaml --print-config
  python -m megatron_ualm.train --config examples/tiny.yaml training.train_iters=50 \\
      optimizer.lr=5e-4 checkpoint.experiment_dir=runs/try1
  torchrun --nproc-per-node=8 -m megatron_ualm.train --config examples/qwen2.5-1.5b.yaml \\
      parallel.tensor_parallel=2 data.train[0].weight=3 model.encoder.path=null

settings (key = default  (type); defaults live in megatron_ualm/config.py):
"""


def help_text() -> str:
    return USAGE + "\n" + settings_help(UALMConfig) + "\n"


@exit_on_user_error
def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        sys.stdout.write(help_text())
        return 0
    print_config = "--print-config" in args
    args = [a for a in args if a != "--print-config"]
    if print_config:
        cfg = parse_cli(args)
        sys.stdout.write(format_yaml(to_dict(cfg), header="# resolved UALM configuration "
                                                          "(python -m megatron_ualm.train --print-config)"))
        return 0
    setup_logging()
    cfg = parse_cli(args)
    from megatron_ualm.training.loop import pretrain  # heavy imports after the config is valid
    pretrain(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
