"""python -m benchmarks.fuzz [--cases 500] [--workers N] [--seed N] [--database-url URL] [--redis-url URL]

Fuzzes the gateway as deployed with Schemathesis, from the OpenAPI the gateway itself serves: every
operation, --cases generated cases each (plus the documented examples and Schemathesis' boundary cases).
The gateway (gunicorn, uvicorn workers) runs on a fresh SQLite database in a temporary folder, or on
--database-url, seeded like `make demo` with an API key, against the fake model server. Prints how each
operation was answered, by status, and exits non-zero on any failed check or any 5xx.

Checks (see CHECKS): no 5xx; every status, content type, documented header and JSON body (answers and
the error envelope) as the OpenAPI says; schema-invalid input refused with a 4xx (enabled in _CONFIG, but not
on the inference routes, whose bodies the model server judges); secured operations refused without
credentials; undocumented methods answered 405 with `Allow`. Not enabled:
positive_data_acceptance, since valid input is refused for reasons outside the schema (an unknown model is
a 404, a prompt too long for the model a 400, an API key may not create keys), and the checks that need
links between operations, which this API does not declare.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from benchmarks import procfs
from benchmarks.stack import REPO, _manage, _process, _wait_until_up, free_port

CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "ignored_auth",
    "unsupported_method",
    "allow_header_conformance",
)
# What seed_demo registers: a direct endpoint, and one through the compute function and the relay.
SERVED = ("demo-model@demo/vllm", "demo-model-hpc@local-hpc/vllm")
OPENAPI_PATH = "/resource_server/openapi.json"
# Not the stateful phase: it chains operations through links, and the only one it can infer (create an API
# key, then revoke it) needs a Globus token; through a key list it could revoke the run's own key.
PHASES = ("examples", "coverage", "fuzzing")
# Reports hide the credentials only: by default they also hide every field named like "*token*",
# max_tokens included, which a failing case needs to be reproduced.
# The inference routes read only a few fields and leave the rest for the model server to judge (it may accept
# what the documented schema calls invalid, as vLLM's lax coercion does), so they are not held to rejecting it.
_CONFIG = """
[output.sanitization]
keys-to-sanitize = ["authorization"]
sensitive-markers = ["authorization"]

[checks]
negative_data_rejection.enabled = true

