"""Interrupted data tools, as users meet them: ``kill -9`` of a tool takes its pool workers
with it, and a re-run after any interruption deletes the temporary files of earlier runs
(of any pid) and still writes outputs byte-identical to an uninterrupted run."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from megatron_ualm.data import indexed as I
from megatron_ualm.data.demo import make_demo_data
from megatron_ualm.data.preprocess import KILL_ENV, PreprocessConfig, run_preprocess
from megatron_ualm.data.shards import build_shards
from megatron_ualm.data.tokenizer import train_tiny_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "data_tools")
# the tools import this checkout (and whatever megatron-core the tests were given)
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
WORDS = "the a dog cat barks near river music loud quiet what is two and four bird sings".split()
DATASET_EXTS = (".bin", ".idx", ".audio.bin", ".audio.idx", ".meta.json", ".rejects.jsonl")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Demo clips, a tiny tokenizer, and manifests big enough that the tools run for seconds."""
    root = tmp_path_factory.mktemp("demo")
    d = make_demo_data(str(root), num_clips=8, num_text=20, speech=False)
    texts = [json.loads(line)["output"] for line in open(d.text)]
    texts += [json.loads(line)["caption"] for line in open(d.etta)] + [" ".join(WORDS)]
    train_tiny_tokenizer(texts * 3, str(root / "tok"), vocab_size=400)
    etta = open(d.etta).read().splitlines()
    with open(root / "many_clips.jsonl", "w") as f:  # beside etta.jsonl: same relative paths
        f.write("".join(etta[i % len(etta)] + "\n" for i in range(600)))
    words = [WORDS[(7 * i) % len(WORDS)] for i in range(40)]
    with open(root / "many_texts.jsonl", "w") as f:
        for i in range(20000):
            q = " ".join(words[i % 13:] + words[:i % 13])
            f.write(json.dumps({"input": [{"role": "user", "content": q}], "output": q[::-1]}) + "\n")
    return d, str(root / "tok"), str(root / "many_clips.jsonl"), str(root / "many_texts.jsonl")


def _tmp_files(root) -> list[str]:
    """Every temporary file pattern the data tools write: ``.tmp<pid>`` (datasets),
    ``.tmp.<pid>`` (shards)."""
    return sorted(p for p in glob.glob(os.path.join(str(root), "**", "*.tmp*"), recursive=True))


def _same_bytes(a: str, b: str, exts=DATASET_EXTS) -> None:
    for ext in exts:
        assert os.path.exists(a + ext) == os.path.exists(b + ext), ext
        if os.path.exists(a + ext):
            assert open(a + ext, "rb").read() == open(b + ext, "rb").read(), ext


