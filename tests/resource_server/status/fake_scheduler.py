"""A stand-in for `compute_functions.scheduler.scheduler_jobs` (the cluster's real function reads qstat / squeue):
it answers what a test wrote in `<commands_dir>/answer.json`, so the board's scheduler source runs its real path
(the local process pool, the task's serialization, validation, the shared cache) with jobs the test chooses.

    {"jobs": <ClusterJobs as a dict>}   returned as it is
    {"garbage": <anything>}             returned as it is: what a broken function would send
    {"fail": "<message>"}               raises RuntimeError(message), as a scheduler command that failed
    {"sleep": <seconds>, ...}           sleeps first (a scheduler that hangs), then does the rest

Registered by source text like the real one, so it imports what it needs inside.
"""

from typing import Any


def fake_scheduler_jobs(task: "dict[str, Any]") -> "Any":
    import json
    import os
    import time

    with open(os.path.join(task["commands_dir"], "answer.json")) as answer_file:
        answer = json.load(answer_file)
    if "sleep" in answer:
        time.sleep(answer["sleep"])
    if "fail" in answer:
        raise RuntimeError(answer["fail"])
    if "garbage" in answer:
        return answer["garbage"]
    jobs = answer["jobs"]
    if jobs.get("user") != task["user"] or jobs.get("scheduler") != task["scheduler"]:
        raise RuntimeError(f"asked for {task['scheduler']} jobs of {task['user']}")
    return jobs
