"""What /proc tells about a gateway process under test: which pid is the worker, and its memory."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit


def worker_pid(url: str) -> int:
    """The pid of the gunicorn worker serving `url`: of the processes holding its listening socket, the child.

    (gunicorn retitles its processes, so their command lines do not say which port they serve.)
    """
    port = f"{urlsplit(url).port:04X}"
    inodes = {
        fields[9]
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
        if (fields := line.split())[1].endswith(f":{port}") and fields[3] == "0A"  # 0A: LISTEN
    }
    parents: dict[int, int] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            targets = {os.readlink(fd) for fd in (proc / "fd").iterdir()}
            if any(f"socket:[{inode}]" in targets for inode in inodes):
                parents[int(proc.name)] = int((proc / "status").read_text().split("PPid:")[1].split()[0])
        except OSError:
            continue
    workers = [pid for pid, parent in parents.items() if parent in parents]
    assert len(workers) == 1, f"expected one gunicorn worker for {url}, found {workers}"
    return workers[0]


def memory_kb(pid: int, field: str = "VmRSS") -> int:
    """A memory figure of `pid` from /proc/<pid>/status (VmRSS, VmHWM: the peak, ...), in KB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for pid {pid}")
