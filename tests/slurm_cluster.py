"""A real one-node Slurm cluster on localhost for the tests (Debian's ``slurm-wlm`` + ``munge``).

``LocalSlurm`` starts munged, slurmctld and slurmd with their own key, socket, ports, state and
spool directories under a temporary folder (``SLURM_CONF`` points every client at it), so it
touches no system-wide Slurm. The node has the machine's CPUs and no GPUs. Needs root (the
daemons run as root in this sandbox); installs the packages with apt-get when missing.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

PACKAGES = ("slurm-wlm", "munge")
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sacct")


#: Pending reasons that do not go away by waiting (the request does not fit the node).
NEVER_RUNS = ("PartitionConfig", "BadConstraints", "PartitionNodeLimit", "ReqNodeNotAvail")


def missing_reason() -> Optional[str]:
    """Why a local Slurm cannot run here (installing it first if possible), or None."""
    if os.geteuid() != 0:
        return "the local Slurm cluster needs root (its daemons run as root here)"
    if all(shutil.which(b) for b in BINARIES[:5]):
        return None
    if not shutil.which("apt-get"):
        return f"Slurm is not installed and there is no apt-get to install {' '.join(PACKAGES)}"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        try:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            return f"`{' '.join(cmd)}` timed out (package registry unreachable?)"
        if r.returncode != 0:
            tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or [""]
            return f"`{' '.join(cmd)}` failed: {tail[0]}"
    missing = [b for b in BINARIES[:5] if not shutil.which(b)]
    return f"installed {' '.join(PACKAGES)} but {missing} are still missing" if missing else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSlurm:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.host = socket.gethostname().split(".")[0]
        self.cpus = os.cpu_count() or 1
        self.env = {**os.environ, "SLURM_CONF": str(self.root / "slurm.conf")}
        for var in list(self.env):
            if var.startswith(("SLURM_", "SBATCH_", "SRUN_")) and var != "SLURM_CONF":
                del self.env[var]  # a cluster's job variables must not leak into ours
        self._pids: list[Path] = []

    # --- lifecycle ------------------------------------------------------------------------
    def start(self) -> "LocalSlurm":
        r = self.root
        for d in ("state", "spool", "log", "munge"):
            (r / d).mkdir(parents=True, exist_ok=True)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        (r / "munge").chmod(0o700)
        sock = r / "munge" / "munge.socket"
        subprocess.run(["munged", "--force", f"--key-file={key}", f"--socket={sock}",
                        f"--pid-file={r / 'munge' / 'munged.pid'}", f"--log-file={r / 'log' / 'munged.log'}",
                        f"--seed-file={r / 'munge' / 'munged.seed'}"], check=True, capture_output=True)
        self._pids.append(r / "munge" / "munged.pid")
        (r / "slurm.conf").write_text(f"""\
ClusterName=ualmtest
SlurmctldHost={self.host}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={sock}
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
SlurmctldLogFile={r / 'log' / 'slurmctld.log'}
SlurmdLogFile={r / 'log' / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobRequeue=1
ReturnToService=2
MpiDefault=none
KillWait=30
InactiveLimit=0
MinJobAge=600
NodeName={self.host} CPUs={self.cpus} State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
""")
        for daemon in ("slurmctld", "slurmd"):
            subprocess.run([daemon], env=self.env, check=True, capture_output=True)
            self._pids.append(r / f"{daemon}.pid")
        deadline = time.time() + 60
        while time.time() < deadline:
            out = self.run("sinfo", "-h", "-o", "%t", check=False).stdout.strip()
            if out in ("idle", "mix", "alloc"):
                return self
            time.sleep(0.5)
        raise RuntimeError(f"the local Slurm node did not come up (sinfo: {out!r}); logs in {r / 'log'}")

    def stop(self) -> None:
        self.run("scancel", "--user=root", "--full", check=False)
        for pid_file in reversed(self._pids):
            try:
                pid = int(pid_file.read_text().split()[0])
                os.kill(pid, 15)
                deadline = time.time() + 10
                while time.time() < deadline and os.path.exists(f"/proc/{pid}"):
                    time.sleep(0.1)
            except (OSError, ValueError, IndexError):
                pass

    # --- clients --------------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True, cwd=None, extra_env: Optional[dict] = None):
        env = {**self.env, **(extra_env or {})}
        return subprocess.run(list(cmd), env=env, capture_output=True, text=True, check=check, cwd=cwd)

    def sbatch(self, script: str, *options: str, cwd=None, extra_env: Optional[dict] = None) -> int:
        out = self.run("sbatch", "--parsable", *options, script, cwd=cwd, extra_env=extra_env).stdout
        return int(out.strip().split(";")[0])

    def job(self, job_id: int) -> dict:
        """``scontrol show job``'s fields (``{}`` once the job is gone)."""
        out = self.run("scontrol", "-o", "show", "job", str(job_id), check=False).stdout
        fields = {}
        for item in out.split():
            key, _, value = item.partition("=")
            fields[key] = value
        return fields

    def wait_idle(self, timeout: float) -> None:
        """Until the node has no job (or a completing one) on it."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.run("sinfo", "-h", "-o", "%t", check=False).stdout.strip() == "idle":
                return
            time.sleep(0.5)
        raise AssertionError(f"the node is not idle after {timeout} s: {self.run('sinfo', check=False).stdout}")

    def wait(self, job_id: int, predicate, timeout: float, what: str) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if predicate(info):
                return info
            if info.get("JobState") == "PENDING" and info.get("Reason") in NEVER_RUNS:
                raise AssertionError(f"job {job_id} can never run here ({info['Reason']}): {info}")
            time.sleep(0.5)
        raise AssertionError(f"job {job_id}: timed out waiting for {what}; last state {self.job(job_id)}")
