"""The fake scheduler commands: PBS's qstat, qselect and pbsnodes, Slurm's squeue, sacct and sinfo.

Each executable next to this module (`fakes/scheduler/qstat`, ...) calls `main` with its own name. They read
the scenario named by FAKE_SCHEDULER_STATE on every call and behave like the real commands at their interface:
the same JSON, the options the real command takes for it (refusing what it refuses, e.g. `qstat -u` with
`-F json`), their error messages on stderr and their exit statuses when the scenario says the command is down.

A scenario's `samples` replace the rendering with a real-format file:
    qstat     the server's jobs as `qstat -x -f -t -F json` lists them all; qstat and qselect filter them
    pbsnodes  the output of `pbsnodes -a -F json`
    squeue, sinfo  their `--json` output, printed as it is (they ignore filters in JSON)
    sacct     a `sacct --json` output; its jobs are filtered by --user and --starttime like sacct's own
"""

from __future__ import annotations

import getopt
import json
import os
import re
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from fakes.scheduler import pbs, slurm
from fakes.scheduler.scenario import STATE_VARIABLE, Scenario

DOWN = {
    # What the real command prints, and its exit status, when it cannot reach its server.
    "qstat": ("qstat: cannot connect to server {server} (errno=15010)", 255),  # exit(-1)
    "qselect": ("qselect: cannot connect to server {server} (errno=15010)", 162),  # exit(pbs_errno) & 0xff
    "pbsnodes": ("pbsnodes: cannot connect to server {server}, error=15010", 1),
    "squeue": ("slurm_load_jobs error: Unable to contact slurm controller (connect failure)", 1),
    "sacct": ("sacct: error: Problem talking to the database: Connection refused", 1),
    "sinfo": ("slurm_load_partitions: Unable to contact slurm controller (connect failure)", 1),
}
QSTAT_USAGE = """usage:
qstat [-f] [-J] [-p] [-t] [-x] [-E] [-F format | -w] [-D delim] [ job_identifier... | destination... ]
qstat [-a|-i|-r|-H|-T] [-J] [-t] [-u user] [-n] [-s] [-G|-M] [-1] [-w]
\t[ job_identifier... | destination... ]
qstat -Q [-f] [-F format] [-D delim] [ destination... ]
qstat -q [-G|-M] [ destination... ]
qstat -B [-f] [-F format] [-D delim] [ server_name... ]
qstat --version
"""
# qstat's alternate-format options: any of them with -F json is "conflicting options" (qstat.c).
QSTAT_ALTERNATE = {"-a", "-i", "-r", "-H", "-T", "-u", "-n", "-s", "-G", "-M", "-1", "-q"}


class Usage(Exception):
    """The command line is one the real command refuses, or one this fake does not implement."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


def _scenario() -> Scenario:
    path = os.environ.get(STATE_VARIABLE)
    if not path:
        raise Usage(f"the fake scheduler commands read their state from ${STATE_VARIABLE}, which is not set", 1)
    return Scenario.read(Path(path))


def _qstat(scenario: Scenario, arguments: list[str]) -> tuple[str, list[str], int]:
    try:
        options, operands = getopt.getopt(arguments, "ainpqrstwxu:fGHJMQEBW:T1F:D:")
    except getopt.GetoptError as exc:
        raise Usage(f"qstat: {exc}\n{QSTAT_USAGE}") from None
    flags = {flag for flag, _ in options}
    formats = [value for flag, value in options if flag == "-F"]
    if formats and formats[-1].lower() not in ("json", "dsv", "default"):
        raise Usage(QSTAT_USAGE)
    if formats and flags & QSTAT_ALTERNATE:
        raise Usage(f"qstat: conflicting options.\n{QSTAT_USAGE}")
    if "-f" not in flags or [value.lower() for value in formats] != ["json"] or flags & {"-Q", "-B"}:
        raise Usage("fake qstat: only the full job format in JSON (-f -F json) is implemented", 2)
    output, messages, status = pbs.qstat(scenario, "-x" in flags, "-t" in flags, operands)
    return pbs.dumps(output), messages, status


def _qselect(scenario: Scenario, arguments: list[str]) -> tuple[str, list[str], int]:
    try:
        options, operands = getopt.getopt(arguments, "a:A:c:h:HJl:N:p:P:q:r:s:t:Tu:x")
    except getopt.GetoptError as exc:
        raise Usage(f"qselect: {exc}") from None
    history, states, users = False, None, []
    times: list[tuple[str, str, float]] = []
    for flag, value in options:
        if flag == "-x":
            history = True
        elif flag == "-H":
            history, states = True, "FM"
        elif flag == "-s":
            states = value
        elif flag == "-u":
            users = [user.split("@", 1)[0] for user in value.split(",")]
        elif flag == "-t":
            match = re.fullmatch(r"([acemqs])(?:\.(eq|ne|ge|gt|le|lt)\.)?(\d+(?:\.\d\d)?)", value)
            try:
                if match is None:
                    raise ValueError(value)
                times.append((match.group(1), match.group(2) or "eq", pbs.parse_datetime(match.group(3))))
            except ValueError:
                raise Usage("qselect: illegal -t value\nusage: qselect [-t time_option[.op.]datetime] ...") from None
        else:
            raise Usage(f"fake qselect: {flag} is not implemented", 2)
    if operands:
        raise Usage("fake qselect: destinations are not implemented", 2)
    selected = pbs.qselect(scenario, history, states, users, times)
    return "".join(f"{job_id}\n" for job_id in selected), [], 0


def _pbsnodes(scenario: Scenario, arguments: list[str]) -> tuple[str, list[str], int]:
    try:
        options, _ = getopt.getopt(arguments, "aF:v")
    except getopt.GetoptError as exc:
        raise Usage(f"pbsnodes: {exc}") from None
    if ("-a", "") not in options or ("-F", "json") not in options:
        raise Usage("fake pbsnodes: only -a -F json is implemented", 2)
    return pbs.dumps(pbs.pbsnodes(scenario)), [], 0


def _slurm_options(command: str, arguments: list[str], names: list[str]) -> dict[str, str]:
    """Long options as Slurm's commands take them (--name value, --name=value), and their short forms."""
    short = {"-u": "--user", "-S": "--starttime"}
    found: dict[str, str] = {}
    index = 0
    while index < len(arguments):
        argument = short.get(arguments[index], arguments[index])
        name, equals, value = argument.partition("=")
        if name not in names:
            raise Usage(f"fake {command}: {arguments[index]} is not implemented (only {', '.join(names)})", 2)
        if name != "--json" and not equals:
            index += 1
            if index == len(arguments):
                raise Usage(f"{command}: option '{name}' requires an argument", 1)
            value = arguments[index]
        found[name] = value
        index += 1
    if "--json" not in found:
        raise Usage(f"fake {command}: only --json output is implemented", 2)
    return found


