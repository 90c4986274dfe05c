"""Readings of other processes from /proc: CPU time, memory, children. Linux only, like the deployment."""

from __future__ import annotations

import os
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of every thread of `pid` so far."""
    data = Path(f"/proc/{pid}/stat").read_bytes()
    # The command name may contain spaces and parentheses: the fields start after the last ')'.
    fields = data[data.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def memory_kb(pid: int, field: str = "VmRSS") -> int:
    """A memory figure of `pid` in KiB: VmRSS (resident now) or VmHWM (peak resident)."""
    prefix = field.encode() + b":"
    for line in Path(f"/proc/{pid}/status").read_bytes().splitlines():
        if line.startswith(prefix):
            return int(line.split()[1])
    raise LookupError(f"{field} not in /proc/{pid}/status")


def children(pid: int) -> list[int]:
    """Process ids whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            data = (entry / "stat").read_bytes()
        except OSError:  # the process ended while we looked
            continue
        if int(data[data.rindex(b")") + 2 :].split()[1]) == pid:
            found.append(int(entry.name))
    return found
