"""Slurm's side of the fake: a scenario as `squeue --json`, `sacct --json` and `sinfo --json` print it.

The shapes follow Slurm's data_parser plugins (src/plugins/data_parser/v0.0.39 .. v0.0.41 of SchedMD/slurm):
v0.0.39 (Slurm 23.02) prints squeue's times as plain numbers and job states as one word; v0.0.40 (23.11) and
v0.0.41 (24.05) wrap numbers as {"set", "infinite", "number"} and print states as lists of flags. squeue
up to 23.11 dumps every job the controller holds; 24.05's later releases and 24.11 apply its default state
filter (pending, running, suspended, completing) to JSON too, which the v0.0.41 rendering does.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from fakes.scheduler.scenario import FakeJob, FakeNode, FakeTask, Scenario, index_ranges

RELEASES = {"v0.0.39": ("23", "02", "7"), "v0.0.40": ("23", "11", "10"), "v0.0.41": ("24", "05", "4")}
CPUS_PER_NODE = 64
MEMORY_PER_CPU = 4096
ACTIVE = {"PENDING", "RUNNING", "SUSPENDED", "COMPLETING", "STAGE_OUT"}
UID_BASE = 20000


def wrapped(value: float | None, infinite: bool = False) -> dict[str, Any]:
    """data_parser's NO_VAL number: {"set", "infinite", "number"}."""
    if value is None:
        return {"set": False, "infinite": infinite, "number": 0}
    return {"set": True, "infinite": False, "number": value}


def compress(hosts: list[str]) -> str:
    """Host names as Slurm's host list expression ("gpu[012-014],login1")."""
    groups: dict[tuple[str, int], list[int]] = {}
    plain: list[str] = []
    for host in hosts:
        match = re.fullmatch(r"(.*?)(\d+)", host)
        if match is None:
            plain.append(host)
        else:
            groups.setdefault((match.group(1), len(match.group(2))), []).append(int(match.group(2)))
    parts = []
    for (prefix, width), numbers in groups.items():
        numbers.sort()
        if len(numbers) == 1:
            parts.append(f"{prefix}{numbers[0]:0{width}d}")
            continue
        spans: list[str] = []
        start = previous = numbers[0]
        for current in [*numbers[1:], None]:
            if current is not None and current == previous + 1:
                previous = current
                continue
            spans.append(f"{start:0{width}d}" + (f"-{previous:0{width}d}" if previous != start else ""))
            if current is not None:
                start = previous = current
        parts.append(f"{prefix}[{','.join(spans)}]")
    return ",".join(parts + plain)


