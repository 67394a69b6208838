"""Generation with UALM (SPEC section 6): text answers, audio understanding, text-to-audio.

Modules, in the order data flows through them:

* ``prompts``  request records -> ``Prompt`` rows built with the training templates
* ``engine``   ``Engine.generate``: batched (left-padded), KV-cached decoding with
               classifier-free guidance (cond and uncond in one batch); reasoning requests
               hear each clip they generate (encoder rows appended into the KV cache)
* ``state``    per-request decoding state: modality choice, per-stream masks, delay corners
* ``sampling`` ``GenerationSettings``; greedy / temperature / top-k / top-p selection
* ``forward``  next-row logits: KV-cached (megatron ``StaticInferenceContext``) or full recompute
* ``graph``    the default decode backend: own static KV cache, one CUDA graph replay per step
* ``outputs``  undo the delay pattern, drop pad codes, decode with the codec to 16 kHz WAV
* ``runner``   a manifest through the engine -> answer records (``answers.jsonl`` format)
* ``loading``  model / tokenizer / codec from a Megatron or exported HF checkpoint

The command line is ``python -m megatron_ualm.generate`` (``megatron_ualm/generate.py``).
"""
from megatron_ualm.inference.engine import Engine, Generation, Prompt
from megatron_ualm.inference.sampling import GenerationSettings

__all__ = ["Engine", "Generation", "Prompt", "GenerationSettings"]
