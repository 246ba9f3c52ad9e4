"""Processes and what Linux says about them: CPU and RSS sampling, pinning, limits.

Readings come from ``/proc`` (proc(5)): a process's CPU seconds
(``/proc/PID/stat``, utime + stime) and resident memory
(``/proc/PID/status``, VmRSS), and the whole machine's CPU seconds per
core (``/proc/stat``). Also the plumbing every process of a run needs:
one file descriptor per connection, and no process left behind when the
load test dies.
"""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
from pathlib import Path


def cpu_list(text: str | None) -> list[int] | None:
    """``"0,2-3"`` -> ``[0, 2, 3]``; None for no pinning."""
    if not text:
        return None
    cpus: list[int] = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        cpus += range(int(low), int(high or low) + 1)
    return cpus


def read_rss_kib(pid: int) -> int | None:
    """The process's resident set size in KiB; None if it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    found = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    return int(found.group(1)) if found else None


def read_cpu_seconds(pid: int) -> float | None:
    """CPU seconds (user + system) the process has used; None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def listening_pid(port: int) -> int | None:
    """The pid of the process listening on TCP ``port`` (any address), from
    Linux's /proc: the socket's inode in /proc/net/tcp{,6}, then the
    process holding it among those this user may read. None if none."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # local_address is HEX-IP:HEX-PORT; state 0A is LISTEN.
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return None
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd) in inodes:
                    return int(proc.name)
        except OSError:
            continue  # gone, or another user's
    return None


def read_host_seconds() -> tuple[float, float, list[float]]:
    """CPU seconds since boot (/proc/stat): all cores running processes, all
    cores in interrupts (mostly loopback packets: the load itself), and each
    core busy at all (a pinned server's core at 100% is saturated)."""
    tick = os.sysconf("SC_CLK_TCK")
    lines = Path("/proc/stat").read_text().splitlines()
    total = [int(x) for x in lines[0].split()[1:]]
    per_cpu = []
    for line in lines[1:]:
        if not line.startswith("cpu"):
            break
        f = [int(x) for x in line.split()[1:]]
        per_cpu.append((f[0] + f[1] + f[2] + f[5] + f[6]) / tick)
    return (total[0] + total[1] + total[2]) / tick, (total[5] + total[6]) / tick, per_cpu


def raise_fd_limit() -> int:
    """Lift the soft file-descriptor limit to the hard one (one per connection)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def stop_process(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM (a server's clean shutdown), then SIGKILL after ``grace`` s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def die_with_parent(sig: int) -> None:
    """Linux: have the kernel send ``sig`` to this process when its parent dies,
    so a killed load test leaves no server or worker behind (prctl(2))."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, int(sig))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def spawned_server_setup() -> None:
    """preexec_fn of a spawned server: one fd per connection; die with us."""
    raise_fd_limit()
    die_with_parent(signal.SIGTERM)