class Render:
    """One scenario in one data_parser version."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.parser = scenario.slurm_data_parser
        self.old = self.parser == "v0.0.39"
        self.now = time.time()

    def time(self, value: float | None) -> Any:
        """A timestamp: plain in v0.0.39's squeue, wrapped from v0.0.40."""
        number = int(value) if value else 0
        return number if self.old else wrapped(number)

    def state(self, words: list[str]) -> Any:
        if not self.old:
            return words
        return "COMPLETING" if "COMPLETING" in words else words[0]  # job_state_string(): the flag first

    def exit_code(self, status: int | None) -> Any:
        """v0.0.40+: PROCESS_EXIT_CODE; v0.0.39's squeue: the wait status itself, wrapped."""
        code = status or 0
        signaled = code > 128
        if self.old:
            return wrapped((code - 128) if signaled else code << 8)
        return {
            "status": ["SIGNALED"] if signaled else ["SUCCESS" if code == 0 else "ERROR"],
            "return_code": wrapped(None if signaled else code),
            "signal": {"id": wrapped(code - 128 if signaled else None), "name": "SIGKILL" if code == 137 else ""},
        }

    def accounting_exit_code(self, status: int | None) -> dict[str, Any]:
        """sacct's exit code; v0.0.39's JOB_EXIT_CODE prints any normal exit as SUCCESS 0 (Slurm 23.02)."""
        code = status or 0
        if not self.old:
            return dict(self.exit_code(code))
        if code > 128:
            return {"status": "SIGNALED", "return_code": -127, "signal": {"signal_id": code - 128, "name": "Killed"}}
        return {"status": "SUCCESS", "return_code": 0}

    # --- squeue -----------------------------------------------------------------------------------------------

    def words(self, state: str, exit_status: int | None) -> tuple[list[str], str]:
        """The job state words and the state reason for a neutral state."""
        if state == "exiting":
            return ["COMPLETED", "COMPLETING"], "None"
        if state == "finished":
            return (["COMPLETED"], "None") if not exit_status else (["FAILED"], "NonZeroExitCode")
        return {
            "queued": (["PENDING"], "Priority"),
            "held": (["PENDING"], "JobHeldUser"),
            "waiting": (["PENDING"], "BeginTime"),
            "running": (["RUNNING"], "None"),
            "suspended": (["SUSPENDED"], "None"),
        }[state]

    def job_resources(self, hosts: list[str], started: bool) -> dict[str, Any]:
        if not started or not hosts:
            return {}
        if self.parser == "v0.0.41":
            return {
                "select_type": ["CORE", "MEMORY"],
                "nodes": {
                    "count": len(hosts),
                    "select_type": ["AVAILABLE"],
                    "list": compress(hosts),
                    "whole": True,
                    "allocation": [
                        {
                            "index": index,
                            "name": host,
                            "cpus": {"count": CPUS_PER_NODE, "used": 0},
                            "memory": {"used": 0, "allocated": CPUS_PER_NODE * MEMORY_PER_CPU},
                            "sockets": [{"index": 0, "cores": [{"index": 0, "status": ["ALLOCATED"]}]}],
                        }
                        for index, host in enumerate(hosts)
                    ],
                },
                "cpus": CPUS_PER_NODE * len(hosts),
                "threads_per_core": wrapped(1),
            }
        return {
            "nodes": compress(hosts),
            "allocated_cores": 0,
            "allocated_cpus": 0,
            "allocated_hosts": len(hosts),
            "allocated_nodes": [
                {
                    "sockets": {"0": {"cores": {"0": "allocated"}}},
                    "nodename": host,
                    "cpus_used": 0,
                    "memory_used": 0,
                    "memory_allocated": CPUS_PER_NODE * MEMORY_PER_CPU,
                }
                for host in hosts
            ],
        }

    def squeue_record(self, job: FakeJob, task: FakeTask | None, pending_indices: str = "") -> dict[str, Any]:
        run: FakeJob | FakeTask = task or job
        state = run.state if task else job.state
        words, reason = self.words(state, run.exit_status)
        if job.reason is not None and task is None:
            reason = job.reason
        started = state in ("running", "exiting", "finished", "suspended") and run.started_at is not None
        pending = state in ("queued", "held", "waiting")
        job_id = int(task.job_id or int(job.id) + task.index + 1) if task else int(job.id)
        is_array = job.array_indices is not None
        if pending:
            start = job.estimated_start_at
            end = start + job.walltime_seconds if start else None
        else:
            start = run.started_at or run.ended_at
            end = run.ended_at if state == "finished" else (start + job.walltime_seconds if start else None)
        hosts = run.hosts if started else []
        uid = UID_BASE + sum(job.user.encode()) % 1000
        cpus = CPUS_PER_NODE * job.nodes
        return {
            "account": "gateway" if job.user.startswith("svc") else "users",
            "accrue_time": self.time(job.submitted_at if state == "queued" else 0),
            "admin_comment": "",
            "allocating_node": self.scenario.submit_host.split(".", 1)[0],
            "array_job_id": wrapped(int(job.id) if is_array else 0),
            "array_task_id": wrapped(task.index if task else None),
            "array_max_tasks": wrapped(0),
            "array_task_string": pending_indices,
            "association_id": 10 + uid % 50,
            "batch_features": "",
            "batch_flag": True,
            "batch_host": hosts[0] if hosts else "",
            "flags": ["EXACT_TASK_COUNT_REQUESTED", "USING_DEFAULT_QOS", "USING_DEFAULT_WCKEY", "PARTITION_ASSIGNED"],
            "burst_buffer": "",
            "burst_buffer_state": "",
            "cluster": self.scenario.server.split(".", 1)[0],
            "cluster_features": "",
            "command": f"/home/{job.user}/{job.name}.sbatch",
            "comment": "",
            "container": "",
            "container_id": "",
            "contiguous": False,
            "core_spec": 0,
            "thread_spec": 32766,
            "cores_per_socket": wrapped(None),
            "billable_tres": wrapped(float(cpus) if started else None),
            "cpus_per_task": wrapped(1),
            "cpu_frequency_minimum": wrapped(None),
            "cpu_frequency_maximum": wrapped(None),
            "cpu_frequency_governor": wrapped(None),
            "cpus_per_tres": "",
            "cron": "",
            "deadline": self.time(0),
            "delay_boot": wrapped(0),
            "dependency": "",
            "derived_exit_code": self.exit_code(0),
            "eligible_time": self.time(job.submitted_at),
            "end_time": self.time(end),
            "excluded_nodes": "",
            "exit_code": self.exit_code(run.exit_status if state == "finished" else 0),
            "extra": "",
            "failed_node": "",
            "features": "",
            "federation_origin": "",
            "federation_siblings_active": "",
            "federation_siblings_viable": "",
            "gres_detail": [],
            "group_id": uid,
            "group_name": job.user,
            "het_job_id": wrapped(0),
            "het_job_id_set": "",
            "het_job_offset": wrapped(0),
            "job_id": job_id,
            "job_resources": self.job_resources(hosts, started),
            "job_size_str": [],
            "job_state": self.state(words),
            "last_sched_evaluation": self.time(self.now - 30),
            "licenses": "",
            "mail_type": [],
            "mail_user": job.user,
            "max_cpus": wrapped(0),
            "max_nodes": wrapped(0),
            "mcs_label": "",
            "memory_per_tres": "",
            "name": job.name,
            "network": "",
            "nodes": compress(hosts),
            "nice": 0,
            "tasks_per_core": wrapped(None, infinite=True),
            "tasks_per_tres": wrapped(0),
            "tasks_per_node": wrapped(0),
            "tasks_per_socket": wrapped(None, infinite=True),
            "tasks_per_board": wrapped(0),
            "cpus": wrapped(cpus),
            "node_count": wrapped(job.nodes),
            "tasks": wrapped(job.nodes),
            "partition": job.queue,
            "prefer": "",
            "memory_per_cpu": wrapped(MEMORY_PER_CPU),
            "memory_per_node": wrapped(None),
            "minimum_cpus_per_node": wrapped(1),
            "minimum_tmp_disk_per_node": wrapped(0),
            "power": {"flags": []},
            "preempt_time": self.time(0),
            "preemptable_time": self.time(0),
            "pre_sus_time": self.time(0),
            "hold": state == "held",
            "priority": wrapped(0 if state == "held" else job.priority),
            "profile": ["NOT_SET"],
            "qos": "normal",
            "reboot": False,
            "required_nodes": "",
            "minimum_switches": 0,
            "requeue": True,
            "resize_time": self.time(0),
            "restart_cnt": 0,
            "resv_name": "",
            "scheduled_nodes": "",
            "selinux_context": "",
            "shared": [],
            "exclusive": [],
            "oversubscribe": True,
            "show_flags": ["ALL", "DETAIL", "LOCAL"],
            "sockets_per_board": 0,
            "sockets_per_node": wrapped(None),
            "start_time": self.time(start),
            "state_description": "",
            "state_reason": reason,
            "standard_error": f"/home/{job.user}/slurm-{job_id}.out",
            "standard_input": "/dev/null",
            "standard_output": f"/home/{job.user}/slurm-{job_id}.out",
            "submit_time": self.time(job.submitted_at),
            "suspend_time": self.time(0),
            "system_comment": "",
            "time_limit": wrapped(job.walltime_seconds // 60),
            "time_minimum": wrapped(0),
            "threads_per_core": wrapped(None),
            "tres_bind": "",
            "tres_freq": "",
            "tres_per_job": "",
            "tres_per_node": "",
            "tres_per_socket": "",
            "tres_per_task": "",
            "tres_req_str": f"cpu={cpus},mem={cpus * MEMORY_PER_CPU // 1024}G,node={job.nodes},billing={cpus}",
            "tres_alloc_str": (
                f"cpu={cpus},mem={cpus * MEMORY_PER_CPU // 1024}G,node={job.nodes},billing={cpus}" if started else ""
            ),
            "user_id": uid,
            "user_name": job.user,
            "maximum_switch_wait_time": 0,
            "wckey": "",
            "current_working_directory": f"/home/{job.user}",
        }

    def squeue_records(self) -> list[dict[str, Any]]:
        records = []
        for job in self.scenario.jobs:
            if job.array_indices is None:
                records.append(self.squeue_record(job, None))
                continue
            started = {task.index: task for task in job.tasks if task.state != "queued"}
            pending = [index for index in job.indices() if index not in started]
            if pending:  # the array's pending remainder, under the array's own id
                records.append(self.squeue_record(job, None, index_ranges(pending)))
            records.extend(self.squeue_record(job, task) for task in started.values())
        return records

    def squeue(self, command: list[str]) -> dict[str, Any]:
        jobs = self.squeue_records()
        if self.parser == "v0.0.41":
            jobs = [job for job in jobs if ACTIVE & set(job["job_state"])]
        if self.old:
            return {"meta": self.meta(command, "slurmctld"), "errors": [], "warnings": [], "jobs": jobs}
        return {
            "jobs": jobs,
            "last_backfill": wrapped(int(self.now) - 20),
            "last_update": wrapped(int(self.now) - 5),
            **self.envelope(command, "slurmctld"),
        }

    def meta(self, command: list[str], plugin: str) -> dict[str, Any]:
        major, minor, micro = RELEASES[self.parser]
        return {
            "plugin": {
                "type": "",
                "name": "",
                "data_parser": f"data_parser/{self.parser}",
                "accounting_storage": "accounting_storage/slurmdbd",
            },
            "client": {"source": "/dev/pts/3", "user": "svc-gateway", "group": "svc-gateway"},
            "command": command,
            "slurm": {
                "version": {"major": major, "micro": micro, "minor": minor},
                "release": f"{major}.{minor}.{micro}",
                "cluster": self.scenario.server.split(".", 1)[0],
            },
        }

    def envelope(self, command: list[str], plugin: str) -> dict[str, Any]:
        return {"meta": self.meta(command, plugin), "errors": [], "warnings": []}

    # --- sacct ------------------------------------------------------------------------------------------------

    def sacct_record(self, job: FakeJob, task: FakeTask | None, pending_indices: str = "") -> dict[str, Any]:
        run: FakeJob | FakeTask = task or job
        state = run.state if task else job.state
        words, reason = self.words(state, run.exit_status)
        if state == "exiting":
            words = ["COMPLETED"]  # accounting records the end, not the epilogue
        job_id = int(task.job_id or int(job.id) + task.index + 1) if task else int(job.id)
        started = run.started_at if state not in ("queued", "held", "waiting") else None
        ended = run.ended_at if state in ("finished", "exiting") else None
        hosts = run.hosts if started else []
        cpus = CPUS_PER_NODE * job.nodes
        exit_code = self.accounting_exit_code(run.exit_status if state == "finished" else 0)
        required: dict[str, Any] = {
            "CPUs": cpus,
            "memory_per_cpu": wrapped(MEMORY_PER_CPU),
            "memory_per_node": wrapped(None),
        }
        if self.old:  # and the raw value, its per-CPU flag (the top bit) making it negative (data_parser v0.0.39)
            required["memory"] = MEMORY_PER_CPU - 2**63
        return {
            "account": "gateway" if job.user.startswith("svc") else "users",
            "comment": {"administrator": "", "job": "", "system": ""},
            "allocation_nodes": len(hosts) if hosts else job.nodes,
            "array": {
                "job_id": int(job.id) if job.array_indices is not None else 0,
                "limits": {"max": {"running": {"tasks": 0}}},
                "task_id": wrapped(task.index if task else None),
                "task": pending_indices,
            },
            "association": {
                "account": "gateway" if job.user.startswith("svc") else "users",
                "cluster": self.scenario.server.split(".", 1)[0],
                "partition": "",
                "user": job.user,
                "id": 12,
            },
            "block": "",
            "cluster": self.scenario.server.split(".", 1)[0],
            "constraints": "",
            "container": "",
            "derived_exit_code": self.accounting_exit_code(0),
            "time": {
                "elapsed": int((ended or self.now) - started) if started else 0,
                "eligible": int(job.submitted_at),
                "end": int(ended or 0),
                **({} if self.old else {"planned": wrapped(int(started - job.submitted_at) if started else None)}),
                "start": int(started or 0),
                "submission": int(job.submitted_at),
                "suspended": 0,
                "system": {"seconds": 0, "microseconds": 0},
                "limit": wrapped(job.walltime_seconds // 60),
                "total": {"seconds": 0, "microseconds": 0},
                "user": {"seconds": 0, "microseconds": 0},
            },
            "exit_code": exit_code,
            "extra": "",
            "failed_node": "",
            "flags": ["STARTED_ON_SCHEDULE"] if started else [],
            "group": job.user,
            "het": {"job_id": 0, "job_offset": wrapped(None)},
            "job_id": job_id,
            "name": job.name,
            "licenses": "",
            "mcs": {"label": ""},
            "nodes": compress(hosts) if hosts else "None assigned",
            "partition": job.queue,
            "hold": state == "held",
            "priority": wrapped(0 if state == "held" else job.priority),
            "qos": "normal",
            "required": required,
            "kill_request_user": "",
            "reservation": {"id": 0, "name": ""},
            "script": "",
            **({} if self.old else self.standard_streams(job, job_id)),
            "state": {"current": self.state(words), "reason": reason},
            "steps": [],
            "submit_line": f"sbatch --job-name={job.name} --partition={job.queue} {job.name}.sbatch",
            "tres": {
                "allocated": [{"type": "cpu", "name": "", "id": 1, "count": cpus}] if started else [],
                "requested": [{"type": "cpu", "name": "", "id": 1, "count": cpus}],
            },
            "used_gres": "",
            "user": job.user,
            "wckey": {"wckey": "", "flags": []},
            "working_directory": f"/home/{job.user}",
        }

    def standard_streams(self, job: FakeJob, job_id: int) -> dict[str, str]:
        """The job's stdin, stdout, stderr paths as sacct prints them from v0.0.41 (24.05)."""
        return {
            "stdin_expanded": "/dev/null",
            "stdout_expanded": f"/home/{job.user}/slurm-{job_id}.out",
            "stderr_expanded": f"/home/{job.user}/slurm-{job_id}.out",
            "stdout": f"/home/{job.user}/slurm-%j.out",
            "stderr": f"/home/{job.user}/slurm-%j.out",
            "stdin": "/dev/null",
        }

    def sacct(self, command: list[str], user: str | None, since: float) -> dict[str, Any]:
        """`sacct --json [--user U] [--starttime T]`: the jobs in any state during [since, now]."""
        records = []
        for job in self.scenario.jobs:
            if user is not None and job.user != user:
                continue
            if job.array_indices is None:
                candidates = [self.sacct_record(job, None)]
            else:
                started = {task.index: task for task in job.tasks if task.state != "queued"}
                pending = [index for index in job.indices() if index not in started]
                candidates = [self.sacct_record(job, task) for task in started.values()]
                if pending:
                    candidates.append(self.sacct_record(job, None, index_ranges(pending)))
            for record in candidates:
                end = record["time"]["end"]
                if (end == 0 or end >= since) and record["time"]["submission"] <= self.now:
                    records.append(record)
        if self.old:  # 23.02 prints the envelope first
            return {**self.envelope(command, "slurmdbd"), "jobs": records}
        return {"jobs": records, **self.envelope(command, "slurmdbd")}

    # --- sinfo ------------------------------------------------------------------------------------------------

    NODE_WORDS = {
        "free": ["IDLE"],
        "busy": ["ALLOCATED"],
        "down": ["DOWN", "NOT_RESPONDING"],
        "offline": ["IDLE", "DRAIN"],
        "drain": ["IDLE", "DRAIN"],
    }

    def partition(self, name: str, nodes: list[FakeNode]) -> dict[str, Any]:
        return {
            "nodes": {"allowed_allocation": "", "configured": compress([n.name for n in nodes]), "total": len(nodes)},
            "accounts": {"allowed": "", "deny": ""},
            "groups": {"allowed": ""},
            "qos": {"allowed": "", "deny": "", "assigned": ""},
            "alternate": "",
            "tres": {"billing_weights": "", "configured": f"cpu={CPUS_PER_NODE * len(nodes)},node={len(nodes)}"},
            "cluster": "",
            "select_type": [],
            "cpus": {"task_binding": 0, "total": CPUS_PER_NODE * len(nodes)},
            "defaults": {
                "memory_per_cpu": MEMORY_PER_CPU,
                "partition_memory_per_cpu": wrapped(MEMORY_PER_CPU),
                "partition_memory_per_node": wrapped(None),
                "time": wrapped(None),
                "job": "",
            },
            "grace_time": 0,
            "maximums": {
                "cpus_per_node": wrapped(None, infinite=True),
                "cpus_per_socket": wrapped(None, infinite=True),
                "memory_per_cpu": 0,
                "partition_memory_per_cpu": wrapped(None),
                "partition_memory_per_node": wrapped(0),
                "nodes": wrapped(None, infinite=True),
                "shares": 1,
                "oversubscribe": {"jobs": 1, "flags": []},
                "time": wrapped(1440),
                "over_time_limit": wrapped(None),
            },
            "minimums": {"nodes": 0},
            "name": name,
            "node_sets": "",
            "priority": {"job_factor": 1, "tier": 1},
            "timeouts": {"resume": wrapped(None), "suspend": wrapped(None)},
            "partition": {"state": ["UP"]},
            "suspend_time": wrapped(None),
        }

    def sinfo(self, command: list[str]) -> dict[str, Any]:
        """`sinfo --json`: one record per partition and node state, as sinfo groups its lines."""
        partitions: dict[str, list[FakeNode]] = {}
        for node in self.scenario.nodes:
            for name in node.partitions:
                partitions.setdefault(name, []).append(node)
        records = []
        for name, members in partitions.items():
            by_state: dict[str, list[FakeNode]] = {}
            for node in members:
                by_state.setdefault(node.state, []).append(node)
            for state, nodes in by_state.items():
                names = [node.name for node in nodes]
                words = self.NODE_WORDS[state]
                idle = len(names) if words == ["IDLE"] else 0
                allocated = len(names) if words == ["ALLOCATED"] else 0
                cpus = CPUS_PER_NODE * len(names)
                records.append(
                    {
                        "port": 6818,
                        "node": {"state": words},
                        "nodes": {
                            "allocated": allocated,
                            "idle": idle,
                            "other": len(names) - idle - allocated,
                            "total": len(names),
                            "hostnames": names,
                            "addresses": names,
                            "nodes": names,
                        },
                        "cpus": {
                            "allocated": cpus if allocated else 0,
                            "idle": cpus if idle else 0,
                            "other": cpus if not (idle or allocated) else 0,
                            "total": cpus,
                            "minimum": CPUS_PER_NODE,
                            "maximum": CPUS_PER_NODE,
                            "load": {"minimum": 0, "maximum": 0},
                            "per_node": {"max": wrapped(None)},
                        },
                        "sockets": {"minimum": 2, "maximum": 2},
                        "cores": {"minimum": 32, "maximum": 32},
                        "threads": {"minimum": 1, "maximum": 1},
                        "disk": {"minimum": 0, "maximum": 0},
                        "memory": {
                            "minimum": 515000,
                            "maximum": 515000,
                            "free": {"minimum": wrapped(500000), "maximum": wrapped(510000)},
                            "allocated": 0,
                        },
                        "weight": {"minimum": 1, "maximum": 1},
                        "features": {"total": "", "active": ""},
                        "gres": {"total": "gpu:4", "used": "gpu:4(IDX:0-3)" if allocated else "gpu:0"},
                        "cluster": "",
                        "comment": "",
                        "extra": "",
                        "reason": {
                            "description": "Not responding"
                            if state == "down"
                            else ("maintenance" if idle == 0 else ""),
                            "time": int(self.now) - 3600 if state in ("down", "offline", "drain") else 0,
                            "user": "root" if state in ("offline", "drain") else "",
                        },
                        "reservation": "",
                        "partition": self.partition(name, members),
                    }
                )
        return {"sinfo": records, **self.envelope(command, "slurmctld")}


def sample(scenario: Scenario, command: str) -> Any:
    """The real-format file standing for a command's output, if the scenario names one (else None); printed
    as it is, whatever it holds."""
    if command not in scenario.samples:
        return None
    with open(scenario.samples[command]) as file:
        return json.load(file)
