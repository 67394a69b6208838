#!/usr/bin/env python
"""Preference JSONL -> paired caption_to_audio datasets for DPO (<out>.chosen, <out>.rejected,
<out>.pairs.json).

    python data_tools/preprocess_preferences.py --input prefs.jsonl --out data/prefs \\
        --tokenizer /models/qwen2.5-1.5b --codec /models/xcodec --device cuda

Re-running resumes. See megatron_ualm/data/preferences.py.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ualm.data.preferences import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
