#!/usr/bin/env python
"""Raw manifests or audio shards -> a tokenized Megatron IndexedDataset for one UALM task.

    python data_tools/preprocess_audio.py --task caption_to_audio --input etta.jsonl \\
        --tokenizer /models/qwen2.5-1.5b --codec /models/xcodec --out data/tta --device cuda
    torchrun --nproc-per-node 8 data_tools/preprocess_audio.py --task audio_only \\
        --input shards/ --config examples/qwen2.5-1.5b.yaml --out data/cont --device cuda
    python data_tools/preprocess_audio.py --task reasoning --input reasoning.jsonl \
        --config examples/qwen2.5-1.5b.yaml --out data/reason --device cuda

Re-running resumes; rank 0 merges. See megatron_ualm/data/preprocess.py.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ualm.data.preprocess import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
