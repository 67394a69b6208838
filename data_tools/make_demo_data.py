#!/usr/bin/env python
"""Write the small synthetic demo corpus (sounds + captions + Q&A + text-only Q&A + reasoning).

    python data_tools/make_demo_data.py --out demo_data/ --clips 200

See megatron_ualm/data/demo.py for what is generated.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ualm.data.demo import make_demo_data  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--clips", type=int, default=200, help="number of synthesized sounds")
    p.add_argument("--min-seconds", type=float, default=1.0)
    p.add_argument("--max-seconds", type=float, default=3.0)
    p.add_argument("--text", type=int, default=200, help="number of text-only examples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-speech", action="store_true", help="skip espeak-ng speech clips")
    p.add_argument("--reasoning", type=int, help="number of reasoning conversations (default: clips / 2)")
    args = p.parse_args(argv)
    d = make_demo_data(args.out, num_clips=args.clips, min_seconds=args.min_seconds,
                       max_seconds=args.max_seconds, num_text=args.text, seed=args.seed,
                       speech=not args.no_speech, num_reasoning=args.reasoning)
    print(f"wrote {d.num_clips} clips, {d.num_speech} speech clips, {d.num_text} text examples "
          f"to {d.out_dir}\n  ETTA {d.etta}\n  AF3  {d.af3}\n  text {d.text}\n"
          f"  reasoning {d.reasoning} ({d.num_reasoning} conversations)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
