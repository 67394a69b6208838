"""The whole UALM job, end to end, on a laptop CPU in minutes: ``bash examples/run_demo.sh``.

Every step runs the real command-line tool a user would run, and prints it first:

 1. make demo data          synthesized tones/chords/noises/chirps with captions and Q&A, text Q&A
 2. build audio shards      data_tools/build_shards.py
 3. tiny pretrained parts   a byte-level BPE tokenizer trained on the demo text, a tiny random
                            X-Codec (the real classes, small configs; nothing is downloaded)
 4. tokenize                data_tools/preprocess_text.py, data_tools/preprocess_audio.py (four
                            pre-training tasks and the reasoning conversations)
 5. train (2 processes)     torchrun ... -m megatron_ualm.train at TP=2 over gloo; half way every
                            process gets SIGUSR1 (as from Slurm's --signal), the ranks save a
                            checkpoint and ask for requeue; the relaunch resumes and finishes
 6. export to HuggingFace   checkpoints_convert/megatron_to_hf.py
 7. generate                python -m megatron_ualm.generate: a text answer, a text-to-audio clip
                            and a reasoning answer that listens to its own clip
 8. stock transformers      the text question again, through nothing but transformers on the export
 9. DPO                     data_tools/make_preference_pairs.py (4 clips per caption, best vs worst by
                            a scorer of the demo's sounds), data_tools/preprocess_preferences.py,
                            megatron_ualm.score_reference, then megatron_ualm.train with
                            training.objective=dpo; held-out pair accuracy at each validation

It ends with a summary: loss at the start and the end, the answers, the WAV's duration.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import warnings

from megatron_ualm.data.demo import HELD_OUT_ANSWER, HELD_OUT_QUESTION, REASONING_SYSTEM, SoundRequest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_WORKDIR = "demo_run"      # default --workdir
DEMO_TOKENIZED = "tokenized"   # <workdir>/tokenized/<task>: the tokenized datasets (examples/tiny.yaml)
# Held out: the demo's training text never asks this (megatron_ualm.data.demo), only its pattern.
DEMO_QUESTION = HELD_OUT_QUESTION
DEMO_ANSWER = HELD_OUT_ANSWER
DEMO_CAPTION = "an upward chirp"
# a request of the kind the demo's reasoning conversations hold
REASONING_REQUEST = f"Generate {SoundRequest('tone', 1.5, 'loud', 'A4').caption()}."


# Step 8: the export's text chat with nothing but transformers (the README's example).
STOCK_CHAT = """
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
ids = tokenizer.apply_chat_template([{"role": "user", "content": sys.argv[2]}], add_generation_prompt=True,
                                    return_tensors="pt", return_dict=True)["input_ids"]
