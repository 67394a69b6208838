#!/usr/bin/env python
"""Concatenate finished tokenized datasets of one task into one (documents in the order given).

    python data_tools/merge_datasets.py --out data/tta_all data/tta_part1 data/tta_part2

The datasets must share task, tokenizer, codec and encoder window; audio clip references are
renumbered. (preprocess_*.py already merge their own rank/chunk parts; this is for separate runs.)
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ualm.data.indexed import merge_datasets  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("prefixes", nargs="+", help="dataset prefixes to concatenate, in order")
    p.add_argument("--out", required=True, help="output prefix")
    args = p.parse_args(argv)
    if os.path.abspath(args.out) in {os.path.abspath(x) for x in args.prefixes}:
        p.error("--out must differ from the inputs")
    meta = merge_datasets(args.prefixes, args.out)
    c = meta["counts"]
    print(f"{args.out}: {c['documents']:,} documents, {c['rows']:,} rows, {c['clips']:,} clips, "
          f"{meta['audio_hours']:.3f} h from {len(args.prefixes)} datasets")
    return 0


if __name__ == "__main__":
    sys.exit(main())
