"""The task that runs on a cluster's login node: the gateway service account's batch jobs, read from the scheduler.

`scheduler_jobs` is registered with Globus Compute like `inference` (see `compute_functions/__init__.py`): only
its source text travels and is `exec`-ed alone on the endpoint, so everything it needs lives in its body, with
standard-library imports only, and its annotations evaluate with builtins and the `typing` module it imports.

It runs as the service account, on the Globus Compute endpoint an admin sets up on the cluster's login node,
and reads the scheduler with the scheduler's own commands (each with a timeout):

    PBS Pro 2022+    qstat -f -t -F json                    every user's jobs and started subjobs (queue positions)
                     qselect -x -s F -u USER -t m.gt.TIME   the account's jobs finished since TIME
                     qstat -x -f -F json ID...              those finished jobs
                     pbsnodes -a -F json                    free nodes
    Slurm 23.02+     squeue --json                          every user's jobs (queue positions)
                     sacct --json --user USER --starttime now-Nseconds    the account's jobs since then
                     sinfo --json                           idle nodes

Why qselect for PBS's finished jobs: `-u` is one of qstat's alternate-format options, which qstat refuses
together with `-F json` ("qstat: conflicting options"), and qstat has no time filter; qselect selects by
owner, state and modification time, and qstat then reads those jobs in full.

The result is `resource_server/status/jobs.py`'s `ClusterJobs`, as a dict (the gateway validates it with that
model); its shape is documented on `scheduler_jobs`.
"""

from typing import Any


