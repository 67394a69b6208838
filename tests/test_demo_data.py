"""The demo corpus keeps the demo's question held out, while still teaching its pattern."""
import json
import os
import re

from megatron_ualm import demo
from megatron_ualm.data.demo import SWEEPS, make_demo_data


def test_demo_question_is_held_out_of_every_training_text(tmp_path):
    # The demo's own corpus (megatron_ualm.demo main: --clips 48 --text 200 --no-speech) and a larger one.
    for clips, text in ((48, 200), (0, 2000)):
        raw = str(tmp_path / f"raw{clips}")
        make_demo_data(raw, num_clips=clips, num_text=text, speech=False)
        texts = demo.train_texts(raw)  # everything the tokenizer and the trainer read
        assert len(texts) > text
        q = demo.DEMO_QUESTION
        assert not any(q in t for t in texts)
        for name in ("text.jsonl", "af3.json", "etta.jsonl"):  # and not in any raw form either
            with open(os.path.join(raw, name), encoding="utf-8") as f:
                assert q not in f.read()
        pairs = [(json.loads(line)["input"][-1]["content"], json.loads(line)["output"])
                 for line in open(os.path.join(raw, "text.jsonl"), encoding="utf-8")]
        assert (q, demo.DEMO_ANSWER) not in pairs
        # The skill is taught: upward sweeps of other sounds rise, downward chirps fall.
        pattern = re.compile(r"Does (an upward|a downward) (\w+) rise or fall in pitch\?")
        taught = {(m.group(1), m.group(2), a) for p, a in pairs if (m := pattern.fullmatch(p))}
        assert all(a == ("rise" if d == "an upward" else "fall") for d, _, a in taught)
        assert {s for d, s, _ in taught if d == "an upward"} == set(SWEEPS) - {"chirp"}
        assert ("a downward", "chirp", "fall") in taught
        assert pattern.fullmatch(q) and demo.DEMO_ANSWER == "rise"
