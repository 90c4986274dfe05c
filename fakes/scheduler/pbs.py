"""PBS Pro's side of the fake: a scenario rendered as the server holds it, and what qstat, qselect and
pbsnodes print from it (PBS Pro 2022 `-F json`: `doc/man1/qstat.1B`, `src/cmds/qstat.c` of OpenPBS).

The server's state is every job as `qstat -x -f -t -F json` would print it: jobs, array jobs, their started
subjobs, and finished jobs (history). Each command then filters it the way the real one does.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from fakes.scheduler.scenario import FakeJob, FakeNode, FakeTask, Scenario, index_ranges

PBS_VERSION = "2022.1.1.20220926110806"
CODES = {"queued": "Q", "held": "H", "waiting": "W", "running": "R", "exiting": "E", "finished": "F", "suspended": "S"}
SUBSTATES = {"Q": 10, "H": 20, "W": 30, "R": 42, "S": 43, "E": 50, "B": 70, "F": 92, "X": 92}
NODE_STATES = {"free": "free", "busy": "job-exclusive", "down": "down", "offline": "offline", "drain": "offline"}
CPUS_PER_NODE = 64
HISTORY_STATES = ("F", "M")  # shown only with -x
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def ctime(epoch: float) -> str:
    """As qstat prints times: ctime(3) in the local time zone, without its newline."""
    return time.ctime(epoch)


def parse_ctime(value: object) -> float | None:
    parts = value.split() if isinstance(value, str) else []
    if len(parts) != 5 or parts[1] not in MONTHS:
        return None
    hour, minute, second = (int(part) for part in parts[3].split(":"))
    return time.mktime((int(parts[4]), MONTHS.index(parts[1]) + 1, int(parts[2]), hour, minute, second, 0, 0, -1))


def duration(seconds: int) -> str:
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _common(job: FakeJob, scenario: Scenario, job_id: str) -> dict[str, Any]:
    """The attributes every job has, in the order qstat prints them."""
    number = job_id.split(".", 1)[0]
    return {
        "Job_Name": job.name,
        "Job_Owner": f"{job.user}@{scenario.submit_host}",
        "job_state": "Q",
        "queue": job.queue,
        "server": scenario.server,
        "Account_Name": "inference" if job.user.startswith("svc") else "users",
        "Checkpoint": "u",
        "ctime": ctime(job.submitted_at),
        "Error_Path": f"{scenario.submit_host}:/home/{job.user}/{job.name}.e{number}",
        "Hold_Types": "n",
        "Join_Path": "n",
        "Keep_Files": "n",
        "Mail_Points": "a",
        "mtime": ctime(job.submitted_at),
        "Output_Path": f"{scenario.submit_host}:/home/{job.user}/{job.name}.o{number}",
        "Priority": 0,
        "qtime": ctime(job.queued_at or job.submitted_at),
        "Rerunable": "False",
        "Resource_List": {
            "ncpus": CPUS_PER_NODE * job.nodes,
            "nodect": job.nodes,
            "place": "scatter",
            "select": f"{job.nodes}:ncpus={CPUS_PER_NODE}",
            "walltime": duration(job.walltime_seconds),
        },
        "substate": 10,
        "Variable_List": {
            "PBS_O_HOME": f"/home/{job.user}",
            "PBS_O_LOGNAME": job.user,
            "PBS_O_SHELL": "/bin/bash",
            "PBS_O_WORKDIR": f"/home/{job.user}",
            "PBS_O_SYSTEM": "Linux",
            "PBS_O_QUEUE": job.queue,
            "PBS_O_HOST": scenario.submit_host,
        },
        "etime": ctime(job.queued_at or job.submitted_at),
        "umask": 22,
        "eligible_time": "00:00:00",
        "Submit_arguments": f"-N {job.name} -q {job.queue} -l select={job.nodes} job.sh",
        "project": "inference" if job.user.startswith("svc") else "users",
        "Submit_Host": scenario.submit_host,
    }


def _ran(attributes: dict[str, Any], code: str, run: FakeJob | FakeTask, walltime: int) -> None:
    """What a job that started carries: where, since when, what it used, and how it ended."""
    started = run.started_at or time.time()
    hosts = run.hosts or ["node-unknown"]
    attributes["exec_host"] = "+".join(f"{host}/0*{CPUS_PER_NODE}" for host in hosts)
    attributes["exec_vnode"] = "+".join(f"({host}:ncpus={CPUS_PER_NODE})" for host in hosts)
    attributes["stime"] = ctime(started)
    attributes["mtime"] = ctime(started)
    attributes["session_id"] = 40000 + int(started) % 10000
    attributes["jobdir"] = attributes["Variable_List"]["PBS_O_HOME"]
    attributes["run_count"] = 1
    used = int(min((run.ended_at or time.time()) - started, walltime))
    attributes["resources_used"] = {
        "cpupercent": 0,
        "cput": "00:00:00",
        "mem": "0kb",
        "ncpus": CPUS_PER_NODE * len(hosts),
        "vmem": "0kb",
        "walltime": duration(max(used, 0)),
    }
    when = time.strftime("%a %b %d at %H:%M", time.localtime(started))
    vnodes = attributes["exec_vnode"]
    attributes["comment"] = f"Job run at {when} on {vnodes}"
    if code in ("F", "X"):
        ended = run.ended_at or time.time()
        attributes["obittime"] = ctime(ended)
        attributes["mtime"] = ctime(ended)
        attributes["Exit_status"] = run.exit_status if run.exit_status is not None else 0
        attributes["Stageout_status"] = 1
        if code == "F":  # a job's history record; a subjob's end is its parent's
            attributes["history_timestamp"] = int(ended)
        attributes["comment"] += " and finished" if attributes["Exit_status"] == 0 else " and failed"


def _job(job: FakeJob, scenario: Scenario) -> dict[str, dict[str, Any]]:
    """One scenario job as the server lists it: a job, or an array job and its started subjobs."""
    is_array = job.array_indices is not None
    job_id = f"{job.id}[].{scenario.server}" if is_array else f"{job.id}.{scenario.server}"
    attributes = _common(job, scenario, job_id)
    code = CODES[job.state]
    listed: dict[str, dict[str, Any]] = {job_id: attributes}
    if is_array:
        tasks = {task.index: task for task in job.tasks}
        counts = {"Queued": 0, "Running": 0, "Exiting": 0, "Expired": 0}
        for index in job.indices():
            task = tasks.get(index)
            task_code = CODES[task.state] if task else "Q"
            if task_code == "F":
                task_code = "X"
            counts[{"Q": "Queued", "R": "Running", "E": "Exiting", "X": "Expired"}.get(task_code, "Queued")] += 1
            if task is None or task_code == "Q":
                continue
            subjob = dict(_common(job, scenario, job_id), job_state=task_code, substate=SUBSTATES.get(task_code, 42))
            subjob["Resource_List"] = dict(attributes["Resource_List"])
            _ran(subjob, task_code, task, job.walltime_seconds)
            subjob["array_id"] = job_id
            subjob["array_index"] = index
            listed[f"{job.id}[{index}].{scenario.server}"] = subjob
        remaining = [index for index in job.indices() if index not in tasks or tasks[index].state == "queued"]
        if job.state in ("queued", "running") and counts["Queued"] < len(job.indices()):
            code = "B" if counts["Queued"] + counts["Running"] + counts["Exiting"] else "F"
        attributes["array"] = "True"
        attributes["array_state_count"] = " ".join(f"{name}:{count}" for name, count in counts.items()) + " "
        attributes["array_indices_submitted"] = job.array_indices
        if remaining:
            attributes["array_indices_remaining"] = index_ranges(remaining)
        began = [task.started_at for task in job.tasks if task.started_at is not None]
        if began:
            attributes["stime"] = ctime(min(began))
            attributes["comment"] = f"Job Array Began at {ctime(min(began))}"
    attributes["job_state"] = code
    attributes["substate"] = SUBSTATES.get(code, 10)
    if code in ("R", "E", "S") or (code == "F" and job.started_at is not None):
        _ran(attributes, code, job, job.walltime_seconds)
    elif code == "F":  # an array whose subjobs all ended, or a job deleted before it ran
        ends = [task.ended_at for task in job.tasks if task.ended_at is not None]
        ended = job.ended_at or (max(ends) if ends else time.time())
        attributes["mtime"] = ctime(ended)
        attributes["obittime"] = ctime(ended)
        if is_array:  # an array's: 0 when every subjob exited 0, else 1
            attributes["Exit_status"] = int(any(task.exit_status for task in job.tasks))
        else:
            attributes["Exit_status"] = job.exit_status if job.exit_status is not None else -3
        attributes["history_timestamp"] = int(ended)
    if code == "Q":
        attributes["comment"] = "Not Running: Insufficient amount of resource: nodect"
        if job.estimated_start_at is not None:
            hosts = job.hosts or ["node-unknown"]
            attributes["estimated"] = {
                "exec_vnode": "+".join(f"({host}:ncpus={CPUS_PER_NODE})" for host in hosts),
                "start_time": ctime(job.estimated_start_at),
            }
    elif code == "H":
        attributes["Hold_Types"] = "u"
        attributes["comment"] = "Job held by user"
    elif code == "W":
        attributes["Execution_Time"] = ctime(job.estimated_start_at or job.submitted_at)
    if job.comment is not None:
        attributes["comment"] = job.comment
    return listed


def server_jobs(scenario: Scenario) -> dict[str, dict[str, Any]]:
    """Every job the server knows, history included, as `qstat -x -f -t -F json` lists them."""
    if "qstat" in scenario.samples:
        with open(scenario.samples["qstat"]) as file:
            jobs: dict[str, dict[str, Any]] = json.load(file).get("Jobs", {})
            return jobs
    listed: dict[str, dict[str, Any]] = {}
    for job in scenario.jobs:
        listed.update(_job(job, scenario))
    return listed


def _is_subjob(job_id: str) -> bool:
    return re.match(r"^\d+\[\d+\]", job_id) is not None


def _prologue(scenario: Scenario) -> dict[str, Any]:
    return {"timestamp": int(time.time()), "pbs_version": PBS_VERSION, "pbs_server": scenario.server}


def dumps(data: dict[str, Any]) -> str:
    """cJSON's formatted print, as PBS's commands use it: tabs, and a tab after each colon."""
    return json.dumps(data, indent="\t", separators=(",", ":\t"))


def qstat(scenario: Scenario, history: bool, subjobs: bool, ids: list[str]) -> tuple[dict[str, Any], list[str], int]:
    """`qstat -f [-t] [-x] -F json [ID...]`: the JSON, the messages for stderr, the exit status."""
    jobs = server_jobs(scenario)
    shown: dict[str, dict[str, Any]] = {}
    messages: list[str] = []
    status = 0
    if ids:
        for job_id in ids:
            full = job_id if "." in job_id else f"{job_id}.{scenario.server}"
            if full not in jobs:
                messages.append(f"qstat: Unknown Job Id {job_id}")
                status = 153  # PBSE_UNKJOBID (15001), as an exit status
            elif jobs[full].get("job_state") in HISTORY_STATES and not history:
                messages.append(f"qstat: {job_id} Job has finished, use -x or -H to obtain historical job information")
                status = 35  # PBSE_HISTJOBID (15139)
            else:
                shown[full] = jobs[full]
    else:
        for job_id, attributes in jobs.items():
            if _is_subjob(job_id):
                parent = jobs.get(str(attributes.get("array_id")), {})
                # -t shows the subjobs that started; a finished array's only with -x.
                if not subjobs or attributes.get("job_state") == "Q":
                    continue
                if parent.get("job_state") in HISTORY_STATES and not history:
                    continue
            elif attributes.get("job_state") in HISTORY_STATES and not history:
                continue
            shown[job_id] = attributes
    output = _prologue(scenario)
    if shown:  # qstat leaves "Jobs" out when it has none to show
        output["Jobs"] = shown
    return output, messages, status


TIME_ATTRIBUTES = {"a": "Execution_Time", "c": "ctime", "e": "etime", "m": "mtime", "q": "qtime", "s": "stime"}
COMPARISONS = {
    "eq": lambda a, b: a == b,
    "ne": lambda a, b: a != b,
    "ge": lambda a, b: a >= b,
    "gt": lambda a, b: a > b,
    "le": lambda a, b: a <= b,
    "lt": lambda a, b: a < b,
}


def parse_datetime(value: str) -> float:
    """qselect's `[[CC]YY]MMDDhhmm[.SS]`, in local time."""
    stamp, _, seconds = value.partition(".")
    if not stamp.isdigit() or len(stamp) not in (8, 10, 12) or (seconds and not seconds.isdigit()):
        raise ValueError(value)
    now = time.localtime()
    year = now.tm_year if len(stamp) == 8 else int(stamp[:-8])
    if len(stamp) == 10:  # YY, as cvtdate() reads it: 69-99 the 1900s, 00-68 the 2000s
        year += 1900 if year > 68 else 2000
    month, day, hour, minute = (int(stamp[-8:][i : i + 2]) for i in range(0, 8, 2))
    return time.mktime((year, month, day, hour, minute, int(seconds or 0), 0, 0, -1))