def _alive(proc: psutil.Process) -> bool:
    """Running (a zombie is dead; it only waits for init to reap it)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _kill_tool_once_workers_run(cmd, workers: int, log) -> list[psutil.Process]:
    """Start ``cmd``, wait until it has ``workers`` child processes that have worked a
    moment, SIGKILL it (not its workers), and return the workers."""
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err,
                                env={**ENV, "OMP_NUM_THREADS": "1"})
    tool = psutil.Process(proc.pid)
    deadline = time.time() + 120
    while len(tool.children(recursive=True)) < workers:
        assert proc.poll() is None, f"the tool ended before its workers were seen:\n{open(log).read()}"
        assert time.time() < deadline, "no workers after 120 s"
        time.sleep(0.05)
    time.sleep(1.0)  # let them get busy
    kids = tool.children(recursive=True)
    assert proc.poll() is None, "the input is too small: the tool finished before the kill"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return kids


def _assert_workers_die(kids: list[psutil.Process]) -> None:
    try:
        deadline = time.time() + 5
        while any(_alive(k) for k in kids) and time.time() < deadline:
            time.sleep(0.05)
        assert not [k.pid for k in kids if _alive(k)], "workers outlived their killed parent"
    finally:
        for k in kids:  # do not leave orphans behind if the assertion failed
            if _alive(k):
                k.kill()


@pytest.mark.slow
def test_preprocess_text_workers_die_with_parent_and_rerun_is_clean(demo, tmp_path):
    d, tok, _, texts = demo
    cmd = [sys.executable, os.path.join(TOOLS, "preprocess_text.py"), "--input", texts, "--tokenizer", tok,
           "--out", str(tmp_path / "t"), "--workers", "2", "--chunk-size", "200", "--no-progress"]
    kids = _kill_tool_once_workers_run(cmd, 2, tmp_path / "killed.log")
    assert len(kids) == 2
    _assert_workers_die(kids)
    assert not os.path.exists(tmp_path / "t.meta.json")
    # Leftovers of killed chunk writers (done chunks never have any, so plant one for chunk 0,
    # which surely finished) and of a merge killed part-way.
    (tmp_path / "t.parts" / "chunk-000000.bin.tmp999999").write_bytes(b"partial")
    (tmp_path / "t.bin.tmp999998").write_bytes(b"partial")
    rerun = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed" in rerun.stdout + rerun.stderr
    assert _tmp_files(tmp_path) == [] and not os.path.exists(tmp_path / "t.parts")
    run_preprocess(PreprocessConfig(inputs=[texts], task="text_only", out=str(tmp_path / "u"), tokenizer=tok,
                                    chunk_size=200, workers=1, progress=False))
    _same_bytes(str(tmp_path / "t"), str(tmp_path / "u"))


@pytest.mark.slow
def test_build_shards_workers_die_with_parent_and_rerun_is_clean(demo, tmp_path):
    _, _, clips, _ = demo
    out = tmp_path / "s"
    cmd = [sys.executable, os.path.join(TOOLS, "build_shards.py"), "--manifest", clips, "--out", str(out),
           "--workers", "2", "--samples-per-shard", "50", "--no-progress"]
    kids = _kill_tool_once_workers_run(cmd, 2, tmp_path / "killed.log")
    assert len(kids) == 2
    _assert_workers_die(kids)
    assert not (out / "index.json").exists()
    (out / "shard-000000.tar.tmp.999999").write_bytes(b"partial")  # as a killed writer leaves it
    rerun = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert _tmp_files(tmp_path) == []
    build_shards([clips], str(tmp_path / "u"), samples_per_shard=50, num_workers=1, progress=False)
    names = sorted(os.listdir(out))
    assert names == sorted(os.listdir(tmp_path / "u"))
    for n in names:
        assert (out / n).read_bytes() == (tmp_path / "u" / n).read_bytes(), n


@pytest.mark.slow
def test_preprocess_audio_rerun_after_killed_merge(demo, tmp_path):
    """Killed at the merge: the chunks are all done, the merged files half written."""
    d, tok, _, _ = demo
    out = str(tmp_path / "a")
    cmd = [sys.executable, os.path.join(TOOLS, "preprocess_audio.py"), "--task", "audio_to_caption",
           "--input", d.etta, "--tokenizer", tok, "--chunk-size", "3", "--no-progress", "--out", out]
    killed = subprocess.run(cmd, env={**ENV, KILL_ENV: "3"}, capture_output=True)  # 8 entries: 3 chunks
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    assert len(glob.glob(f"{out}.parts/chunk-*.meta.json")) == 3 and not os.path.exists(f"{out}.meta.json")
    reference = str(tmp_path / "u")
    run_preprocess(PreprocessConfig(inputs=[d.etta], task="audio_to_caption", out=reference, tokenizer=tok,
                                    chunk_size=3, workers=1, progress=False))
    for pid in (4242, 999999):  # two killed merges, two pids
        for ext in (".bin", ".idx", ".audio.bin", ".audio.idx", ".meta.json"):
            whole = open(reference + ext, "rb").read()
            with open(f"{out}{ext}.tmp{pid}", "wb") as f:
                f.write(whole[: len(whole) // 2])
    assert len(_tmp_files(tmp_path)) == 10
    rerun = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "0 written now, 3 resumed" in rerun.stdout + rerun.stderr
    assert _tmp_files(tmp_path) == []
    _same_bytes(out, reference)


def test_merge_datasets_rerun_after_killed_merge(demo, tmp_path):
    d, tok, _, _ = demo
    parts = []
    for name, manifest in (("a", d.af3), ("b", d.etta)):
        parts.append(str(tmp_path / name))
        run_preprocess(PreprocessConfig(inputs=[manifest], task="audio_to_conversation", out=parts[-1],
                                        tokenizer=tok, workers=1, progress=False))
    I.merge_datasets(parts, str(tmp_path / "ref"))
    for ext in (".bin", ".idx", ".audio.bin", ".meta.json"):
        (tmp_path / f"ab{ext}.tmp31337").write_bytes(b"half")
    merged = subprocess.run([sys.executable, os.path.join(TOOLS, "merge_datasets.py"), "--out",
                             str(tmp_path / "ab"), *parts], capture_output=True, text=True,
                            env=ENV)
    assert merged.returncode == 0, merged.stderr
    assert _tmp_files(tmp_path) == []
    _same_bytes(str(tmp_path / "ab"), str(tmp_path / "ref"))
