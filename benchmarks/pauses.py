"""python -m benchmarks.pauses [--seconds 60]: how often this machine pauses a process pinned to each core.

A stall in the streaming scenarios is a token more than twice the nominal interval late. Some come from
the machine, not from the process under test: a virtual CPU descheduled by the host, or interrupts. This
runs, on every core at once, a loop pinned to that core that only sleeps 1 ms at a time, and counts the
wake-ups that came more than 10, 20, 40 and 100 ms late. Run it on an otherwise idle machine: the loop
does nothing else, so whatever it finds is the machine pausing that core.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time

THRESHOLDS_MS = (10, 20, 40, 100)


def _watch(cpu: int, seconds: float, results: multiprocessing.Queue[tuple[int, dict[int, int], float]]) -> None:
    os.sched_setaffinity(0, {cpu})
    late = dict.fromkeys(THRESHOLDS_MS, 0)
    worst = 0.0
    end = time.monotonic() + seconds
    while (now := time.monotonic()) < end:
        time.sleep(0.001)
        lateness_ms = (time.monotonic() - now - 0.001) * 1000
        worst = max(worst, lateness_ms)
        for threshold in THRESHOLDS_MS:
            if lateness_ms > threshold:
                late[threshold] += 1
    results.put((cpu, late, worst))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pauses", description=__doc__.split("\n\n")[1])
    parser.add_argument("--seconds", type=float, default=60.0)
    options = parser.parse_args()
    results: multiprocessing.Queue[tuple[int, dict[int, int], float]] = multiprocessing.Queue()
    cpus = sorted(os.sched_getaffinity(0))
    watchers = [multiprocessing.Process(target=_watch, args=(cpu, options.seconds, results)) for cpu in cpus]
    for watcher in watchers:
        watcher.start()
    found = sorted(results.get() for _ in watchers)
    for watcher in watchers:
        watcher.join()
    print(f"pauses over {options.seconds:g} s of an idle 1 ms sleep loop, per core:")
    print("| CPU | " + " | ".join(f"> {ms} ms" for ms in THRESHOLDS_MS) + " | longest (ms) |")
    print("|---|" + "---|" * (len(THRESHOLDS_MS) + 1))
    for cpu, late, worst in found:
        print(f"| {cpu} | " + " | ".join(str(late[ms]) for ms in THRESHOLDS_MS) + f" | {worst:.1f} |")


if __name__ == "__main__":
    main()
