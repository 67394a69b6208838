#!/usr/bin/env python
"""Text-only JSONL ({"input": [turns], "output": ...}) -> a tokenized text_only dataset.

    python data_tools/preprocess_text.py --input text.jsonl --tokenizer /models/qwen2.5-1.5b \\
        --out data/text --workers 2

Every turn of a multi-turn ``input`` is kept. Re-running resumes. See megatron_ualm/data/preprocess.py.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ualm.data.preprocess import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(text_only=True))
