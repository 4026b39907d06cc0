"""A real, hermetic SLURM cluster on localhost for tests (docs/design.md §7): one node, or several.

Debian's slurmctld + slurmd + munge, run as root in the foreground as children of the test
process: a private munged (own key and socket, `--force` so the test directory's ownership is
accepted), slurm.conf from `slurmd -C` with every path under the test directory, ports on
127.0.0.1, and `cred_expire=5` so a requeued job restarts within seconds instead of 120 s.
Clients find the cluster through the environment `env()` returns (SLURM_CONF).

With `nodes=N > 1` every node is its own slurmd (`slurmd -N name`) with its own loopback address
(127.0.0.2, 127.0.0.3, ...), port, spool directory and log, and one CPU: SLURM schedules, launches
and signals them as separate machines, although they share this one.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

BINARIES = ("slurmctld", "slurmd", "munged", "sbatch", "squeue", "scontrol", "scancel", "srun")


def missing() -> str | None:
    """Why a cluster cannot start here, or None."""
    absent = [b for b in BINARIES if shutil.which(b) is None]
    if absent:
        return f"SLURM binaries not installed ({', '.join(absent)}); .ci/run installs them"
    if os.geteuid() != 0:
        return "the test SLURM cluster runs as root (SlurmUser=root)"
    return None


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the test process dies, however it dies, so a
    killed test run leaves no daemons behind (they run in the foreground and do not re-fork)."""
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_line() -> str:
    """This machine's hardware as slurmd sees it, minus UpTime; no fake GPUs (the node would
    go invalid)."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    first = out.splitlines()[0].split()
    return " ".join(f for f in first if not f.startswith("UpTime"))


class SlurmCluster:
    """Start with `start()`, stop with `stop()` (which cancels jobs before the daemons)."""

    def __init__(self, root: Path, nodes: int = 1) -> None:
        self.root = root
        self.nodes = nodes
        self.names: list[str] = []
        self.conf = root / "slurm.conf"
        self.socket = root / "munge" / "munge.sock"
        self.procs: list[subprocess.Popen] = []

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in (base or os.environ).items() if not k.startswith("SLURM_")}
        env["SLURM_CONF"] = str(self.conf)
        return env

    def _node_lines(self) -> list[str]:
        """One line per node; a single node is this machine as `slurmd -C` describes it."""
        if self.nodes == 1:
            node = _node_line()
            self.names = [node.split()[0].split("=", 1)[1]]
            return [f"{node} NodeAddr=127.0.0.1 State=UNKNOWN"]
        self.names = [f"ediffn{i}" for i in range(self.nodes)]
        return [
            f"NodeName={n} NodeAddr=127.0.0.{i + 2} Port={_free_port()} CPUs=1 State=UNKNOWN"
            for i, n in enumerate(self.names)
        ]

    def _write_config(self) -> None:
        nodes = "\n".join(self._node_lines())
        host = _node_line().split()[0].split("=", 1)[1]
        r = self.root
        for d in ("state", "spool", "munge", "log", *(f"spool/{n}" for n in self.names)):
            (r / d).mkdir(parents=True, exist_ok=True)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.conf.write_text(f"""\
ClusterName=ediff-test
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.socket},cred_expire=5
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
StateSaveLocation={r / "state"}
SlurmdSpoolDir={r / "spool" / ("%n" if self.nodes > 1 else "")}
SlurmctldPidFile={r / "slurmctld.pid"}
SlurmdPidFile={r / "slurmd-%n.pid"}
SlurmctldLogFile={r / "log" / "slurmctld.log"}
SlurmdLogFile={r / "log" / "slurmd-%n.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
MinJobAge=600
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
{nodes}
PartitionName=debug Nodes={",".join(self.names)} Default=YES MaxTime=INFINITE State=UP
""")

    def _spawn(self, *cmd: str) -> None:
        name = "-".join([Path(cmd[0]).name, *cmd[3:4]] if cmd[1:3] == ("-D", "-N") else [cmd[0]])
        with open(self.root / "log" / f"{name}.stdout", "ab") as log:
            self.procs.append(
                subprocess.Popen(
                    cmd,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self.env(),
                    preexec_fn=_die_with_parent,
                )
            )

    def start(self, timeout: float = 30.0) -> None:
        self._write_config()
        m = self.root / "munge"
        self._spawn(
            "munged",
            "--foreground",
            "--force",
            f"--socket={self.socket}",
            f"--key-file={m / 'munge.key'}",
            f"--pid-file={m / 'munged.pid'}",
            f"--log-file={m / 'munged.log'}",
            f"--seed-file={m / 'munged.seed'}",
        )
        self._wait(lambda: self.socket.exists(), timeout, "munged did not create its socket")
        self._spawn("slurmctld", "-D", "-c", "-f", str(self.conf))
        for name in self.names:
            self._spawn("slurmd", "-D", "-N", name, "-f", str(self.conf))
        self._wait(self._node_idle, timeout, "the nodes did not become idle")

    def _node_idle(self) -> bool:
        for p in self.procs:
            if p.poll() is not None:
                raise RuntimeError(f"{p.args[0]} exited with {p.returncode}:\n{self.logs()}")
        out = self.run("sinfo", "--Node", "--noheader", "--format=%T", check=False).stdout
        states = out.split()
        return len(states) == self.nodes and all(s.startswith("idle") for s in states)

    def _wait(self, ready, timeout: float, what: str) -> None:  # noqa: ANN001
        end = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > end:
                self.stop()
                raise RuntimeError(f"{what} within {timeout:.0f} s:\n{self.logs()}")
            time.sleep(0.2)

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            cmd, env=self.env(), capture_output=True, text=True, check=check, timeout=60
        )

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Reason, StartTime, EndTime, Restarts, ...)."""
        out = self.run("scontrol", "show", "job", "--oneliner", job_id).stdout
        fields = {}
        for item in out.split():
            key, sep, value = item.partition("=")
            if sep:
                fields.setdefault(key, value)
        return fields

    def queue(self) -> list[str]:
        out = self.run("squeue", "--noheader", "--format=%i", check=False).stdout
        return out.split()

    def logs(self, tail: int = 30) -> str:
        parts = []
        for f in sorted((self.root / "log").glob("*")) + [self.root / "munge" / "munged.log"]:
            if f.is_file():
                lines = f.read_text(errors="replace").splitlines()[-tail:]
                parts.append(f"--- {f.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel every job first (or slurmstepd lingers), then the daemons, newest first."""
        if self.procs and all(p.poll() is None for p in self.procs):
            jobs = self.queue()
            if jobs:
                self.run("scancel", *jobs, check=False)
                end = time.monotonic() + 20
                while self.queue() and time.monotonic() < end:
                    time.sleep(0.3)
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=5)
        self.procs = []