def qselect(
    scenario: Scenario, history: bool, states: str | None, users: list[str], times: list[tuple[str, str, float]]
) -> list[str]:
    """`qselect [-x] [-s STATES] [-u USERS] [-t OPT.OP.TIME]...`: the ids of jobs and array jobs (not subjobs)."""
    selected = []
    for job_id, attributes in server_jobs(scenario).items():
        state = attributes.get("job_state")
        if _is_subjob(job_id) or (state in HISTORY_STATES and not history):
            continue
        if states is not None and str(state) not in states:
            continue
        owner = str(attributes.get("Job_Owner", "")).split("@", 1)[0]
        if users and owner not in users:
            continue
        matched = True
        for option, comparison, when in times:
            stamp = parse_ctime(attributes.get(TIME_ATTRIBUTES[option]))
            matched = matched and stamp is not None and COMPARISONS[comparison](stamp, when)
        if matched:
            selected.append(job_id)
    return selected


def _node(node: FakeNode, scenario: Scenario, running: dict[str, list[str]]) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "Mom": f"{node.name}.{scenario.server.partition('.')[2] or 'cluster'}",
        "ntype": "PBS",
        "state": NODE_STATES[node.state],
        "pcpus": CPUS_PER_NODE,
    }
    if running.get(node.name) and node.state == "busy":
        attributes["jobs"] = running[node.name]
    attributes["resources_available"] = {
        "arch": "linux",
        "host": node.name,
        "mem": "527672488kb",
        "ncpus": CPUS_PER_NODE,
        "ngpus": 4,
        "vnode": node.name,
    }
    attributes["resources_assigned"] = {"ncpus": CPUS_PER_NODE} if node.state == "busy" else {}
    if node.state in ("down", "offline", "drain"):
        attributes["comment"] = "node down: communication closed" if node.state == "down" else "offlined by admin"
    attributes["resv_enable"] = "True"
    attributes["sharing"] = "force_exclhost"
    attributes["license"] = "l"
    attributes["last_state_change_time"] = int(time.time()) - 600
    attributes["last_used_time"] = int(time.time()) - 601
    return attributes


def pbsnodes(scenario: Scenario) -> dict[str, Any]:
    """`pbsnodes -a -F json`."""
    if "pbsnodes" in scenario.samples:
        with open(scenario.samples["pbsnodes"]) as file:
            sample: dict[str, Any] = json.load(file)
            return sample
    running: dict[str, list[str]] = {}
    for job_id, attributes in server_jobs(scenario).items():
        if attributes.get("job_state") == "R":
            for host in str(attributes.get("exec_host", "")).split("+"):
                running.setdefault(host.split("/", 1)[0], []).append(job_id)
    output = _prologue(scenario)
    if scenario.nodes:
        output["nodes"] = {node.name: _node(node, scenario, running) for node in scenario.nodes}
    return output
