#!/usr/bin/env python
"""Look inside a tokenized dataset: totals, rows-per-document histogram, and examples.

    python data_tools/inspect_dataset.py data/tta                       # report
    python data_tools/inspect_dataset.py data/tta --example 3 --rows 40 # one example (+ row dump)
    python data_tools/inspect_dataset.py data/tta --example 3 --wav-out ex3.wav  # codec from the sidecar

Text is decoded with the tokenizer recorded in the sidecar (or --tokenizer), codec codes with
the codec recorded there (or --codec).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ualm.cli import ArgumentParser, exit_on_user_error  # noqa: E402
from megatron_ualm.data import inspection  # noqa: E402
from megatron_ualm.data.indexed import TokenizedDataset  # noqa: E402


@exit_on_user_error
def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("prefix", help="dataset prefix (without .bin/.idx)")
    p.add_argument("--example", type=int, action="append", help="example index to show (repeatable)")
    p.add_argument("--rows", type=int, default=0, help="also dump the first N laid-out rows")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the one in the sidecar)")
    p.add_argument("--codec", help="codec directory or 'tiny', to decode codec codes for --wav-out "
                   "(default: the one the dataset's .meta.json records)")
    p.add_argument("--wav-out", help="write the (first) example's audio here as a 16 kHz WAV")
    args = p.parse_args(argv)

    ds = TokenizedDataset(args.prefix)
    print(inspection.report(ds))
    decode = None
    tok_dir = args.tokenizer or ds.meta["tokenizer"].get("path")
    if args.example and tok_dir and os.path.isdir(tok_dir):
        from megatron_ualm.data.tokenizer import load_tokenizer
        tok = load_tokenizer(tok_dir)
        decode = lambda ids: tok.decode(ids)  # noqa: E731
    for i in args.example or []:
        if not 0 <= i < len(ds):
            p.error(f"--example {i}: the dataset has {len(ds)} examples (0..{len(ds) - 1})")
        print()
        print(inspection.describe_example(ds, i, decode))
        if args.rows:
            from megatron_ualm.formats import templates as T
            ex = T.layout(ds.segments(i), inspection.dataset_vocab(ds))
            print(T.dump(ex, inspection.dataset_vocab(ds), decode, max_rows=args.rows))
    if args.wav_out:
        if not args.example:
            p.error("--wav-out needs --example")
        codec, codec_dir = None, args.codec or inspection.recorded_codec(ds)
        if codec_dir:
            from megatron_ualm.audio.codec import Codec
            codec = Codec(codec_dir)
        from megatron_ualm.audio.io import write_wav
        audio = inspection.example_audio(ds, args.example[0], codec)
        write_wav(args.wav_out, audio)
        print(f"\nwrote {args.wav_out}: {len(audio) / 16000:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
