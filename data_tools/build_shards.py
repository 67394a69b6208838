#!/usr/bin/env python
"""Build 16 kHz audio shards (SPEC section 2.1) from Audio-Flamingo-3 / ETTA manifests.

    python data_tools/build_shards.py --manifest af3.json --manifest etta.jsonl --out shards/

Re-running the same command resumes: finished shards are verified and kept. Bad entries are
listed in <out>/rejects.jsonl; the exit status is 1 when their share exceeds
--max-reject-fraction.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ualm.data.manifests import DEFAULT_MAX_REJECT_FRACTION  # noqa: E402
from megatron_ualm.data.shards import DEFAULT_SAMPLES_PER_SHARD, build_shards  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", action="append", required=True,
                   help="AF3 JSON list or ETTA JSONL; repeat for several (read in order)")
    p.add_argument("--kind", choices=("af3", "etta", "auto"), default="auto",
                   help="manifest kind for all --manifest (auto: detect per file)")
    p.add_argument("--out", required=True, help="dataset directory (created; resumed if present)")
    p.add_argument("--samples-per-shard", type=int, default=DEFAULT_SAMPLES_PER_SHARD)
    p.add_argument("--workers", type=int, default=os.cpu_count(),
                   help="decoding processes (default: all CPU cores)")
    p.add_argument("--max-reject-fraction", type=float, default=DEFAULT_MAX_REJECT_FRACTION)
    p.add_argument("--format", choices=("wav", "flac"), default="wav",
                   help="audio member format inside the tars (16-bit either way)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    result = build_shards(args.manifest, args.out, kind=args.kind,
                          samples_per_shard=args.samples_per_shard, num_workers=args.workers,
                          audio_format=args.format, max_reject_fraction=args.max_reject_fraction,
                          progress=not args.no_progress)
    return result.summary.finish(args.max_reject_fraction)


if __name__ == "__main__":
    sys.exit(main())