def _since(value: str) -> float:
    """sacct's --starttime: now[{+|-}count[seconds|minutes|hours|days|weeks]] or YYYY-MM-DD[THH:MM[:SS]]."""
    relative = re.fullmatch(r"now(?:([+-])(\d+)(seconds|minutes|hours|days|weeks)?)?", value)
    if relative:
        units = {"seconds": 1, "minutes": 60, "hours": 3600, "days": 86400, "weeks": 604800}
        offset = int(relative.group(2) or 0) * units[relative.group(3) or "seconds"]
        return time.time() + (-offset if relative.group(1) == "-" else offset)
    for layout in ("%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%d"):
        try:
            return datetime.strptime(value, layout).timestamp()
        except ValueError:
            continue
    raise Usage(f"sacct: error: Invalid time specification (pos=0): {value}", 1)


def _squeue(scenario: Scenario, arguments: list[str]) -> tuple[str, list[str], int]:
    _slurm_options("squeue", arguments, ["--json"])
    recorded = slurm.sample(scenario, "squeue")
    output = recorded if recorded is not None else slurm.Render(scenario).squeue(["squeue", *arguments])
    return json.dumps(output, indent=2), [], 0


def _sacct(scenario: Scenario, arguments: list[str]) -> tuple[str, list[str], int]:
    options = _slurm_options("sacct", arguments, ["--json", "--user", "--starttime"])
    # Without --starttime sacct starts at midnight today (its DEFAULT TIME WINDOW).
    since = _since(options["--starttime"]) if "--starttime" in options else _since(time.strftime("%Y-%m-%d"))
    user = options.get("--user")
    recorded = slurm.sample(scenario, "sacct")
    if recorded is None:
        output = slurm.Render(scenario).sacct(["sacct", *arguments], user, since)
    else:
        jobs = [
            job
            for job in (recorded.get("jobs", []) if isinstance(recorded, dict) else [])
            if (user is None or job.get("user") == user)
            and (not _end(job) or _end(job) >= since)  # still running or pending, or ended since
        ]
        output = {**recorded, "jobs": jobs}
    return json.dumps(output, indent=2), [], 0


def _end(job: dict[str, Any]) -> float:
    end = job.get("time", {}).get("end", 0)
    return float(end.get("number", 0) if isinstance(end, dict) else end)


def _sinfo(scenario: Scenario, arguments: list[str]) -> tuple[str, list[str], int]:
    _slurm_options("sinfo", arguments, ["--json"])
    recorded = slurm.sample(scenario, "sinfo")
    output = recorded if recorded is not None else slurm.Render(scenario).sinfo(["sinfo", *arguments])
    return json.dumps(output, indent=2), [], 0


COMMANDS = {
    "qstat": _qstat,
    "qselect": _qselect,
    "pbsnodes": _pbsnodes,
    "squeue": _squeue,
    "sacct": _sacct,
    "sinfo": _sinfo,
}


def main(command: str, arguments: list[str]) -> int:
    """Run one fake command: print what the real one prints, return its exit status."""
    try:
        scenario = _scenario()
        fault = scenario.faults.get(command)
        if fault == "down":
            message, status = DOWN[command]
            print(message.format(server=scenario.server), file=sys.stderr)
            return status
        if fault == "hang":  # e.g. a server that accepts the connection and never answers
            while True:
                time.sleep(60)
        output, messages, status = COMMANDS[command](scenario, arguments)
    except Usage as exc:
        print(str(exc).rstrip("\n"), file=sys.stderr)
        return exc.status
    if fault == "garbage":  # cut short, as when the command is killed mid-write
        output = output[: max(len(output) // 3, 1)]
    sys.stdout.write(output if output.endswith("\n") or not output else output + "\n")
    for message in messages:
        print(message, file=sys.stderr)
    return status
