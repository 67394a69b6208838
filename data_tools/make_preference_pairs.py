#!/usr/bin/env python
"""Preference pairs from a model's own samples: N clips per caption, ranked by a scorer.

    python data_tools/make_preference_pairs.py --checkpoint runs/tta --captions captions.jsonl \\
        --scorer /models/clap --clips-per-caption 8 --out prefs/self.jsonl
    python data_tools/preprocess_preferences.py --input prefs/self.jsonl --out data/dpo \\
        --config examples/qwen2.5-1.5b.yaml

Re-running resumes per caption. See megatron_ualm/inference/preference_pairs.py.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ualm.inference.preference_pairs import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
