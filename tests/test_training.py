"""The trainer end to end on CPU: exact resume after kill -9 (also during an asynchronous save),
resharded resume, preemption."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dist_utils import run_distributed
from megatron_ualm.training import checkpoint as ckpt
from tiny_training import tiny_config, write_datasets

HERE = Path(__file__).resolve().parent
RUNNER = f"""
import sys
sys.path.insert(0, {str(HERE)!r})
from tiny_training import tiny_config
from megatron_ualm.training.loop import pretrain
if __name__ == "__main__":
    pretrain(tiny_config(sys.argv[1], sys.argv[2], *sys.argv[3:]))
"""
# The same, but the background writer of iteration 4's checkpoint never ends (it has written
# and hashed its files): a kill is sure to come while that save is in flight.
RUNNER_WITH_STUCK_WRITER = RUNNER.replace("if __name__", """
import time
from megatron_ualm.training import checkpoint
write_rank_files = checkpoint._write_rank_files

def stuck_at_iteration_4(write, directory, *args, **kwargs):
    write_rank_files(write, directory, *args, **kwargs)
    if "iter_0000004.tmp-" in directory:
        time.sleep(3600)

checkpoint._write_rank_files = stuck_at_iteration_4
if __name__""")


def losses(exp_dir) -> dict:
    out = {}
    path = Path(exp_dir) / "logs" / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:  # a line cut by kill -9
                continue
            if r.get("kind") == "train":
                out[r["step"]] = r["loss"]
    return out


def start(data, exp, *overrides, new_session=False, runner=RUNNER):
    script = Path(exp).parent / "runner.py"
    script.write_text(runner)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(script), str(data), str(exp), *overrides],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=new_session)


def wait_for_step(proc, exp, step, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if max(losses(exp), default=0) >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early ({proc.returncode}):\n{proc.stdout.read()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("trainer too slow")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_datasets(str(root))
    return root


@pytest.mark.slow
def test_kill9_then_resume_gives_bitwise_identical_losses(data, tmp_path):
    iters = "training.train_iters=8"
    ref = start(data, tmp_path / "ref", iters)
    out, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, out
    expected = losses(tmp_path / "ref")
    assert sorted(expected) == list(range(1, 9))

    victim = start(data, tmp_path / "run", iters)
    wait_for_step(victim, tmp_path / "run", 5)  # checkpoint 4 exists (or is being written)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    again = start(data, tmp_path / "run", iters)
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out
    assert "resumed from" in out
    got = losses(tmp_path / "run")
    for step in range(1, 9):
        assert got[step] == expected[step], (step, got[step], expected[step])  # bitwise


@pytest.mark.slow
def test_kill9_during_an_async_save_resumes_from_the_previous_checkpoint(data, tmp_path):
    iters = "training.train_iters=8"  # checkpoints every 2 iterations
    ref = start(data, tmp_path / "ref", iters)  # synchronous saves
    out, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, out
    expected = losses(tmp_path / "ref")

    run, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    victim = start(data, run, iters, "checkpoint.async_save=true", runner=RUNNER_WITH_STUCK_WRITER,
                   new_session=True)
    wait_for_step(victim, run, 5)  # training went on while iteration 4's save is in flight
    assert (ckpts / "iter_0000002" / "COMPLETE").exists() and not (ckpts / "iter_0000004").exists()
    assert [p.name[:17] for p in ckpts.glob("iter_0000004.*")] == ["iter_0000004.tmp-"]
    victim.kill()
    victim.communicate(timeout=30)
    deadline = time.time() + 10  # the stuck writer (and every other helper) dies with the trainer
    while [d for d in os.listdir("/proc") if d.isdigit() and _pgid(int(d)) == victim.pid] and time.time() < deadline:
        time.sleep(0.1)
    assert not [d for d in os.listdir("/proc") if d.isdigit() and _pgid(int(d)) == victim.pid]

    again = start(data, run, iters, "checkpoint.async_save=true")
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out
    assert f"resumed from {ckpts / 'iter_0000002'} at iteration 2" in out
    got = losses(run)
    for step in range(1, 9):  # resumed from a checkpoint written in the background: bitwise the same
        assert got[step] == expected[step], (step, got[step], expected[step])
    # the partial save was removed by the next one; what is left is intact
    assert sorted(p.name for p in ckpts.iterdir()) == ["iter_0000002", "iter_0000004", "iter_0000006",
                                                       "iter_0000008", "latest"]
    assert all(ckpt.verify_checkpoint(ckpts / f"iter_000000{i}") == [] for i in (2, 4, 6, 8))


def _train(data, exp, layout, iters, copy_from=None):
    cfg = tiny_config(str(data), str(exp), f"training.train_iters={iters}", *layout)
    from megatron_ualm.training.loop import pretrain
    pretrain(cfg)
    return losses(exp)


@pytest.mark.slow
def test_checkpoint_saved_at_tp2_resumes_at_tp1_and_pp2(data, tmp_path):
    # 4 layers, so that the pipeline can also split them 3 + 1 (parallel.first_stage_layers)
    tp2 = ["parallel.tensor_parallel=2", "model.num_layers=4"]
    ref = run_distributed(_train, 2, data, tmp_path / "tp2", tp2, 3)[0]
    saved = tmp_path / "tp2" / "checkpoints" / "iter_0000002"
    assert saved.is_dir()
    pp2 = ["model.num_layers=4", "parallel.pipeline_parallel=2"]
    for name, layout, world in (("tp1", ["model.num_layers=4"], 1), ("pp2", pp2, 2),
                                ("pp2_3_1", pp2 + ["parallel.first_stage_layers=3"], 2)):
        exp = tmp_path / name
        (exp / "checkpoints").mkdir(parents=True)
        shutil.copytree(saved, exp / "checkpoints" / "iter_0000002")
        if world == 1:
            got = _train(data, exp, layout, 3)
        else:
            results = run_distributed(_train, world, data, exp, layout, 3)
            got = next(r for r in results if r)  # the last pipeline stage logs
        assert list(got) == [3]
        assert got[3] == pytest.approx(ref[3], rel=1e-5, abs=1e-6), name


@pytest.mark.slow
def test_checkpoint_resumes_at_pp2_and_interleaved_pp2_vpp2_with_equal_losses(data, tmp_path):
    # 4 micro-batches over 2 stages x 2 chunks: the interleaved schedule's steady state sends
    # activations forward and gradients backward in one exchange, between the same two ranks
    # (PP=2), where batched p2p once paired them the wrong way round.
    common = ["model.num_layers=4", "training.global_batch_size=8", "checkpoint.save_interval=1"]
    pp2 = common + ["parallel.pipeline_parallel=2"]
    ref = next(r for r in run_distributed(_train, 2, data, tmp_path / "pp2", pp2, 3) if r)
    saved = tmp_path / "pp2" / "checkpoints" / "iter_0000001"
    assert saved.is_dir()
    exp = tmp_path / "vpp2"
    (exp / "checkpoints").mkdir(parents=True)
    shutil.copytree(saved, exp / "checkpoints" / "iter_0000001")
    got = next(r for r in run_distributed(_train, 2, data, exp, pp2 + ["parallel.virtual_pipeline_parallel=2"], 3)
               if r)
    assert sorted(got) == [2, 3]
    for step in (2, 3):  # step 2: the forward pass; step 3: also the gradients of step 2
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-6), step


@pytest.mark.slow
@pytest.mark.parametrize("sig,to_group", [(signal.SIGTERM, False), (signal.SIGTERM, True), (signal.SIGUSR1, True)])
def test_preemption_signal_saves_a_checkpoint_and_exits_for_requeue(data, tmp_path, sig, to_group):
    """The signal reaches the trainer alone (``kill PID``) or, as Slurm and ``kill -- -PGID``
    deliver it, every process of the group at once -- including the helper processes that an
    earlier interval save started for megatron's checkpoint writer."""
    proc = start(data, tmp_path / "run", "training.train_iters=1000", "checkpoint.save_interval=2",
                 f"data.num_workers={2 if to_group else 0}", new_session=to_group)
    wait_for_step(proc, tmp_path / "run", 3)  # after the interval save at step 2
    if to_group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 42, out
    assert "preemption signal" in out
    ckpts = sorted((tmp_path / "run" / "checkpoints").glob("iter_*"))
    assert ckpts and (ckpts[-1] / "COMPLETE").exists() and not list((tmp_path / "run" / "checkpoints").glob("*.tmp*"))
    step = int(ckpts[-1].name.split("_")[1])
    assert step >= 3 and max(losses(tmp_path / "run")) == step


