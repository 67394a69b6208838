#!/usr/bin/env python
"""Lay out downloaded HF checkpoints as the pretrained/ directory the example configs expect.

    python checkpoints_convert/prepare_pretrained.py --backbone ~/hf/Qwen2.5-1.5B \\
        --codec ~/hf/xcodec-hubert-general --encoder ~/hf/Qwen2.5-Omni-7B [--out pretrained] \\
        [--name qwen2.5-1.5b] [--copy] [--overwrite]

Any subset of --backbone / --codec / --encoder. The backbone and codec directories are checked
and their files symlinked (--copy: copied) into pretrained/qwen2.5-<size> and
pretrained/xcodec-hubert-general; the audio tower of a full Qwen2.5-Omni checkpoint (or the
encoder of a Whisper / Audio Flamingo 3 model) is extracted tensor by tensor into
pretrained/qwen2.5-omni-audio-encoder (pretrained/whisper-encoder, pretrained/af-whisper-encoder).
Nothing is downloaded.
Exit status 2 with one line on stderr when an input is refused.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ualm.cli import ArgumentParser, exit_on_user_error, quiet_megatron  # noqa: E402


@exit_on_user_error
def main(argv=None) -> int:
    quiet_megatron()
    from megatron_ualm.convert.prepare import PrepareOptions, prepare_pretrained
    d = PrepareOptions()
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", help="local Qwen2.5 directory (base or instruct: config.json, safetensors, tokenizer)")
    p.add_argument("--codec", help="local X-Codec directory in transformers' XcodecModel layout")
    p.add_argument("--encoder", help="local Qwen2.5-Omni directory (full model, thinker or audio encoder), "
                                     "Whisper model, or Audio Flamingo 3 model (AF-Whisper)")
    p.add_argument("--out", default=d.out, help=f"where the parts go (default {d.out})")
    p.add_argument("--name", help="backbone directory name (default qwen2.5-<size> from its config)")
    p.add_argument("--copy", action="store_true", help="copy the backbone/codec files instead of symlinking them")
    p.add_argument("--overwrite", action="store_true", help="replace parts that exist already")
    p.add_argument("--max-shard-gb", type=float, default=d.max_shard_bytes / 2**30,
                   help="extracted encoder: safetensors shard size in GiB (default %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    args = p.parse_args(argv)
    report, _ = prepare_pretrained(PrepareOptions(
        backbone=args.backbone, codec=args.codec, encoder=args.encoder, out=args.out, name=args.name,
        copy=args.copy, overwrite=args.overwrite, max_shard_bytes=int(args.max_shard_gb * 2**30),
        show_progress=False if args.no_progress else None))
    print(report.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
