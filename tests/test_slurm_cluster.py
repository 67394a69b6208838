"""``sbatch slurm/pretrain_ualm.sh`` on a real one-node Slurm (``slurm_cluster.LocalSlurm``):
the tiny model on CPU, two ranks over gloo, preempted through Slurm itself.

For each launcher (srun: a task per rank; torchrun: one task running the agent) the job is
sent ``scancel --signal=USR1 --full`` mid-run -- the signal reaches the batch shell, the agent,
every rank and every helper process at once, as Slurm delivers it. The test asserts that the
preemption checkpoint is complete, that the job requeued itself, that the next run resumed
from that checkpoint, and that every step's loss equals an uninterrupted job's bit for bit.
Skipped, with the reason, where Slurm cannot be installed or run (no root, no package registry).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from slurm_cluster import LocalSlurm, _free_port, missing_reason
from tiny_training import tiny_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "slurm" / "pretrain_ualm.sh"
# SIGNAL_AFTER leaves 25 steps (several seconds) for scancel to reach the job: with fewer, a fast
# machine could finish training before the signal arrives (the job then simply completes).
ITERS, SAVE_INTERVAL, SIGNAL_AFTER = 30, 4, 5

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    from megatron_ualm.config import save_config
    root = tmp_path_factory.mktemp("slurm-data")
    # experiment_dir is overridden per job; two ranks: data parallel over gloo
    cfg = tiny_config(str(root / "data"), str(root / "unused"), f"training.train_iters={ITERS}",
                      f"checkpoint.save_interval={SAVE_INTERVAL}", "parallel.device=cpu",
                      "data.num_workers=1")
    path = root / "tiny.yaml"
    save_config(cfg, str(path))
    return path


def losses(exp: Path) -> dict:
    out = {}
    for line in (exp / "logs" / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("kind") == "train":
            out[r["step"]] = r["loss"]  # a resumed run logs its steps again: the last one wins
    return out


def submit(slurm: LocalSlurm, config: Path, exp: Path, launcher: str) -> int:
    env = {"CONFIG": str(config), "OVERRIDES": f"checkpoint.experiment_dir={exp}", "LAUNCHER": launcher,
           "GPUS_PER_NODE": "2", "PYTHON": sys.executable, "LOG_DIR": str(exp / "slurm-logs"),
           "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1"}
    return slurm.sbatch(str(SCRIPT), "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1",
                        f"--output={exp}/job-%j.out", cwd=str(ROOT), extra_env=env)


def finished(info: dict) -> bool:
    return info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def job_log(exp: Path) -> str:
    logs = sorted(exp.glob("job-*.out")) + sorted((exp / "slurm-logs").glob("*.log"))
    return "\n".join(f"--- {p.name}\n{p.read_text()[-20000:]}" for p in logs)


@pytest.fixture(scope="module")
def reference(slurm, config_file, tmp_path_factory):
    exp = tmp_path_factory.mktemp("reference")
    job = submit(slurm, config_file, exp, "srun")
    info = slurm.wait(job, finished, 400, "the uninterrupted job to finish")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", job_log(exp)
    got = losses(exp)
    assert sorted(got) == list(range(1, ITERS + 1)), job_log(exp)
    return got


@pytest.mark.parametrize("launcher", ["srun", "torchrun"])
def test_preempted_job_saves_requeues_resumes_and_matches(slurm, config_file, reference, tmp_path, launcher):
    exp = tmp_path / "run"
    exp.mkdir()
    job = submit(slurm, config_file, exp, launcher)
    metrics = exp / "logs" / "metrics.jsonl"

    def past_signal_step(info):
        assert not finished(info), f"job ended before the signal:\n{job_log(exp)}"
        return metrics.exists() and max(losses(exp), default=0) >= SIGNAL_AFTER

    slurm.wait(job, past_signal_step, 300, f"step {SIGNAL_AFTER}")
    slurm.run("scancel", "--signal=USR1", "--full", str(job))

    # The job saves, exits for requeue and requeues itself: Slurm counts a restart.
    info = slurm.wait(job, lambda i: int(i.get("Restarts", 0)) >= 1, 200, "the job to requeue itself")
    ckpts = sorted((exp / "checkpoints").glob("iter_*"))
    assert ckpts and (ckpts[-1] / "COMPLETE").exists(), job_log(exp)
    preempted_at = int(ckpts[-1].name.split("_")[1])
    # the newest checkpoint is the preemption save (it may fall on an interval step too)
    assert preempted_at >= SIGNAL_AFTER and "checkpoint saved on preemption" in job_log(exp), job_log(exp)
    assert not list((exp / "checkpoints").glob("*.tmp*"))
    assert (exp / "slurm-logs" / f".requeue-{job}-0").exists()
    # A requeued job waits for its begin time (about two minutes, while slurmd revokes the old
    # run's credential); start it sooner, but only once the node is idle again and a few seconds
    # have passed: a start in the second of the revocation is refused ("credential revoked").
    slurm.wait_idle(60)
    time.sleep(3)
    if slurm.job(job).get("JobState") == "PENDING":
        slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)
    info = slurm.wait(job, lambda i: finished(i) and int(i.get("Restarts", 0)) >= 1, 400,
                      "the requeued job to finish")
    log = job_log(exp)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    assert "requeueing job" in log and f"resumed from {ckpts[-1]} at iteration {preempted_at}" in log
    got = losses(exp)
    assert sorted(got) == list(range(1, ITERS + 1)), log
    for step in got:
        assert got[step] == reference[step], (step, got[step], reference[step])