[[operations]]
include-path-regex = "/v1/(chat/completions|completions|embeddings|audio/transcriptions|audio/translations)$"
checks.negative_data_rejection.enabled = false
"""


@dataclass(frozen=True, slots=True)
class Outcome:
    returncode: int  # Schemathesis' own: 0 when every check passed
    statuses: dict[str, Counter[int]]  # "METHOD /path" -> answers by status
    slowest: dict[str, float]  # "METHOD /path" -> seconds of its slowest answer

    @property
    def server_errors(self) -> int:
        return sum(count for counter in self.statuses.values() for status, count in counter.items() if status >= 500)

    def summary(self) -> str:
        width = max((len(name) for name in self.statuses), default=10)
        lines = [f"{'operation':<{width}}  {'cases':>6}  {'slowest':>7}  answers by status"]
        for name in sorted(self.statuses):
            counter = self.statuses[name]
            spread = ", ".join(f"{status}: {count}" for status, count in sorted(counter.items()))
            lines.append(f"{name:<{width}}  {sum(counter.values()):>6}  {self.slowest[name]:>6.2f}s  {spread}")
        total = sum(sum(counter.values()) for counter in self.statuses.values())
        lines.append(f"checks: {', '.join(CHECKS)}")
        lines.append(f"{total} requests, {self.server_errors} answered 5xx; schemathesis exit code {self.returncode}")
        return "\n".join(lines)


def schemathesis_run(
    base_url: str,
    *,
    api_key: str,
    cases: int,
    served: tuple[str, ...] = SERVED,
    seed: int | None = None,
    phases: tuple[str, ...] = PHASES,
    timeout: float = 60.0,
    stdout: int | None = None,
) -> Outcome:
    """Run Schemathesis against the gateway at `base_url` with `api_key`; how it went."""
    with tempfile.TemporaryDirectory(prefix="gateway-fuzz-") as workdir:
        tally = Path(workdir) / "tally"
        config = Path(workdir) / "schemathesis.toml"
        config.write_text(_CONFIG)
        args = [
            str(Path(sys.executable).with_name("schemathesis")),
            "--config-file",
            str(config),
            "run",
            base_url + OPENAPI_PATH,
            "--checks",
            ",".join(CHECKS),
            "--max-examples",
            str(cases),
            "--phases",
            ",".join(phases),
            # One thread: with several, CPython 3.11 can fail compiling in Hypothesis' threads
            # ("AST constructor recursion depth mismatch"), an error of the harness, not of the gateway.
            "--workers",
            "1",
            "--request-timeout",
            str(timeout),
            "--header",
            f"Authorization: Bearer {api_key}",
            "--report-dir",
            workdir,
            "--warnings",
            "off",
        ]
        if seed is not None:
            args += ["--seed", str(seed)]
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH")))),
            "SCHEMATHESIS_HOOKS": "benchmarks.fuzz_hooks",
            "FUZZ_SERVED": ",".join(served),
            "FUZZ_TALLY": str(tally),
            "NO_COLOR": "1",
        }
        # Run in the temporary folder: Schemathesis keeps a cache of crashes in its working directory.
        done = subprocess.run(args, cwd=workdir, env=env, stdout=stdout, stderr=subprocess.STDOUT, check=False)  # noqa: S603 (our venv's schemathesis, no shell)
        statuses: dict[str, Counter[int]] = defaultdict(Counter)
        slowest: dict[str, float] = defaultdict(float)
        if tally.exists():
            for line in tally.read_text().splitlines():
                status, seconds, name = line.split(" ", 2)
                statuses[name][int(status)] += 1
                slowest[name] = max(slowest[name], float(seconds))
        return Outcome(done.returncode, dict(statuses), dict(slowest))


@contextmanager
def deployment(
    *, workers: int, database_url: str, redis_url: str, logs: Path | None = None
) -> Iterator[tuple[str, str]]:
    """The fake model server and the gateway on a seeded database; yields (gateway URL, API key).

    The processes' logs are copied to `logs` at the end, if given.
    """
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gateway-fuzz-")))
        fake_port, gateway_port = free_port(), free_port()
        env = {
            "DATA_DIR": str(workdir / "data"),
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "GATEWAY_WORKERS": str(workers),
            "RELAY_PUBLIC_URL": f"http://127.0.0.1:{gateway_port}",
            "LOG_LEVEL": "WARNING",
        }
        _manage(REPO, env, "migrate", "--verbosity", "0")
        _manage(REPO, env, "seed_demo", "--model-url", f"http://127.0.0.1:{fake_port}/v1")
        key = _manage(REPO, env, "create_api_key", "--user", "fuzz@example.org", "--name", "fuzz").strip()
        fake_log = workdir / "fake.log"
        fake_args = [sys.executable, "-m", "fakes.model_server", "--port", str(fake_port)]
        fake_args += [f"--model={entry.partition('@')[0]}" for entry in SERVED]
        fake = stack.enter_context(_process(fake_args, cwd=REPO, env={}, cpus=None, log=fake_log))
        _wait_until_up(f"http://127.0.0.1:{fake_port}/health", fake, fake_log)
        gateway_log = workdir / "gateway.log"
        gunicorn = str(Path(sys.executable).with_name("gunicorn"))
        workers_started: list[int] = []
        stack.callback(_end_orphaned_workers, workers_started)  # runs after the master is stopped
        gateway_args = [gunicorn, "-c", "deploy/gunicorn.conf.py", "--bind", f"127.0.0.1:{gateway_port}"]
        gateway = stack.enter_context(_process(gateway_args, cwd=REPO, env=env, cpus=None, log=gateway_log))
        url = f"http://127.0.0.1:{gateway_port}"
        _wait_until_up(f"{url}/resource_server/health", gateway, gateway_log)
        workers_started += procfs.children(gateway.pid)
        try:
            yield url, key
        finally:
            for log in (gateway_log, fake_log):
                if logs is not None:
                    logs.mkdir(parents=True, exist_ok=True)
                    shutil.copy(log, logs / log.name)
                tail = log.read_text(errors="replace")[-4000:]
                if "Traceback" in tail or "ERROR" in tail:
                    print(f"--- end of {log.name} ---\n{tail}", file=sys.stderr)


def _end_orphaned_workers(pids: list[int]) -> None:
    """Kill the gateway's workers that outlived their master (one busy past its graceful timeout is)."""
    for pid in pids:
        with contextlib.suppress(OSError):  # ended already: the usual case
            stat = Path(f"/proc/{pid}/stat").read_bytes()
            parent = int(stat[stat.rindex(b")") + 2 :].split()[1])
            if parent == 1 and b"gunicorn" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fuzz", description=__doc__.split("\n\n")[1])
    parser.add_argument("--cases", type=int, default=500, help="generated cases per operation (default: %(default)s)")
    parser.add_argument(
        "--workers", type=int, help="gateway worker processes (default: 2 with --redis-url, else 1, as deployed)"
    )
    parser.add_argument("--seed", type=int, help="Hypothesis seed, to repeat a run")
    parser.add_argument("--database-url", default="", help="default: a fresh SQLite file")
    parser.add_argument("--redis-url", default="", help="default: no Redis (in-process cache and relay)")
    parser.add_argument("--logs", type=Path, help="copy the gateway's and the model server's logs to this folder")
    options = parser.parse_args(argv)
    # Without Redis the stream relay is per worker, so the deployed default is then one worker.
    workers = options.workers or (2 if options.redis_url else 1)
    deployed = deployment(
        workers=workers, database_url=options.database_url, redis_url=options.redis_url, logs=options.logs
    )
    with deployed as (url, key):
        outcome = schemathesis_run(url, api_key=key, cases=options.cases, seed=options.seed)
    print("\n" + outcome.summary())
    return 0 if outcome.returncode == 0 and outcome.server_errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
