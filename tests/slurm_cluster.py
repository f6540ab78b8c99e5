"""A throwaway one-node SLURM cluster on localhost, for tests/test_slurm.py.

Set up as it is known to work on this project's Debian 12 machines (SLURM
22.05, root, no systemd, no cgroups): munged runs as the munge user; slurmctld
and slurmd run as root with process tracking by /proc (proctrack/linuxproc,
task/none); job credentials expire after 10 s, so a requeued job restarts after
seconds rather than the default two minutes. Everything the cluster writes
(config, state, spool, logs, pid files) lives in one directory, on ports picked
free, so a stale cluster from an earlier run cannot interfere; daemons are
stopped by the PIDs in their own pid files, never by name.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional, TypeVar

REPO = Path(__file__).resolve().parent.parent
INSTALL_SCRIPT = REPO / ".ci" / "install-slurm.sh"
DAEMONS = ("slurmctld", "slurmd", "munged")
CLIENTS = ("sbatch", "scontrol", "scancel", "squeue", "sinfo", "munge", "unmunge")
MUNGE_PID_FILE = Path("/run/munge/munged.pid")

T = TypeVar("T")


class ClusterError(RuntimeError):
    """The cluster could not be started or did not answer; the message carries its logs."""


def find_binary(name: str) -> Optional[str]:
    """Daemons live in /usr/sbin, which is not on every PATH."""
    found = shutil.which(name)
    if found:
        return found
    for folder in ("/usr/sbin", "/sbin"):
        candidate = Path(folder) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def install() -> Optional[str]:
    """Install SLURM and munge if they are missing: None when ready, else why they are not."""
    if all(find_binary(name) for name in DAEMONS + CLIENTS):
        return None
    if os.geteuid() != 0:
        return "SLURM is not installed and installing it needs root (apt-get)"
    try:
        done = subprocess.run(["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        return "installing SLURM with apt-get took more than 15 minutes"
    missing = [name for name in DAEMONS + CLIENTS if not find_binary(name)]
    if missing:
        said = (done.stdout + done.stderr).strip().splitlines()
        return f"SLURM unavailable ({', '.join(missing)} missing): {said[-1] if said else 'no output'}"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(check: Callable[[], Optional[T]], timeout: float, what: str, interval: float = 0.5) -> T:
    """Poll `check` until it returns something other than None/False; TimeoutError names `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_by_pid_file(path: Path, timeout: float = 15.0) -> None:
    """SIGTERM the process named in a pid file, SIGKILL it if it lingers."""
    try:
        pid = int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    if not _pid_alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _pid_alive(pid):
        os.kill(pid, signal.SIGKILL)


def parse_fields(line: str) -> dict[str, str]:
    """`scontrol show job -o` output as a dict (values with spaces are cut at the space)."""
    return dict(re.findall(r"(\w+)=(\S*)", line))


class Cluster:
    """One node (this host) and one partition `debug`, configured under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.started_munge = False

    # ---------------------------------------------------------------- environment

    @property
    def env(self) -> dict[str, str]:
        """The environment for client commands (and jobs): points SLURM at our config."""
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = env.get("PATH", "") + ":/usr/sbin:/sbin"
        return env

    def run(self, *cmd: str, timeout: float = 30.0, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise ClusterError(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr.strip()}\n{self.logs()}")
        return done

    # ---------------------------------------------------------------- start and stop

    def write_config(self) -> None:
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        mem_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        lines = [
            "# written by tests/slurm_cluster.py: a one-node test cluster, no systemd, no cgroups",
            "ClusterName=llamadisttest",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            "AuthInfo=cred_expire=10",  # else a requeued job waits 120 s before it restarts
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "ReturnToService=2",
            "MpiDefault=none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SchedulerParameters=sched_interval=2,bf_interval=2",  # start requeued jobs promptly
            "KillWait=30",
            "MinJobAge=600",  # keep finished jobs visible to scontrol for the test's checks
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool'}",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={self.root / 'log' / 'slurmd.log'}",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={os.cpu_count() or 1} "
            f"RealMemory={int(mem_mb * 0.9)} State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def munge_works(self) -> bool:
        munge, unmunge = find_binary("munge"), find_binary("unmunge")
        if not (munge and unmunge):
            return False
        encoded = subprocess.run([munge, "-n"], capture_output=True, timeout=10)
        if encoded.returncode != 0:
            return False
        decoded = subprocess.run([unmunge], input=encoded.stdout, capture_output=True, timeout=10)
        return decoded.returncode == 0

    def start_munge(self) -> None:
        """Reuse a running munged; else start one as the munge user (its key comes with the package)."""
        if self.munge_works():
            return
        run_dir = MUNGE_PID_FILE.parent
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.chown(run_dir, "munge", "munge")
        # --force: start despite a stale socket left by a daemon that was killed
        subprocess.run(["runuser", "-u", "munge", "--", find_binary("munged"), "--force"],
                       check=True, capture_output=True, timeout=30)
        self.started_munge = True
        wait_until(self.munge_works, 20, "munged to answer")

    def start(self, timeout: float = 60.0) -> None:
        """Start munge, slurmctld and slurmd; return once the node is idle."""
        self.write_config()
        self.start_munge()
        for daemon in ("slurmctld", "slurmd"):
            # each daemonises and writes its pid file; -f: our config, not /etc/slurm's
            done = subprocess.run([find_binary(daemon), "-f", str(self.conf)], env=self.env,
                                  capture_output=True, text=True, timeout=30)
            if done.returncode != 0:
                raise ClusterError(f"{daemon} did not start ({done.returncode}): {done.stderr.strip()}\n{self.logs()}")
        try:
            wait_until(lambda: self.node_state() == "idle", timeout, f"node {self.node} to become idle")
        except TimeoutError as err:
            raise ClusterError(f"{err} (state: {self.node_state()!r})\n{self.logs()}") from None

    def node_state(self) -> str:
        done = self.run("sinfo", "-h", "-N", "-o", "%T", check=False)
        return done.stdout.strip().rstrip("*~#") if done.returncode == 0 else ""

    def cancel_all(self, timeout: float = 40.0) -> None:
        """Cancel every job and wait until none is left: jobs outlive a stopped slurmd."""
        jobs = self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
        if not jobs:
            return
        self.run("scancel", *jobs, check=False)
        try:
            wait_until(lambda: not self.run("squeue", "-h", "-o", "%i", check=False).stdout.split(),
                       timeout, "cancelled jobs to end")
        except TimeoutError:
            pass

    def stop(self) -> None:
        if self.conf.exists():
            self.cancel_all()
        stop_by_pid_file(self.root / "slurmd.pid")
        stop_by_pid_file(self.root / "slurmctld.pid")
        if self.started_munge:
            stop_by_pid_file(MUNGE_PID_FILE)

    # ---------------------------------------------------------------- jobs

    def sbatch(self, args: list[str], cwd: Path, env: Optional[dict[str, str]] = None) -> str:
        """Submit a job; returns its id."""
        full_env = self.env
        full_env.update(env or {})
        done = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, env=full_env,
                              capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise ClusterError(f"sbatch {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """The job's fields from scontrol (JobState, Restarts, ExitCode, ...); {} once it is gone."""
        done = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        return parse_fields(done.stdout) if done.returncode == 0 else {}

    def logs(self, lines: int = 15) -> str:
        """The tail of each daemon log, for failure messages."""
        parts = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.root / "log" / name
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path}\n" + "\n".join(tail))
        return "\n".join(parts)