out = model.generate(ids, max_new_tokens=64)
print(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
"""


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("\n$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    return subprocess.run(cmd, check=True, cwd=kw.pop("cwd", None), **kw)


def tool(name: str) -> list[str]:
    return [sys.executable, os.path.join(ROOT, name)]


def train_texts(raw: str) -> list[str]:
    texts = []
    with open(os.path.join(raw, "text.jsonl"), encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            texts += [t["content"] for t in d["input"]] + [d["output"]]
    with open(os.path.join(raw, "etta.jsonl"), encoding="utf-8") as f:
        texts += [json.loads(line)["caption"] for line in f]
    with open(os.path.join(raw, "af3.json"), encoding="utf-8") as f:
        texts += [c["value"] for d in json.load(f) for c in d["conversations"]]
    from megatron_ualm.data.demo import reasoning_texts
    from megatron_ualm.formats.templates import DEFAULT_PROMPTS
    return texts + reasoning_texts(os.path.join(raw, "reasoning.jsonl")) + list(DEFAULT_PROMPTS.values())


def read_losses(exp: str) -> dict[int, float]:
    out = {}
    path = os.path.join(exp, "logs", "metrics.jsonl")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if r.get("kind") == "train" and r.get("loss") is not None:
                    out[r["step"]] = r["loss"]
    return out


REQUEUE = "requeue"
DPO_ITERS = 40


def dpo_stage(work: str, raw: str, tok: str, models: str, exp: str, config: str, nproc: int) -> dict[int, float]:
    """Preference alignment of text-to-audio on pairs the pre-trained model makes itself: sample
    4 clips per caption, keep the best and the worst by the demo's scorer, score the reference,
    train DPO. Returns the held-out pair accuracy at each validation step."""
    prefs, dpo_exp = os.path.join(work, "prefs"), os.path.join(work, "dpo")
    os.makedirs(prefs, exist_ok=True)
    with open(os.path.join(raw, "etta.jsonl"), encoding="utf-8") as f:
        lines = f.readlines()
    splits = {"train": [x for i, x in enumerate(lines) if i % 3], "heldout": lines[::3]}  # held-out captions
    common = ["--tokenizer", os.path.join(models, "tokenizer"), "--text-vocab-size", "512", "--no-progress"]
    for split, chosen in splits.items():
        captions = os.path.join(prefs, f"{split}-captions.jsonl")
        with open(captions, "w", encoding="utf-8") as f:
            f.writelines(chosen)
        run(tool("data_tools/make_preference_pairs.py") + [
            "--checkpoint", exp, "--captions", captions, "--scorer", "megatron_ualm.data.demo_scorer:score",
            "--clips-per-caption", "4", "--max-audio-seconds", "2", "--seed", "0", "--device", "cpu",
            "--out", os.path.join(prefs, f"{split}.jsonl"), "--no-progress"])
        run(tool("data_tools/preprocess_preferences.py") + [
            "--input", os.path.join(prefs, f"{split}.jsonl"), "--out", os.path.join(tok, f"dpo_{split}"),
            "--codec", os.path.join(models, "codec"), "--max-reject-fraction", "0.5"] + common)
    dpo_config = os.path.join(work, "dpo.yaml")
    with open(dpo_config, "w", encoding="utf-8") as f:
        f.write(f"""# written by megatron_ualm.demo: DPO over the pre-trained demo model
base: {config}
training: {{objective: dpo, eval_interval: 10, eval_iters: 100, log_interval: 5}}
optimizer: {{lr: 2.0e-4, min_lr: 2.0e-5, warmup_iters: 0}}
dpo: {{beta: 0.1}}
data:
  train: [{{path: {tok}/dpo_train, task: preference, weight: 1}}]
  valid: [{{path: {tok}/dpo_heldout, task: preference}}]
checkpoint: {{load: {exp}/checkpoints, experiment_dir: {dpo_exp}, save_interval: 1000}}
""")
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
         "-m", "megatron_ualm.score_reference", "--config", dpo_config, f"parallel.tensor_parallel={nproc}"],
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    code = train(dpo_config, dpo_exp, DPO_ITERS, None, nproc, nproc)
    if code != 0:
        raise RuntimeError(f"DPO training failed with exit code {code}")
    accuracy = {}
    with open(os.path.join(dpo_exp, "logs", "metrics.jsonl"), encoding="utf-8") as f:
        for r in map(json.loads, f):
            if r.get("kind") == "valid" and "dpo/accuracy/preference" in r:
                accuracy[r["step"]] = r["dpo/accuracy/preference"]
    return accuracy


def train(config: str, exp: str, iters: int, interrupt_at: int | None, nproc: int, tp: int) -> int | str:
    """Run the trainer under torchrun; with ``interrupt_at``, preempt it at that step. Returns the
    exit code, or ``REQUEUE`` when it saved and asked to be requeued."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "megatron_ualm.train", "--config", config, f"training.train_iters={iters}",
           f"parallel.tensor_parallel={tp}"]
    print("\n$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    marker = os.path.join(exp, "requeue-requested")
    if os.path.exists(marker):
        os.remove(marker)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "UALM_REQUEUE_MARKER": marker}
    # As slurm/pretrain_ualm.sh does: the torchrun agent ignores SIGUSR1 (its workers save).
    proc = subprocess.Popen(cmd, env=env, preexec_fn=lambda: signal.signal(signal.SIGUSR1, signal.SIG_IGN))
    if interrupt_at is not None:
        while proc.poll() is None and max(read_losses(exp), default=0) < interrupt_at:
            time.sleep(0.2)
        if proc.poll() is None:
            print(f"\n[demo] step {interrupt_at} reached: sending SIGUSR1 to every trainer process (agent, "
                  "ranks, their helpers), as Slurm's --signal does before the time limit", flush=True)
            import psutil  # Slurm signals every process of the step, whatever its session
            agent = psutil.Process(proc.pid)
            for p in [agent, *agent.children(recursive=True)]:
                try:
                    p.send_signal(signal.SIGUSR1)
                except psutil.NoSuchProcess:
                    pass
    code = proc.wait()
    if code != 0 and os.path.exists(marker):
        print(f"[demo] the trainer saved a checkpoint and asked to be requeued (torchrun exit code {code}, "
              f"requeue marker {marker})", flush=True)
        return REQUEUE
    return code


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=DEMO_WORKDIR, help=f"everything is written here (default: {DEMO_WORKDIR})")
    p.add_argument("--iters", type=int, default=600, help="training iterations")
    p.add_argument("--clips", type=int, default=48, help="demo audio clips")
    p.add_argument("--nproc", type=int, default=2, help="training processes (TP = nproc)")
    a = p.parse_args(argv)
    work = os.path.abspath(a.workdir)
    raw, shards, models, tok = (os.path.join(work, d) for d in ("raw", "shards", "models", DEMO_TOKENIZED))
    exp, hf = os.path.join(work, "run"), os.path.join(work, "hf")
    os.makedirs(work, exist_ok=True)
    started = time.time()

    print("== 1. demo data", flush=True)
    run(tool("data_tools/make_demo_data.py") + ["--out", raw, "--clips", str(a.clips), "--text", "200",
                                                 "--no-speech"])
    print("== 2. audio shards", flush=True)
    for name, manifest in (("etta", "etta.jsonl"), ("af3", "af3.json")):
        run(tool("data_tools/build_shards.py") + ["--manifest", os.path.join(raw, manifest), "--out",
                                                   os.path.join(shards, name), "--workers", "2", "--no-progress"])
    print("== 3. tiny tokenizer and codec (local, random, nothing downloaded)", flush=True)
    from megatron_ualm.audio.codec import save_tiny_codec
    from megatron_ualm.data.tokenizer import train_tiny_tokenizer
    if not os.path.exists(os.path.join(models, "tokenizer", "tokenizer.json")):
        train_tiny_tokenizer(train_texts(raw), os.path.join(models, "tokenizer"), vocab_size=512)
    if not os.path.exists(os.path.join(models, "codec", "config.json")):
        save_tiny_codec(os.path.join(models, "codec"))
    print(f"tokenizer: {models}/tokenizer, codec: {models}/codec", flush=True)

    print("== 4. tokenized datasets", flush=True)
    common = ["--tokenizer", os.path.join(models, "tokenizer"), "--text-vocab-size", "512", "--no-progress"]
    run(tool("data_tools/preprocess_text.py") + ["--input", os.path.join(raw, "text.jsonl"),
                                                  "--out", os.path.join(tok, "text_only")] + common)
    for task, kind in (("caption_to_audio", "etta"), ("audio_to_caption", "etta"),
                       ("audio_to_conversation", "af3")):
        run(tool("data_tools/preprocess_audio.py") + ["--input", os.path.join(shards, kind), "--task", task,
                                                       "--codec", os.path.join(models, "codec"),
                                                       "--out", os.path.join(tok, task)] + common)
    run(tool("data_tools/preprocess_audio.py") + ["--input", os.path.join(raw, "reasoning.jsonl"), "--task", "reasoning",
                                                   "--codec", os.path.join(models, "codec"),
                                                   "--out", os.path.join(tok, "reasoning")] + common)

    config = os.path.join(work, "config.yaml")
    with open(config, "w", encoding="utf-8") as f:
        f.write(f"""# written by megatron_ualm.demo
base: {os.path.join(ROOT, 'examples', 'tiny.yaml')}
data:
  train:
    - {{path: {tok}/text_only, task: text_only, weight: 3}}
    - {{path: {tok}/caption_to_audio, task: caption_to_audio, weight: 1}}
    - {{path: {tok}/audio_to_caption, task: audio_to_caption, weight: 1}}
    - {{path: {tok}/audio_to_conversation, task: audio_to_conversation, weight: 1}}
    - {{path: {tok}/reasoning, task: reasoning, weight: 1}}
  valid:
    - {{path: {tok}/text_only, task: text_only}}
    - {{path: {tok}/audio_to_caption, task: audio_to_caption}}
paths:
  tokenizer: {models}/tokenizer
  codec: {models}/codec
checkpoint:
  experiment_dir: {exp}
  save_interval: {max(a.iters // 3, 1)}
""")
    print(f"== 5. train at TP={a.nproc} on {a.nproc} CPU processes (config: {config})", flush=True)
    code = train(config, exp, a.iters, a.iters // 2, a.nproc, a.nproc)
    resumed = code == REQUEUE
    if code == 0:
        print("[demo] training finished before the interruption", flush=True)
    elif code != REQUEUE:
        print(f"[demo] training failed with exit code {code}", file=sys.stderr)
        return code
    else:
        print("[demo] relaunching, as the Slurm script's requeue would (it resumes)", flush=True)
        code = train(config, exp, a.iters, None, a.nproc, a.nproc)
        if code != 0:
            print(f"[demo] training failed with exit code {code}", file=sys.stderr)
            return code

    print("== 6. export to HuggingFace", flush=True)
    run(tool("checkpoints_convert/megatron_to_hf.py") + ["--checkpoint", exp, "--out", hf, "--overwrite",
                                                          "--tokenizer", os.path.join(models, "tokenizer"),
                                                          "--codec", os.path.join(models, "codec")])

    print("== 7. generate from the exported model", flush=True)
    requests = os.path.join(work, "requests.jsonl")
    with open(requests, "w", encoding="utf-8") as f:
        f.write(json.dumps({"id": "question", "prompt": DEMO_QUESTION, "modality": "text"}) + "\n")
        f.write(json.dumps({"id": "tta", "caption": DEMO_CAPTION}) + "\n")
        f.write(json.dumps({"id": "reason", "mode": "reasoning", "messages": [
            {"role": "system", "content": REASONING_SYSTEM}, {"role": "user", "content": REASONING_REQUEST}]}) + "\n")
    answers_dir = os.path.join(work, "answers")
    run([sys.executable, "-m", "megatron_ualm.generate", "--checkpoint", hf, "--requests", requests,
         "--out", answers_dir, f"tokenizer={models}/tokenizer", f"codec={models}/codec", "max_audio_seconds=3", "max_rounds=2"])

    with open(os.path.join(answers_dir, "answers.jsonl"), encoding="utf-8") as f:
        answers = {r["id"]: r for r in map(json.loads, f)}
    losses = read_losses(exp)
    first, last = losses[min(losses)], losses[max(losses)]
    q, t, r = answers["question"], answers["tta"], answers["reason"]

    print("== 8. the same question through stock transformers (a separate interpreter, no megatron_ualm)",
          flush=True)
    stock = run([sys.executable, "-c", STOCK_CHAT, hf, DEMO_QUESTION], env={**os.environ, "PYTHONPATH": ""},
                cwd=work, stdout=subprocess.PIPE, text=True).stdout.strip()
    print(stock, flush=True)

    print(f"== 9. DPO: align text-to-audio on pairs the model makes itself ({DPO_ITERS} iterations)", flush=True)
    accuracy = dpo_stage(work, raw, tok, models, exp, config, a.nproc)
    audio = [s for s in t.get("segments", []) if s.get("wav")]
    print("\n" + "=" * 72)
    print(f"UALM demo finished in {time.time() - started:.0f} s  (work dir: {work})")
    print(f"  loss            {first:.3f} at step {min(losses)} -> {last:.3f} at step {max(losses)}")
    print(f"  checkpoints     {exp}/checkpoints" + (f" (resumed after SIGUSR1 at step {a.iters // 2})" if resumed
                                                     else " (not interrupted: training ended first)"))
    print(f"  HF export       {hf}")
    print(f"  Q: {DEMO_QUESTION}")
    print(f"  A: {q.get('text', q.get('error'))!r}  (expected {DEMO_ANSWER!r}; stock transformers: {stock!r})")
    if audio:
        print(f"  TTA '{DEMO_CAPTION}': {audio[0]['wav']} ({audio[0]['duration_s']:.2f} s, "
              f"{audio[0]['frames']} codec frames)")
    else:
        print(f"  TTA '{DEMO_CAPTION}': no audio ({t.get('error') or t.get('finish_reason')})")
    with warnings.catch_warnings():  # megatron-core's notes on missing TE/apex do not belong in the summary
        warnings.simplefilter("ignore")
        from megatron_ualm.inference.outputs import format_transcript
    print(f"  reasoning '{REASONING_REQUEST}':")
    if r.get("status") == "ok":
        print("    " + format_transcript(r).replace("\n", "\n    "))
    else:
        print(f"    no answer ({r.get('error')})")
    print("  DPO             held-out pair accuracy (the reference itself: no pair preferred) "
          + ", ".join(f"{v:.0%} at step {k}" for k, v in sorted(accuracy.items())))
    print("=" * 72)
    ok = last < first and all(x.get("status") == "ok" for x in (q, t, r))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
