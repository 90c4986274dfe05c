"""The benchmark's limits side: its figures against the gateway side's, round by round, and the report it makes."""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis

from benchmarks import report
from benchmarks.scenarios import LIMITS, SIDES, Level, Plan, Scenario, summarise_latency, summarise_throughput
from benchmarks.stack import Cores, redis_server


def result(
    p50: float, p99: float, *, per_second: float = 100.0, cpu_s: float = 0.1, completed: int = 1000
) -> dict[str, Any]:
    """One job's result as the load generator gives it, with only what the summaries read."""
    return {
        "latency_ms": {"p50": p50, "p99": p99},
        "per_second": per_second,
        "cpu_s": {"gateway": cpu_s, "fake": 0.1, "loadgen": 0.1},
        "window_s": 2.0,
        "completed": completed,
        "events": 0,
        "statuses": {"200": completed},
        "errors": {},
    }


def level_of(rounds: list[dict[str, dict[str, Any]]]) -> Level:
    level = Level("warm key", {"concurrency": 1, "requests": 1000})
    level.rounds = rounds
    return level


def test_limits_on_vs_off_is_the_median_of_each_rounds_difference_not_the_difference_of_medians() -> None:
    level = level_of(
        [
            {"direct": result(0.2, 0.4), "gateway": result(1.0, 2.0), LIMITS: result(4.0, 2.5, cpu_s=0.13)},
            {LIMITS: result(5.2, 6.5, cpu_s=0.2), "gateway": result(5.0, 6.0), "direct": result(0.2, 0.4)},
            {"direct": result(0.2, 0.4), "gateway": result(3.0, 4.0), LIMITS: result(3.1, 4.5, cpu_s=0.11)},
        ]
    )
    summarise_latency(level)
    cost = level.summary["limits"]
    # p50 per round: +3.0, +0.2, +0.1 -> +0.2 (the medians' difference, 4.0 - 3.0, would be 1.0).
    assert round(cost["added_p50_ms"], 6) == 0.2
    assert round(cost["added_p99_ms"], 6) == 0.5
    assert round(cost["added_cpu_us_per_request"]) == 30  # 130 - 100, 200 - 100, 110 - 100 us
    assert level.summary["p50_ms"] == {"direct": 0.2, "gateway": 3.0, LIMITS: 4.0}
    assert round(level.summary["added_p50_ms"], 6) == 2.8  # the gateway against direct, as before


def test_without_the_limits_side_summaries_and_report_are_as_before() -> None:
    level = level_of([{"direct": result(0.2, 0.4), "gateway": result(1.0, 2.0)}])
    summarise_throughput(level)
    assert level.summary["limits"] == {}
    assert set(level.summary["per_second"]) == set(SIDES)
    run = run_of([Scenario("S2", "throughput", [level])])
    text = report.markdown({**run, "verdicts": report.verdicts(run)})
    assert "Limits on the hot path" not in text
    assert "gateway+limits - gateway" not in text


def test_the_report_has_a_limits_table_and_the_issue_14_verdict_when_the_side_ran() -> None:
    s1 = level_of([{"direct": result(0.2, 0.4), "gateway": result(1.0, 2.0), LIMITS: result(1.5, 2.5)}])
    summarise_latency(s1)
    s2 = Level("c=64", {"concurrency": 64, "duration_s": 3.0})
    s2.rounds = [
        {
            "direct": result(5.0, 9.0, per_second=4000.0),
            "gateway": result(10.0, 20.0, per_second=1000.0),
            LIMITS: result(20.0, 40.0, per_second=400.0),
        }
    ]
    summarise_throughput(s2)
    run = run_of([Scenario("S1", "latency", [s1]), Scenario("S2", "throughput", [s2])])
    verdicts = report.verdicts(run)
    [limits] = [verdict for verdict in verdicts if "limits" in verdict.target]
    assert (limits.measured, limits.met) == ("0.50", False)
    text = report.markdown({**run, "verdicts": verdicts})
    assert "| S1 warm key | latency p50 (ms) | 1.00 | 1.50 | +0.50 ms |" in text
    assert "| S2 c=64 | requests/s | 1,000 | 400 | x0.40 |" in text


def test_a_plan_with_limits_runs_the_third_side_and_one_without_does_not() -> None:
    assert Plan(rounds=1, quick=True, only=frozenset({"S1"})).limit_sides == SIDES
    assert Plan(rounds=1, quick=True, only=frozenset({"S1"}), limits=True).limit_sides == (*SIDES, LIMITS)


def run_of(scenarios: list[Scenario]) -> dict[str, Any]:
    return {
        "label": "test",
        "command": "python -m benchmarks",
        "source": ".",
        "revision": "x",
        "imported_from": ".",
        "started": "now",
        "duration_s": 1.0,
        "rounds": 1,
        "cores": "not pinned",
        "load_average_after": [0.0, 0.0, 0.0],
        "machine": {
            "cpu": "cpu",
            "cores": 2,
            "memory_gb": 1.0,
            "kernel": "k",
            "python": "3",
            "load_average": [0.0, 0.0, 0.0],
            "packages": {},
        },
        "memory": {},
        "scenarios": [asdict(scenario) for scenario in scenarios],
    }


@pytest.mark.server
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server on PATH")
def test_the_harness_redis_answers_on_the_client_core_and_is_gone_after() -> None:
    with redis_server() as url:
        port = urlsplit(url).port
        assert port is not None
        client = redis.Redis.from_url(url)
        assert client.ping()
        pid = client.info("server")["process_id"]
        cores = Cores.detect()
        if cores.client is not None:
            assert os.sched_getaffinity(pid) == cores.client
        client.close()
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
