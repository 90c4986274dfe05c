"""A fake batch scheduler: PBS Pro's and Slurm's commands, printing their real JSON from a scenario file.

`scenario.py` writes the scenario (jobs and nodes in a neutral form); the executables here (`qstat`, `qselect`,
`pbsnodes`, `squeue`, `sacct`, `sinfo`) render it as the real commands do. Put this directory first on PATH
(the scheduler task's `commands_dir`) and name the scenario file in FAKE_SCHEDULER_STATE.
"""

from fakes.scheduler.scenario import COMMANDS_DIR, FakeJob, FakeNode, FakeTask, Scenario, environment

__all__ = ["COMMANDS_DIR", "FakeJob", "FakeNode", "FakeTask", "Scenario", "environment"]
