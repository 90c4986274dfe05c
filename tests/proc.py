"""Which processes are the gunicorn workers of a gateway under test (memory and CPU: benchmarks.procfs)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psutil


def worker_pids(url: str) -> set[int]:
    """The gunicorn workers serving `url`: of the processes holding its listening socket, the children.

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
    return {pid for pid, parent in parents.items() if parent in parents}


def worker_pid(url: str) -> int:
    """The one gunicorn worker serving `url`."""
    workers = worker_pids(url)
    assert len(workers) == 1, f"expected one gunicorn worker for {url}, found {workers}"
    return workers.pop()


def worker_answering(response: httpx.Response, workers: Iterable[int]) -> int:
    """Which of `workers` holds the server end of the connection `response` came on (still open: keep-alive)."""
    client_port = response.extensions["network_stream"].get_extra_info("client_addr")[1]
    worker = workers_by_client_port(workers).get(client_port)
    assert worker is not None, f"no worker holds the connection from port {client_port}"
    return worker


def workers_by_client_port(workers: Iterable[int]) -> dict[int, int]:
    """The worker holding each open connection, by the client's port."""
    return {
        conn.raddr.port: pid
        for pid in workers
        for conn in psutil.Process(pid).net_connections("tcp")
        if conn.raddr and conn.status == psutil.CONN_ESTABLISHED
    }