@pytest.mark.slow
def test_kill9_of_the_trainer_leaves_no_helper_process(data, tmp_path):
    """The data-loader workers and the checkpoint writer's queue server ignore the preemption
    signals, so they must end with the trainer when it is killed outright."""
    proc = start(data, tmp_path / "run", "training.train_iters=1000", "checkpoint.save_interval=2",
                 "data.num_workers=2", new_session=True)
    wait_for_step(proc, tmp_path / "run", 3)  # the interval save at step 2 started the writer's helpers

    def group():
        return [int(d) for d in os.listdir("/proc") if d.isdigit() and _pgid(int(d)) == proc.pid]

    helpers = [pid for pid in group() if pid != proc.pid]
    assert len(helpers) >= 3, helpers  # two loader workers + the queue server (+ resource tracker)
    proc.kill()
    proc.communicate(timeout=30)
    deadline = time.time() + 10
    while group() and time.time() < deadline:
        time.sleep(0.1)
    assert group() == [], [open(f"/proc/{p}/cmdline").read() for p in group()]


def _pgid(pid):
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def test_bad_config_is_a_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "megatron_ualm.train", "--config",
                        str(HERE.parent / "examples" / "tiny.yaml"), "parallel.tensor_parallel=3"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: parallel.tensor_parallel: must divide model.num_attention_heads=4, got 3 (allowed: 1, 2, 4)"]


