"""A real two-node Slurm cluster on this machine, for tests (Debian 12's slurm-wlm 22.05 and munge).

    with slurm_cluster(tmp_dir) as cluster:           # or the ``slurm`` fixture in test_slurm.py
        job = cluster.sbatch(["--nodes=2", "script.sh"], cwd=repo)
        info = cluster.wait_finished(job)              # {"JobState": "COMPLETED", "Restarts": "0", ...}

What it starts, each in the foreground under this process, with every file in
the temporary folder ``root`` (nothing under /etc, /run or /var is touched):

- ``munged`` with its own key, socket, pid, seed and log files;
- ``slurmctld`` with a ``slurm.conf`` written there: two nodes ``n1`` and ``n2``,
  both at 127.0.0.1 on their own ports, per-node spool, pid and log paths (``%n``),
  process tracking through /proc (no cgroups, no systemd), no accounting;
- ``slurmd -N n1`` and ``slurmd -N n2``: two nodes on one machine.

Clients find the cluster through ``SLURM_CONF`` in ``cluster.env``. Each daemon
(and so every job step, whose environment derives from the daemons' and the
submitter's) carries a marker variable naming ``root``; teardown cancels the
jobs, stops the daemons, then kills by pid any process still carrying the
marker and reports it as an error, so a test never leaves a cluster behind.

Needs root (slurmd launches jobs as their user) and the Debian packages
(``scripts/system_deps.sh`` installs them).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "squeue", "scancel", "srun")
MARKER = "VLBERT_TEST_SLURM_ROOT"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}


class SlurmError(RuntimeError):
    """The cluster could not start, or a job did not reach the expected state."""


def missing_requirements() -> Optional[str]:
    """Why this machine cannot run the cluster, or None."""
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        return (f"Slurm/munge programs not found: {', '.join(missing)}; install Debian's slurm-wlm and munge "
                "(bash scripts/system_deps.sh, as root)")
    if os.geteuid() != 0:
        return "the test Slurm cluster runs slurmd, which must run as root"
    return None


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports that are free on 127.0.0.1 now."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def parse_record(line: str) -> dict[str, str]:
    """``scontrol show ... -o`` output: ``Key=value`` pairs (values cut at the first space)."""
    return dict(re.findall(r"(?:^|\s)([A-Za-z][\w/:]*)=(\S*)", line))


class SlurmCluster:
    """Writes the configuration under ``root``; ``start()`` brings the daemons up, ``stop()`` down."""

    def __init__(self, root: Path, nodes: tuple[str, ...] = ("n1", "n2"), cpus_per_node: int = 2):
        self.root = Path(root)
        self.nodes = nodes
        self.cpus_per_node = cpus_per_node
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.partition = "test"
        self._procs: dict[str, subprocess.Popen] = {}
        self._logs: dict[str, Path] = {}
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        self.env.update(SLURM_CONF=str(self.conf), **{MARKER: str(self.root)})

    # ----------------------------------------------------------------- configuration

    def _write_munge_key(self) -> Path:
        d = self.root / "munge"
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = d / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)
        return key

    def _write_conf(self) -> None:
        r = self.root
        for sub in ("state", "log", "spool", "run"):
            (r / sub).mkdir(parents=True, exist_ok=True)
        for node in self.nodes:
            (r / "spool" / node).mkdir(exist_ok=True)
        ctld_port, *node_ports = free_ports(1 + len(self.nodes))
        host = socket.gethostname().split(".")[0]
        lines = [
            "ClusterName=vlberttest",
            # The address in parentheses: clients need no name resolution for this host.
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}/%n",
            f"SlurmctldPidFile={r / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'run'}/slurmd-%n.pid",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log'}/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            # No cgroups and no systemd here: track job processes through /proc.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SwitchType=switch/none",
            "MpiDefault=none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/builtin",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "ReturnToService=2",
            "JobRequeue=1",
            "MinJobAge=3600",  # keep finished jobs visible to `scontrol show job`
            "KillWait=10",
            "MessageTimeout=30",  # a loaded 2-core machine answers slowly
            "BatchStartTimeout=60",
            "SlurmdTimeout=300",
            "InactiveLimit=0",
            # A node with fewer cores than configured is still used (CI machines vary).
            "SlurmdParameters=config_overrides",
        ]
        for node, port in zip(self.nodes, node_ports):
            lines.append(f"NodeName={node} NodeAddr=127.0.0.1 NodeHostname={host} Port={port} "
                         f"CPUs={self.cpus_per_node} State=UNKNOWN")
        lines.append(f"PartitionName={self.partition} Nodes={','.join(self.nodes)} Default=YES "
                     "MaxTime=INFINITE State=UP OverSubscribe=YES")
        self.conf.write_text("\n".join(lines) + "\n")

    # ----------------------------------------------------------------- daemons

    def _spawn(self, name: str, args: list[str]) -> None:
        log = self.root / "log" / f"{name}.stdout"
        self._logs[name] = log
        with open(log, "ab") as f:
            self._procs[name] = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                                 env=self.env, cwd=self.root, start_new_session=True)

    def _check_alive(self, name: str) -> None:
        proc = self._procs[name]
        if proc.poll() is not None:
            raise SlurmError(f"{name} exited with status {proc.returncode}:\n{self.daemon_logs()}")

    def start(self, timeout: float = 90.0) -> "SlurmCluster":
        self.root.mkdir(parents=True, exist_ok=True)
        key = self._write_munge_key()
        self._write_conf()
        m = self.root / "munge"
        # --force: munged refuses keys and sockets in folders it finds insecure (e.g. /tmp's parents).
        self._spawn("munged", ["munged", "--foreground", "--force", f"--key-file={key}",
                               f"--socket={self.munge_socket}", f"--pid-file={m / 'munged.pid'}",
                               f"--seed-file={m / 'munged.seed'}", f"--log-file={m / 'munged.log'}"])
        self._wait(lambda: self.munge_socket.exists(), 20, "munged's socket", ["munged"])
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        self._wait(lambda: self.cmd("scontrol", "ping", check=False).find("UP") >= 0, 30, "slurmctld to answer",
                   ["munged", "slurmctld"])
        for node in self.nodes:
            self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", str(self.conf)])
        daemons = list(self._procs)
        self._wait(self._all_idle, timeout, f"nodes {', '.join(self.nodes)} to be idle", daemons)
        return self

    def _all_idle(self) -> bool:
        out = self.cmd("sinfo", "-h", "-N", "-o", "%N %t", check=False)
        states = dict(line.split() for line in out.splitlines() if len(line.split()) == 2)
        return all(states.get(n) == "idle" for n in self.nodes)

    def _wait(self, cond: Callable[[], bool], timeout: float, what: str, daemons: list[str]) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for name in daemons:
                self._check_alive(name)
            if cond():
                return
            time.sleep(0.3)
        raise SlurmError(f"timed out after {timeout:.0f} s waiting for {what}:\n{self.daemon_logs()}")

    def daemon_logs(self, lines: int = 15) -> str:
        out = []
        for path in sorted((self.root / "log").glob("*")) + [self.root / "munge" / "munged.log"]:
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(out)

    # ----------------------------------------------------------------- clients

    def cmd(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        """Run a Slurm client command against this cluster; stdout (+ stderr when it fails)."""
        p = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise SlurmError(f"{' '.join(args)} exited {p.returncode}: {p.stderr.strip()}")
        return p.stdout if p.returncode == 0 else p.stdout + p.stderr

    def sbatch(self, args: list[str], cwd: Path, env: Optional[dict[str, str]] = None) -> int:
        """Submit; ``env`` is added to the cluster environment (sbatch passes it to the job)."""
        p = subprocess.run(["sbatch", "--parsable", *args], env={**self.env, **(env or {})}, cwd=cwd,
                           capture_output=True, text=True, timeout=60)
        if p.returncode != 0:
            raise SlurmError(f"sbatch {' '.join(args)} exited {p.returncode}: {p.stderr.strip()}")
        return int(p.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict ({} when Slurm no longer knows the job)."""
        out = self.cmd("scontrol", "show", "job", "-o", str(job_id), check=False)
        return parse_record(out) if out.startswith("JobId=") else {}

    def wait_job(self, job_id: int, cond: Callable[[dict[str, str]], bool], timeout: float, what: str,
                 on_timeout: Callable[[], str] = lambda: "") -> dict[str, str]:
        end = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < end:
            info = self.job(job_id)
            if info and cond(info):
                return info
            for name in self._procs:
                self._check_alive(name)
            time.sleep(0.5)
        raise SlurmError(f"job {job_id}: no {what} within {timeout:.0f} s; last state {info.get('JobState')} "
                         f"({info.get('Reason')})\n{on_timeout()}\n{self.daemon_logs()}")

    def wait_finished(self, job_id: int, timeout: float, on_timeout: Callable[[], str] = lambda: "") -> dict[str, str]:
        return self.wait_job(job_id, lambda i: i.get("JobState") in TERMINAL, timeout, "end", on_timeout)

    def release(self, job_id: int) -> None:
        """Start a requeued job now. Slurm holds a requeued job for about two minutes
        (Reason=BeginTime) so that the nodes forget its old, revoked credential; the
        credential times have one-second resolution, so wait two seconds first. The controller
        may show the hold (or not yet) a moment after the requeue, so the release is repeated
        while the job still waits for its begin time 3 s after it. A job that has left PENDING
        before then was released: it is not waited for."""
        for _ in range(5):
            time.sleep(2.0)
            self.cmd("scontrol", "update", f"JobId={job_id}", "StartTime=now")
            end = time.monotonic() + 3.0
            while True:
                time.sleep(0.25)
                info = self.job(job_id)
                if info.get("JobState") != "PENDING":
                    return
                if time.monotonic() >= end:
                    break
            if info.get("Reason") != "BeginTime":
                return
        raise SlurmError(f"job {job_id} still held for its begin time after 5 releases:\n{self.daemon_logs()}")

    # ----------------------------------------------------------------- teardown

    def _ours(self) -> list[int]:
        """Pids of processes (other than this one) whose environment carries our marker."""
        needle = f"{MARKER}={self.root}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                env = (entry / "environ").read_bytes()
            except OSError:
                continue
            if needle in env.split(b"\0"):
                found.append(int(entry.name))
        return found

    def stop(self) -> None:
        """Cancel every job, stop the daemons, kill what is left; raise if anything was left."""
        try:
            if self._procs.get("slurmctld") and self._procs["slurmctld"].poll() is None:
                ids = self.cmd("squeue", "-h", "-o", "%i", check=False).split()
                for job_id in ids:
                    self.cmd("scancel", job_id, check=False)
                end = time.monotonic() + 40
                while ids and time.monotonic() < end and self.cmd("squeue", "-h", "-o", "%i", check=False).split():
                    time.sleep(0.5)
        except (subprocess.SubprocessError, OSError):
            pass
        # slurmd first (they report to slurmctld), munged last (everyone authenticates through it).
        order = [n for n in self._procs if n.startswith("slurmd")] + ["slurmctld", "munged"]
        for name in order:
            proc = self._procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        left = []
        for pid in self._ours():
            with contextlib.suppress(OSError):
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                left.append(f"{pid} {cmdline}")
                os.kill(pid, signal.SIGKILL)
        if left:
            raise SlurmError("processes of the test cluster were still running after it stopped (killed now):\n"
                             + "\n".join(left))


@contextlib.contextmanager
def slurm_cluster(root: Optional[Path] = None, **kwargs) -> Iterator[SlurmCluster]:
    """A started cluster; stopped and its folder removed afterwards, also when the body fails.

    ``root`` should be short: Unix socket paths under it are limited to 107 bytes.
    """
    why = missing_requirements()
    if why:
        raise SlurmError(why)
    owned = root is None
    root = Path(tempfile.mkdtemp(prefix="vlbert-slurm-")) if owned else Path(root)
    cluster = SlurmCluster(root, **kwargs)
    try:
        cluster.start()
        yield cluster
    finally:
        try:
            cluster.stop()
        finally:
            if owned:
                shutil.rmtree(root, ignore_errors=True)