def scheduler_jobs(task: "dict[str, Any]") -> "dict[str, Any]":
    """Read the batch scheduler on this login node and return the service account's jobs as data.

    task:
        scheduler         "pbs" or "slurm"
        user              whose jobs to return; default: the account running this function
        finished_seconds  how far back finished jobs are reported (default 3600)
        commands_dir      optional absolute directory put first on PATH to find the scheduler's commands
                          (an admin's setting, for sites whose commands are not on the endpoint's PATH)
        command_timeout   seconds each command may take (default 30)

    Result (ClusterJobs):
        {"scheduler", "user", "collected_at": epoch seconds, "free_nodes": int | None,
         "errors": [messages of the secondary commands that failed: the result is partial],
         "jobs": [{"id", "name", "user", "queue", "state": queued|held|running|exiting|finished|other,
                   "scheduler_state": the scheduler's own code ("Q", "PENDING", "COMPLETED,COMPLETING"),
                   "array_parent", "array_index", "submitted_at", "started_at", "estimated_start_at",
                   "walltime_seconds", "ends_at", "nodes", "hosts": [...], "comment", "exit_status",
                   "queue_position"}]}
        Times are epoch seconds, converted here: PBS prints them in this node's local time. `ends_at` is when a
        running job must end (start + walltime, or the scheduler's own end time) and when a finished one ended.
        `queue_position` is 1-based among the queued (not held) jobs of every user in the job's queue
        (partition): Slurm orders them by priority, highest first, then submit time; PBS by the scheduler's
        estimated start time where it has one, then by the time each job entered the queue (qtime), the order
        `qstat -T` shows. PBS's scheduler can still start a later job first (backfill): an approximation.
        An array counts once while none of its parts started: its pending remainder (the PBS array job,
        Slurm's `1234_[2-9]` record).

    The main listing (qstat, squeue) failing, timing out or printing garbage raises RuntimeError: the task
    fails and the gateway keeps its last known jobs. Finished jobs and free nodes failing leave a message in
    `errors` and the rest of the result.
    """
    import json
    import os
    import pwd
    import re
    import shutil
    import signal
    import subprocess
    import time
    import typing

    now = time.time()
    states = ("queued", "held", "running", "exiting", "finished", "other")

    class CommandFailed(Exception):
        """A scheduler command could not answer; the message says which and why (caught in this function)."""

    # --- the task --------------------------------------------------------------------------------------------

    scheduler = task.get("scheduler")
    if scheduler not in ("pbs", "slurm"):
        raise ValueError(f"task.scheduler must be 'pbs' or 'slurm', not {scheduler!r}.")
    finished_seconds = task.get("finished_seconds", 3600)
    if isinstance(finished_seconds, bool) or not isinstance(finished_seconds, int) or finished_seconds < 0:
        raise ValueError(f"task.finished_seconds must be a whole number of seconds >= 0, not {finished_seconds!r}.")
    timeout = task.get("command_timeout", 30)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ValueError(f"task.command_timeout must be a number of seconds > 0, not {timeout!r}.")
    commands_dir = task.get("commands_dir")
    if commands_dir is not None and (
        not isinstance(commands_dir, str) or not os.path.isabs(commands_dir) or not os.path.isdir(commands_dir)
    ):
        raise ValueError(f"task.commands_dir must be an absolute path to a directory here, not {commands_dir!r}.")
    user = task.get("user")
    if user is None:
        try:
            user = pwd.getpwuid(os.getuid()).pw_name
        except KeyError:  # a uid without a passwd entry (some containers): the login environment names it
            user = os.environ.get("USER") or os.environ.get("LOGNAME")
    if not isinstance(user, str) or not user:
        raise ValueError(f"task.user must be a user name, not {user!r}.")

    search_path = os.environ.get("PATH", os.defpath)
    if commands_dir:
        search_path = commands_dir + os.pathsep + search_path
    environment = {**os.environ, "PATH": search_path}
    errors: list[str] = []

    # --- running the commands --------------------------------------------------------------------------------

    def run(arguments: list[str]) -> str:
        shown = " ".join(arguments)
        executable = shutil.which(arguments[0], path=search_path)
        if executable is None:
            raise CommandFailed(f"`{arguments[0]}` was not found on PATH ({search_path}).")
        try:
            # Its own session, so that a timeout ends whatever the command started too (they hold the pipes).
            process = subprocess.Popen(  # noqa: S603 (a fixed scheduler command and our arguments, no shell)
                [executable, *arguments[1:]],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=environment,
                start_new_session=True,
            )
        except OSError as exc:
            raise CommandFailed(f"`{shown}` could not be started: {exc}.") from None
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise CommandFailed(f"`{shown}` did not answer within {timeout:g} s.") from None
        if process.returncode != 0:
            message = " ".join(err.decode(errors="replace").split())[-500:] or "no message"
            raise CommandFailed(f"`{shown}` exited with status {process.returncode}: {message}")
        return out.decode(errors="replace")

    def run_json(arguments: list[str], expected: str) -> dict[str, typing.Any]:
        """The command's JSON object, which must hold `expected` (or, for qstat, its prologue)."""
        shown = " ".join(arguments)
        output = run(arguments)
        try:
            data = json.loads(output)
        except ValueError as exc:
            raise CommandFailed(f"`{shown}` printed invalid JSON ({exc}): {output[:120]!r}") from None
        # PBS leaves "Jobs" (or "nodes") out when there are none; its prologue is always there.
        if not isinstance(data, dict) or (expected not in data and "pbs_version" not in data):
            raise CommandFailed(f"`{shown}` printed JSON without {expected!r}: {output[:120]!r}")
        # Slurm reports problems inside its JSON too (data_parser's "errors"), with or without a result.
        for problem in data.get("errors") or []:
            if isinstance(problem, dict):
                detail = problem.get("description") or problem.get("error") or problem
                errors.append(f"{arguments[0]}: {detail}")
        return data

    # --- reading values --------------------------------------------------------------------------------------

    def number(value: object) -> float | None:
        """A number as Slurm or PBS print it; Slurm's data_parser (v0.0.39+) wraps most of them as
        {"set": bool, "infinite": bool, "number": N}, an unset or infinite one meaning: none."""
        if isinstance(value, dict):
            if not value.get("set") or value.get("infinite"):
                return None
            value = value.get("number")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        return value

    def whole(value: object) -> int | None:
        found = number(value)
        return None if found is None else int(found)

    def epoch(value: object) -> float | None:
        """A Slurm timestamp: plain (v0.0.39 squeue) or wrapped; 0 means not set."""
        found = number(value)
        return float(found) if found else None

    def text(value: object) -> str | None:
        return value if isinstance(value, str) and value else None

    def mapping(value: object) -> dict[str, typing.Any]:
        return value if isinstance(value, dict) else {}

    months = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

    def pbs_time(value: object) -> float | None:
        """qstat prints times with ctime(3), in its own (this node's) time zone: "Sat Dec  3 20:25:38 2022".
        Read by hand: strptime's month names follow the locale, ctime's are always English."""
        parts = value.split() if isinstance(value, str) else []
        if len(parts) != 5 or parts[1] not in months:  # e.g. estimated.start_time "UNKNOWN"
            return None
        try:
            hour, minute, second = (int(part) for part in parts[3].split(":"))
            local = (int(parts[4]), months.index(parts[1]) + 1, int(parts[2]), hour, minute, second, 0, 0, -1)
            return time.mktime(local)  # tm_isdst -1: the zone's rules say whether summer time applied
        except (ValueError, OverflowError):
            return None

    def pbs_duration(value: object) -> int | None:
        """A PBS duration: [[hours:]minutes:]seconds, or a plain number that qstat's JSON printed as one."""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return int(value)
        if not isinstance(value, str) or not value or value.count(":") > 2:
            return None
        seconds = 0.0
        try:
            for part in value.split(":"):
                seconds = seconds * 60 + float(part)
        except ValueError:
            return None
        return int(seconds)

    def expand_hosts(expression: str) -> list[str]:
        """Slurm's host list expression ("gpu[012-013],login1") as names; brackets may repeat in a name."""
        names: list[str] = []
        for item in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", expression):
            bracket = re.search(r"\[([^\]]*)\]", item)
            if bracket is None:
                names.append(item)
                continue
            values: list[str] = []
            for part in bracket.group(1).split(","):
                low, _, high = part.partition("-")
                if high and low.isdigit() and high.isdigit() and int(high) - int(low) < 100_000:
                    values.extend(f"{index:0{len(low)}d}" for index in range(int(low), int(high) + 1))
                else:
                    values.append(part)
            for value in values:
                names.extend(expand_hosts(item[: bracket.start()] + value + item[bracket.end() :]))
        return names

    def unique(names: list[str]) -> list[str]:
        return list(dict.fromkeys(name for name in names if name))

    def job_record(**fields: typing.Any) -> dict[str, typing.Any]:
        """A Job of jobs.py, every field present; `order` is kept aside for queue positions."""
        return {
            "id": fields["id"],
            "name": fields.get("name") or "",
            "user": fields.get("user") or "",
            "queue": fields.get("queue") or "",
            "state": fields["state"],
            "scheduler_state": fields["scheduler_state"],
            "array_parent": fields.get("array_parent"),
            "array_index": fields.get("array_index"),
            "submitted_at": fields.get("submitted_at"),
            "started_at": fields.get("started_at"),
            "estimated_start_at": fields.get("estimated_start_at"),
            "walltime_seconds": fields.get("walltime_seconds"),
            "ends_at": fields.get("ends_at"),
            "nodes": fields.get("nodes"),
            "hosts": fields.get("hosts") or [],
            "comment": fields.get("comment"),
            "exit_status": fields.get("exit_status"),
            "queue_position": None,
            "_order": fields.get("order"),
        }

    def assign_positions(jobs: list[dict[str, typing.Any]]) -> None:
        queues: dict[str, list[dict[str, typing.Any]]] = {}
        for job in jobs:
            if job["state"] == "queued" and job["_order"] is not None:
                queues.setdefault(job["queue"], []).append(job)
        for waiting in queues.values():
            waiting.sort(key=lambda job: job["_order"])
            for position, job in enumerate(waiting, start=1):
                job["queue_position"] = position

    # --- PBS -------------------------------------------------------------------------------------------------

    pbs_states = {
        "Q": "queued",
        "H": "held",
        "W": "held",  # waiting for its Execution_Time
        "R": "running",
        "B": "running",  # an array job with at least one subjob started
        "E": "exiting",
        "F": "finished",
        "X": "finished",  # a subjob that ended (or was deleted)
    }

    def pbs_job(job_id: str, raw: dict[str, typing.Any]) -> dict[str, typing.Any]:
        code = text(raw.get("job_state")) or ""
        state = pbs_states.get(code, "other")  # S, U suspended; T, M moved or moving
        resources = mapping(raw.get("Resource_List"))
        walltime = pbs_duration(resources.get("walltime"))
        ran = state in ("running", "exiting", "finished") or code in ("S", "U")  # suspended on its nodes
        started = pbs_time(raw.get("stime")) if ran else None
        if state == "finished":
            ends = pbs_time(raw.get("obittime")) or pbs_time(raw.get("mtime"))
        else:
            ends = started + walltime if started is not None and walltime is not None else None
        estimated = None
        if code == "Q":
            estimated = pbs_time(mapping(raw.get("estimated")).get("start_time"))
        elif code == "W":
            estimated = pbs_time(raw.get("Execution_Time"))
        queued_at = pbs_time(raw.get("qtime"))
        sequence = job_id.split(".", 1)[0].split("[", 1)[0]
        hosts = [part.split("/", 1)[0] for part in (text(raw.get("exec_host")) or "").split("+")] if ran else []
        return job_record(
            id=job_id,
            name=text(raw.get("Job_Name")),
            user=(text(raw.get("Job_Owner")) or "").split("@", 1)[0],
            queue=text(raw.get("queue")),
            state=state,
            scheduler_state=code,
            array_parent=text(raw.get("array_id")),
            array_index=whole(raw.get("array_index")),
            submitted_at=pbs_time(raw.get("ctime")),
            started_at=started,
            estimated_start_at=estimated,
            walltime_seconds=walltime,
            ends_at=ends,
            nodes=whole(resources.get("nodect")),
            hosts=unique(hosts),
            comment=text(raw.get("comment")),
            exit_status=whole(raw.get("Exit_status")),
            # qstat -T's order: estimated start times first, earliest first; then the rest by queue time.
            order=(
                estimated is None,
                estimated or 0.0,
                queued_at if queued_at is not None else float("inf"),
                int(sequence) if sequence.isdigit() else 0,
                job_id,
            ),
        )

    def pbs_jobs(data: dict[str, typing.Any], shown: str) -> list[dict[str, typing.Any]]:
        listed = data.get("Jobs", {})
        if not isinstance(listed, dict):
            raise CommandFailed(f"`{shown}` printed 'Jobs' that is not an object.")
        return [pbs_job(job_id, raw) for job_id, raw in listed.items() if isinstance(raw, dict)]

    def read_pbs() -> tuple[list[dict[str, typing.Any]], int | None]:
        listing = ["qstat", "-f", "-t", "-F", "json"]
        every = pbs_jobs(run_json(listing, "Jobs"), " ".join(listing))
        assign_positions(every)
        jobs = [job for job in every if job["user"] == user]

        try:
            since = time.strftime("%Y%m%d%H%M.%S", time.localtime(now - finished_seconds))
            selected = run(["qselect", "-x", "-s", "F", "-u", user, "-t", f"m.gt.{since}"]).split()
            for start in range(0, len(selected), 100):  # bounded command lines
                history = ["qstat", "-x", "-f", "-F", "json", *selected[start : start + 100]]
                jobs += [job for job in pbs_jobs(run_json(history, "Jobs"), " ".join(history)) if job["user"] == user]
        except CommandFailed as exc:
            errors.append(f"finished jobs unknown: {exc}")

        free = None
        try:
            nodes = run_json(["pbsnodes", "-a", "-F", "json"], "nodes").get("nodes", {})
            if not isinstance(nodes, dict):
                raise CommandFailed("`pbsnodes -a -F json` printed 'nodes' that is not an object.")
            free = sum(1 for node in nodes.values() if isinstance(node, dict) and node.get("state") == "free")
        except CommandFailed as exc:
            errors.append(f"free nodes unknown: {exc}")
        return jobs, free

    # --- Slurm -----------------------------------------------------------------------------------------------

    finished_words = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL"}
    finished_words |= {"DEADLINE", "OUT_OF_MEMORY"}
    held_reasons = {"JobHeldUser", "JobHeldAdmin", "BeginTime", "Dependency", "DependencyNeverSatisfied"}
    # Nodes that are idle but cannot take a job now.
    unavailable = {"DRAIN", "MAINTENANCE", "RESERVED", "NOT_RESPONDING", "FAIL", "REBOOT_REQUESTED", "PLANNED"}
    unavailable |= {"REBOOT_ISSUED", "POWERED_DOWN", "POWERING_DOWN", "POWER_DOWN", "POWERING_UP", "INVALID_REG"}

    def slurm_words(value: object) -> list[str]:
        """A state: a list of base state and flags (v0.0.40+) or one word (v0.0.39: the flag, if any)."""
        if isinstance(value, str):
            return [value]
        return [word for word in value if isinstance(word, str)] if isinstance(value, list) else []

    def slurm_state(words: list[str], hold: bool, reason: str | None) -> str:
        if {"COMPLETING", "STAGE_OUT"} & set(words):
            return "exiting"
        if {"REQUEUE_HOLD", "SPECIAL_EXIT", "RESV_DEL_HOLD"} & set(words):
            return "held"
        if {"PENDING", "REQUEUED"} & set(words):
            return "held" if hold or reason in held_reasons else "queued"
        if {"RUNNING", "CONFIGURING", "RESIZING", "SIGNALING"} & set(words):
            return "running"
        if finished_words & set(words):
            return "finished"
        return "other"  # SUSPENDED, STOPPED, ...

    def slurm_exit(value: object, words: list[str]) -> int | None:
        """The exit status; a signal as 128 + its number, like a shell's $?."""
        if isinstance(value, dict) and "status" in value:  # v0.0.40+ everywhere, v0.0.39 in sacct
            status = slurm_words(value["status"])
            sent = mapping(value.get("signal"))
            signal_number = whole(sent.get("id")) if "id" in sent else whole(sent.get("signal_id"))
            if "SIGNALED" in status and signal_number is not None:
                return 128 + signal_number
            code = whole(value.get("return_code"))
            # Slurm 23.02's sacct prints every normal exit as SUCCESS with 0: unknown for a job that failed.
            return None if code == 0 and "FAILED" in words else code
        raw = whole(value)  # v0.0.39 squeue: the wait status itself
        if raw is None:
            return None
        return 128 + (raw & 0x7F) if raw & 0x7F else raw >> 8

    def slurm_job(raw: dict[str, typing.Any], accounting: bool) -> dict[str, typing.Any]:
        """One job of `squeue --json`, or of `sacct --json` (accounting: its own layout)."""
        if accounting:
            words = slurm_words(mapping(raw.get("state")).get("current"))
            reason = text(mapping(raw.get("state")).get("reason"))
            array = mapping(raw.get("array"))
            array_job, task_id, task_string = whole(array.get("job_id")), whole(array.get("task_id")), array.get("task")
            times = mapping(raw.get("time"))
            submitted, started, ended = (
                epoch(times.get("submission")),
                epoch(times.get("start")),
                epoch(times.get("end")),
            )
            limit, nodes, user_name = whole(times.get("limit")), whole(raw.get("allocation_nodes")), raw.get("user")
            description = None
        else:
            words = slurm_words(raw.get("job_state"))
            reason, description = text(raw.get("state_reason")), text(raw.get("state_description"))
            array_job, task_id = whole(raw.get("array_job_id")), whole(raw.get("array_task_id"))
            task_string = raw.get("array_task_string")
            submitted, started, ended = (
                epoch(raw.get("submit_time")),
                epoch(raw.get("start_time")),
                epoch(raw.get("end_time")),
            )
            limit, nodes, user_name = whole(raw.get("time_limit")), whole(raw.get("node_count")), raw.get("user_name")
        state = slurm_state(words, raw.get("hold") is True, reason)
        job_id = str(whole(raw.get("job_id")))
        parent = index = None
        if array_job:
            parent = str(array_job)
            if task_id is not None:
                job_id, index = f"{array_job}_{task_id}", task_id
            elif text(task_string):
                job_id = f"{array_job}_[{task_string}]"  # the tasks still pending, as squeue shows them
        walltime = limit * 60 if limit is not None else None
        pending = state in ("queued", "held")
        ran = not pending and started is not None
        if state == "finished":
            ends = ended
        elif ran:
            ends = ended or (started + walltime if started is not None and walltime is not None else None)
        else:
            ends = None
        comment = reason if reason and reason != "None" else None
        if comment and description:
            comment = f"{comment}: {description}"
        priority = number(raw.get("priority")) or 0
        return job_record(
            id=job_id,
            name=text(raw.get("name")),
            user=text(user_name),
            queue=text(raw.get("partition")),
            state=state,
            scheduler_state=",".join(words),
            array_parent=parent,
            array_index=index,
            submitted_at=submitted,
            started_at=started if ran else None,
            estimated_start_at=started if pending else None,  # a pending job's start_time: the estimate
            walltime_seconds=walltime,
            ends_at=ends,
            nodes=nodes,
            hosts=unique(expand_hosts(text(raw.get("nodes")) or "")) if ran else [],
            comment=comment,
            exit_status=slurm_exit(raw.get("exit_code"), words) if state == "finished" else None,
            order=(-priority, submitted if submitted is not None else float("inf"), whole(raw.get("job_id")) or 0),
        )

    def slurm_list(data: dict[str, typing.Any], key: str, shown: str) -> list[dict[str, typing.Any]]:
        listed = data.get(key)
        if not isinstance(listed, list):
            raise CommandFailed(f"`{shown}` printed {key!r} that is not a list.")
        return [item for item in listed if isinstance(item, dict)]

    def read_slurm() -> tuple[list[dict[str, typing.Any]], int | None]:
        every = [slurm_job(raw, False) for raw in slurm_list(run_json(["squeue", "--json"], "jobs"), "jobs", "squeue")]
        assign_positions(every)
        jobs = [job for job in every if job["user"] == user]

        try:
            window = ["sacct", "--json", "--user", user, "--starttime", f"now-{finished_seconds}seconds"]
            accounted = [slurm_job(raw, True) for raw in slurm_list(run_json(window, "jobs"), "jobs", "sacct")]
            # Only the finished ones: the controller's own listing (squeue) is fresher for the others.
            jobs += [job for job in accounted if job["state"] == "finished" and job["user"] == user]
        except CommandFailed as exc:
            errors.append(f"finished jobs unknown: {exc}")

        free = None
        try:
            idle: set[str] = set()
            for record in slurm_list(run_json(["sinfo", "--json"], "sinfo"), "sinfo", "sinfo"):
                words = set(slurm_words(mapping(record.get("node")).get("state")))
                names = mapping(record.get("nodes")).get("nodes")
                if "IDLE" in words and not words & unavailable and isinstance(names, list):
                    idle.update(name for name in names if isinstance(name, str))  # a node in two partitions once
            free = len(idle)
        except CommandFailed as exc:
            errors.append(f"free nodes unknown: {exc}")
        return jobs, free

    # --- the result ------------------------------------------------------------------------------------------

    try:
        jobs, free_nodes = read_pbs() if scheduler == "pbs" else read_slurm()
    except CommandFailed as exc:
        # A builtin exception: it crosses process boundaries (Globus Compute, the local pool) as it is.
        raise RuntimeError(f"Cannot read the {scheduler} jobs: {exc}") from None

    seen: set[str] = set()
    result_jobs = []
    for job in jobs:
        job.pop("_order")
        too_old = job["state"] == "finished" and job["ends_at"] is not None and job["ends_at"] < now - finished_seconds
        if job["id"] in seen or too_old or job["state"] not in states:
            continue
        seen.add(job["id"])
        result_jobs.append(job)
    return {
        "scheduler": scheduler,
        "user": user,
        "collected_at": now,
        "jobs": result_jobs,
        "free_nodes": free_nodes,
        "errors": errors,
    }
