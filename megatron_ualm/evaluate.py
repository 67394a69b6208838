"""Evaluate a checkpoint on tokenized datasets: per-task loss and accuracy, and scores of
greedy answers against the references.

    python -m megatron_ualm.evaluate --checkpoint CKPT [--data PATH:TASK ...] [--out results.json]
        [--max-examples N] [--generate on [--max-new-tokens N] [--max-audio-seconds S] [--clap DIR]]

CKPT: a Megatron experiment / checkpoints / iter_NNNNNNN directory (with its config.yaml), or
a directory exported by checkpoints_convert/megatron_to_hf.py. The datasets are tokenized
datasets as in data.valid (default: the checkpoint config's data.valid).

Loss and accuracy are teacher-forced and computed as the trainer's validation (same rows,
batches and sums). With --generate on: WER / CER for speech_to_transcription; exact match and
token F1 for text answers (text_only, audio_to_caption, audio_to_conversation); the CLAP score
for caption_to_audio when --clap names a local CLAP model.

Single process on one CPU or one GPU: multi-GPU (torchrun, TP/PP) is not supported.
Exit status 0 on success, 2 (one line on stderr) for a mistake in the command: a missing
checkpoint or dataset, a task that does not match the dataset, a bad option.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from megatron_ualm.cli import ArgumentParser, exit_on_user_error, setup_logging
from megatron_ualm.evaluation.run import EvaluateOptions


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m megatron_ualm.evaluate", description=__doc__.split("\n\n")[0],
                            epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(EvaluateOptions):
        flag = "--" + f.name.replace("_", "-")
        kwargs = {"help": f.metadata["help"], "dest": f.name}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            kwargs["required"] = True
        elif f.default_factory is not dataclasses.MISSING:
            kwargs["action"] = "append"
            kwargs["default"] = []
        else:
            kwargs["default"] = f.default
            if f.default is not None:
                kwargs["help"] += f" (default: {f.default})"
        if f.type in ("int", "Optional[int]"):
            kwargs["type"] = int
        elif f.type == "float":
            kwargs["type"] = float
        parser.add_argument(flag, **kwargs)
    return parser


@exit_on_user_error
def main(argv=None) -> int:
    setup_logging("%(asctime)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    opts = EvaluateOptions(**vars(args))

    from megatron_ualm.evaluation.report import format_table, write_json
    from megatron_ualm.evaluation.run import run_evaluation
    doc = run_evaluation(opts)
    if opts.out:
        write_json(doc, opts.out)
    print(format_table(doc), flush=True)
    if opts.out:
        print(f"results: {opts.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