def test_missing_dataset_names_the_file(tmp_path):
    cfg = tiny_config(str(tmp_path / "d"), str(tmp_path / "run"),
                      f"data.train=[{{path: {tmp_path}/nope, task: text_only}}]")
    from megatron_ualm.training.providers import build_datasets
    with pytest.raises(FileNotFoundError, match="nope.meta.json is missing"):
        build_datasets(cfg, 4)


def test_per_stream_metrics_and_loss_plot(data, tmp_path):
    from megatron_ualm.training.loop import pretrain
    from megatron_ualm.training.plot import main as plot_main
    pretrain(tiny_config(str(data), str(tmp_path / "run"), "training.train_iters=2"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "logs" / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*rows)
    assert {"loss", "text_loss", "audio_loss", "grad_norm", "lr", "tokens_per_s", "data_wait_s"} <= keys
    assert {f"stream_loss/{k}" for k in range(4)} <= keys  # tiny_training uses K=4
    assert any(k.startswith("loss/") for k in keys)
    plot_main([str(tmp_path / "run"), "--out", str(tmp_path / "loss.png")])
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_overlapped_grad_reduce_and_param_gather_match_the_plain_run(data, tmp_path):
    """DP=2 with the distributed optimizer: overlapping communication changes no number.
    (Batches without audio clips leave the adapter unused; the overlapped reduce needs a
    gradient for every trainable parameter anyway.)"""
    common = ["parallel.use_distributed_optimizer=true", "training.train_iters=3"]
    plain = run_distributed(_train, 2, data, tmp_path / "plain", common, 3)[0]
    # small buckets: many bucket groups, each all-gather dispatched by the previous one's wait
    overlap = run_distributed(_train, 2, data, tmp_path / "overlap", common + [
        "parallel.overlap_grad_reduce=true", "parallel.overlap_param_gather=true",
        "parallel.ddp_bucket_size=20000"], 3)[0]
    assert list(overlap) == [1, 2, 3]
    for step in plain:
        assert overlap[step] == pytest.approx(plain[step], rel=1e-6), step
