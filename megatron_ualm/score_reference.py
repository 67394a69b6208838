"""Score a DPO run's preference sets with its frozen reference checkpoint, once:

    python -m megatron_ualm.score_reference --config dpo.yaml [key=value ...] [--chunk-pairs N]

The same config (and overrides) as the training run: its data.train/data.valid preference
sets are scored with dpo.reference_checkpoint (default: checkpoint.load) at the config's
parallel layout; torchrun it like the trainer. The numbers go beside each set
(``<P>.reference.<key>.npy`` / ``.json``); an interrupted run continues where it stopped.
"""
from __future__ import annotations

import sys

from megatron_ualm.cli import ArgumentParser, exit_on_user_error, setup_logging
from megatron_ualm.config import ConfigError, parse_cli


@exit_on_user_error
def main(argv=None) -> int:
    setup_logging()
    from megatron_ualm.training.reference import ScoreOptions, score_reference  # heavy imports
    defaults = ScoreOptions()
    parser = ArgumentParser(prog="python -m megatron_ualm.score_reference", description=__doc__.split("\n\n")[0],
                            epilog="Other arguments: --config PATH.yaml and key=value overrides of the run config.")
    parser.add_argument("--chunk-pairs", type=int, default=defaults.chunk_pairs,
                        help=f"pairs scored and written together, the unit of resuming (default {defaults.chunk_pairs})")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.chunk_pairs <= 0:
        raise ConfigError(f"--chunk-pairs: must be > 0, got {args.chunk_pairs}")
    cfg = parse_cli(rest)
    if cfg.training.objective != "dpo":
        raise ConfigError("training.objective: scoring reference log-probs is for dpo runs; set training.objective=dpo")
    score_reference(cfg, ScoreOptions(chunk_pairs=args.chunk_pairs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
