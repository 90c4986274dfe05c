"""The targets of the performance issue, checked against a run, and the run as a Markdown report."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Summary = dict[str, Any]
REFUSALS = {"429", "503"}
LIMITS = "gateway+limits"  # scenarios.LIMITS: the side whose key has a limit of every kind


@dataclass(frozen=True, slots=True)
class Verdict:
    target: str
    limit: str
    measured: str
    met: bool | None  # None: the scenario was not run


def _level(run: dict[str, Any], scenario: str, label: str) -> Summary | None:
    for entry in run["scenarios"]:
        if entry["id"] == scenario:
            for level in entry["levels"]:
                if level["label"] == label:
                    return dict(level["summary"])
    return None


def _levels(run: dict[str, Any], scenario: str) -> list[dict[str, Any]]:
    for entry in run["scenarios"]:
        if entry["id"] == scenario:
            return list(entry["levels"])
    return []


def _check(
    target: str,
    limit: str,
    summary: Summary | None,
    value: Callable[[Summary], float | None],
    ok: Callable[[float], bool],
) -> Verdict:
    measured = value(summary) if summary is not None else None
    if measured is None:
        return Verdict(target, limit, "not run", None)
    return Verdict(target, limit, _num(measured), ok(measured))


def stall_free(level: dict[str, Any]) -> bool:
    summary = level["summary"]
    return (
        not summary["stalls"]["gateway"]
        and not summary["parity_failures"]["gateway"]
        and not any(summary["refusals"]["gateway"].values())
    )


def s5_capacity(run: dict[str, Any]) -> tuple[int, Summary | None]:
    """The highest S5 concurrency with no stall, parity failure or refusal, and that level's summary."""
    best, summary = 0, None
    for level in _levels(run, "S5"):
        if stall_free(level):
            best, summary = level["params"]["concurrency"], level["summary"]
    return best, summary


def verdicts(run: dict[str, Any]) -> list[Verdict]:
    s1 = _level(run, "S1", "warm key")
    s3 = _level(run, "S3", "c=64")
    s2_levels = _levels(run, "S2")
    s2_best = max((level["summary"]["per_second"]["gateway"] or 0 for level in s2_levels), default=None)
    s5_levels = _levels(run, "S5")
    s5_best, s5_summary = s5_capacity(run)
    if s5_summary is None and s5_levels:
        s5_summary = s5_levels[0]["summary"]
    s6 = _level(run, "S6", _levels(run, "S6")[0]["label"]) if _levels(run, "S6") else None
    memory = run.get("memory", {})
    result = [
        _check("S1 added latency p50", "<= 1 ms", s1, lambda s: s["added_p50_ms"], lambda v: v <= 1.0),
        _check("S1 added latency p99", "<= 3 ms", s1, lambda s: s["added_p99_ms"], lambda v: v <= 3.0),
        Verdict(
            "S2 throughput, one worker on one core",
            ">= 1,500 req/s",
            _num(s2_best) if s2_levels else "not run",
            None if not s2_levels else (s2_best or 0) >= 1500,
        ),
        _check("S3 throughput ratio at c=64", ">= 0.98", s3, lambda s: s["throughput_ratio"], lambda v: v >= 0.98),
        _check("S3 p99 ratio at c=64", "<= 1.10", s3, lambda s: s["p99_ratio"], lambda v: v <= 1.10),
        _check(
            "S4 added TTFT p50 at c=1",
            "<= 2 ms",
            _level(run, "S4", "c=1"),
            lambda s: s["added_ttft_p50_ms"],
            lambda v: v <= 2.0,
        ),
        _check(
            "S4 added TTFT p50 at c=32",
            "<= 10 ms",
            _level(run, "S4", "c=32"),
            lambda s: s["added_ttft_p50_ms"],
            lambda v: v <= 10.0,
        ),
        _check(
            "S5 CPU per relayed chunk",
            "<= 60 us",
            s5_summary,
            lambda s: s["gateway_cpu_us_per_event"],
            lambda v: v <= 60.0,
        ),
        _check(
            "S5 memory per open stream", "<= 32 KB", s5_summary, lambda s: s["memory_kb_per_stream"], lambda v: v <= 32
        ),
        Verdict(
            "S5 stall-free streams, one core",
            ">= 512",
            str(s5_best) if s5_levels else "not run",
            None if not s5_levels else s5_best >= 512,
        ),
        _s6_verdict(s6),
        _check(
            "Idle worker memory (RSS)",
            "<= 80 MB",
            memory or None,
            lambda m: m["idle_rss_kb"] / 1024,
            lambda v: v <= 80,
        ),
    ]
    if s1 is not None and s1.get("limits"):
        # Issue 14's target: with Redis on the same host. The database store is reported against it too.
        result.append(
            _check(
                "S1 added latency p50 of limits (gateway+limits - gateway)",
                "< 0.2 ms",
                s1,
                lambda s: s["limits"]["added_p50_ms"],
                lambda v: v < 0.2,
            )
        )
    return result


def _s6_verdict(summary: Summary | None) -> Verdict:
    target, limit = "S6 overload", "no timeouts, only 429/503 refusals, recovery <= 2 s"
    if summary is None:
        return Verdict(target, limit, "not run", None)
    answered = summary["answered"]["gateway"]
    errors = summary["errors"]["gateway"]
    recovery = summary["recovery_s"]["gateway"]
    others = {status: n for status, n in answered.items() if status != "200" and status not in REFUSALS}
    refused = sum(n for status, n in answered.items() if status in REFUSALS)
    measured = (
        f"{errors.get('timeout', 0)} timeouts, {refused} refused (429/503), other answers {others or 'none'}, "
        f"errors {({k: v for k, v in errors.items() if k != 'timeout'}) or 'none'}, "
        f"recovery {'never' if recovery is None else f'{recovery:.2f} s'}"
    )
    met = not errors and not others and recovery is not None and recovery <= 2.0
    return Verdict(target, limit, measured, met)


# --- Markdown ------------------------------------------------------------------------------------


def _num(value: float | None, digits: int | None = None) -> str:
    if value is None:
        return "-"
    if digits is None:
        digits = 0 if abs(value) >= 100 else 1 if abs(value) >= 10 else 2
    return f"{value:,.{digits}f}"


def _added(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f} ms"


def _times(value: float | None) -> str:
    return "-" if value is None else f"x{value:.2f}"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{key}: {n}" for key, n in sorted(counts.items())) or "none"


def _rows(scenario: dict[str, Any]) -> list[list[str]]:
    rows: list[list[str]] = []
    for level in scenario["levels"]:
        s = level["summary"]
        name = f"{scenario['id']} {level['label']}"
        if scenario["id"] == "S1":
            rows += [
                [
                    name,
                    "latency p50 (ms)",
                    _num(s["p50_ms"]["direct"]),
                    _num(s["p50_ms"]["gateway"]),
                    _added(s["added_p50_ms"]),
                ],
                [
                    name,
                    "latency p99 (ms)",
                    _num(s["p99_ms"]["direct"]),
                    _num(s["p99_ms"]["gateway"]),
                    _added(s["added_p99_ms"]),
                ],
                [name, "gateway CPU per request (us)", "", _num(s["gateway_cpu_us_per_request"]), ""],
            ]
        elif scenario["id"] in ("S2", "S3", "S8"):
            per_second, refusals = s["per_second"], s["refusals"]
            rows += [
                [
                    name,
                    "requests/s",
                    _num(per_second["direct"]),
                    _num(per_second["gateway"]),
                    _times(s["throughput_ratio"]),
                ],
                [name, "latency p50 (ms)", _num(s["p50_ms"]["direct"]), _num(s["p50_ms"]["gateway"]), ""],
                [
                    name,
                    "latency p99 (ms)",
                    _num(s["p99_ms"]["direct"]),
                    _num(s["p99_ms"]["gateway"]),
                    _times(s["p99_ratio"]),
                ],
                [name, "errors and refusals", _counts(refusals["direct"]), _counts(refusals["gateway"]), ""],
                [name, "gateway CPU per request (us)", "", _num(s["gateway_cpu_us_per_request"]), ""],
            ]
        elif scenario["id"] in ("S4", "S5", "S7"):
            rows += [
                [
                    name,
                    "TTFT p50 (ms)",
                    _num(s["ttft_p50_ms"]["direct"]),
                    _num(s["ttft_p50_ms"]["gateway"]),
                    _added(s["added_ttft_p50_ms"]),
                ],
                [
                    name,
                    "TTFT p99 (ms)",
                    _num(s["ttft_p99_ms"]["direct"]),
                    _num(s["ttft_p99_ms"]["gateway"]),
                    _added(s["added_ttft_p99_ms"]),
                ],
                [
                    name,
                    "inter-token gap p50 (ms)",
                    _num(s["gap_p50_ms"]["direct"]),
                    _num(s["gap_p50_ms"]["gateway"]),
                    _times(s["gap_p50_ratio"]),
                ],
                [
                    name,
                    "inter-token gap p99 (ms)",
                    _num(s["gap_p99_ms"]["direct"]),
                    _num(s["gap_p99_ms"]["gateway"]),
                    _times(s["gap_p99_ratio"]),
                ],
                [name, "stalls in bursts (rounds with any)", _stalls(s, "direct"), _stalls(s, "gateway"), ""],
                [name, "streams / parity failures", _parity(s, "direct"), _parity(s, "gateway"), ""],
                [name, "errors and refusals", _counts(s["refusals"]["direct"]), _counts(s["refusals"]["gateway"]), ""],
                [name, "gateway CPU per relayed chunk (us)", "", _num(s["gateway_cpu_us_per_event"]), ""],
                [name, "gateway memory per open stream (KB)", "", _num(s["memory_kb_per_stream"]), ""],
            ]
        elif scenario["id"] == "S6":
            rows += [
                [
                    name,
                    "offered requests/s",
                    _num(s["offered_per_second"]["direct"]),
                    _num(s["offered_per_second"]["gateway"]),
                    "",
                ],
                [name, "answers", _counts(s["answered"]["direct"]), _counts(s["answered"]["gateway"]), ""],
                [name, "timeouts and errors", _counts(s["errors"]["direct"]), _counts(s["errors"]["gateway"]), ""],
                [name, "latency p99 / max (ms)", _p99_max(s, "direct"), _p99_max(s, "gateway"), ""],
                [name, "recovery after the load stops (s)", _recovery(s, "direct"), _recovery(s, "gateway"), ""],
                [
                    name,
                    "peak busy client connections (of 1,024)",
                    str(s["peak_busy_connections"]["direct"]),
                    str(s["peak_busy_connections"]["gateway"]),
                    "",
                ],
            ]
        util = s["utilisation"]
        rows.append(
            [
                name,
                "CPU use: gateway / model server / load generator",
                _util(util["direct"]),
                _util(util["gateway"]),
                "",
            ]
        )
    return rows  # fmt: skip


def _limits_rows(scenario: dict[str, Any]) -> list[list[str]]:
    """gateway+limits against gateway, for the levels that ran that side (S1 warm key, S2)."""
    rows: list[list[str]] = []
    for level in scenario["levels"]:
        s = level["summary"]
        cost = s.get("limits")
        if not cost:
            continue
        name = f"{scenario['id']} {level['label']}"
        if scenario["id"] == "S2":
            rows.append(
                [
                    name,
                    "requests/s",
                    _num(s["per_second"]["gateway"]),
                    _num(s["per_second"][LIMITS]),
                    _times(cost["throughput_ratio"]),
                ]
            )
        rows += [
            [
                name,
                "latency p50 (ms)",
                _num(s["p50_ms"]["gateway"]),
                _num(s["p50_ms"][LIMITS]),
                _added(cost["added_p50_ms"]),
            ],
            [
                name,
                "latency p99 (ms)",
                _num(s["p99_ms"]["gateway"]),
                _num(s["p99_ms"][LIMITS]),
                _added(cost["added_p99_ms"]),
            ],
            [
                name,
                "gateway CPU per request (us)",
                _num(s["gateway_cpu_us_per_request"]),
                _num(cost["cpu_us_per_request"]),
                "-" if cost["added_cpu_us_per_request"] is None else f"{cost['added_cpu_us_per_request']:+.0f} us",
            ],
            [name, "errors and refusals", _counts(s["refusals"]["gateway"]), _counts(s["refusals"][LIMITS]), ""],
        ]
        if scenario["id"] == "S1":
            rows.append(
                [
                    name,
                    "added latency vs direct p50 / p99 (ms)",
                    f"{_added(s['added_p50_ms'])} / {_added(s['added_p99_ms'])}",
                    f"{_added(_plus(s['added_p50_ms'], cost['added_p50_ms']))} / "
                    f"{_added(_plus(s['added_p99_ms'], cost['added_p99_ms']))}",
                    "",
                ]
            )
    return rows  # fmt: skip


def _plus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a + b


def _stalls(summary: Summary, side: str) -> str:
    bursts = summary.get("stall_bursts", {}).get(side)  # not in results from before bursts were counted
    where = f" in {bursts}" if bursts is not None else ""
    return f"{summary['stalls'][side]}{where} ({summary['rounds_with_stalls'][side]})"


def _parity(summary: Summary, side: str) -> str:
    return f"{summary['streams'][side]} / {_counts(summary['parity_failures'][side])}"


def _p99_max(summary: Summary, side: str) -> str:
    return f"{_num(summary['p99_ms'][side])} / {_num(summary['max_ms'][side])}"


def _recovery(summary: Summary, side: str) -> str:
    value = summary["recovery_s"][side]
    return "never" if value is None else f"{value:.2f}"


def _util(use: dict[str, float | None]) -> str:
    return " / ".join("-" if use[name] is None else f"{use[name]:.0%}" for name in ("gateway", "fake", "loadgen"))


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown(run: dict[str, Any]) -> str:
    machine, memory = run["machine"], run.get("memory", {})
    packages = ", ".join(f"{name} {version}" for name, version in machine["packages"].items() if version)
    parts = [
        f"# Gateway benchmark: {run['label']}",
        "",
        f"- Command: `{run['command']}`",
        f"- Gateway: `{run['source']}` at {run['revision']} (imports `{run['imported_from']}`)",
        f"- Started {run['started']}, took {run['duration_s']:.0f} s; rounds per scenario: {run['rounds']}",
        f"- Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gb']} GB, Linux {machine['kernel']}, "
        f"Python {machine['python']}; load average before {_load(machine['load_average'])}, "
        f"after {_load(run['load_average_after'])}",
        f"- Pinning: {run['cores']}",
        f"- Endpoints registered: {run.get('endpoints', 'direct, and a local compute endpoint (not used)')}",
        f"- Limits (the gateway+limits side of S1 and S2): {run.get('limits', 'off')}",
        f"- Packages: {packages}",
        "",
        "## Targets",
        "",
        _table(
            ["Target", "Limit", "Measured", "Met"],
            [
                [v.target, v.limit, v.measured, {True: "yes", False: "**no**", None: "-"}[v.met]]
                for v in run["verdicts"]
            ],
        ),
        "",
        "## All figures (medians over rounds; ratios are gateway / direct, added is gateway - direct)",
        "",
        _table(
            ["Scenario", "Metric", "Direct", "Gateway", "Gateway vs direct"],
            [row for scenario in run["scenarios"] for row in _rows(scenario)],
        ),
        "",
        f"Gateway worker memory: idle {_mb(memory.get('idle_rss_kb'))} after warm-up, "
        f"{_mb(memory.get('end_rss_kb'))} at the end, peak {_mb(memory.get('peak_rss_kb'))} (VmHWM).",
    ]
    limits = [row for scenario in run["scenarios"] for row in _limits_rows(scenario)]
    if limits:
        parts += [
            "",
            "## Limits on the hot path (medians over rounds; the change is gateway+limits against gateway, "
            "round by round)",
            "",
            _table(["Scenario", "Metric", "Gateway", "Gateway+limits", "Limits on vs off"], limits),
        ]
    failures = [f"- {s['id']} stopped early: {s['error']}" for s in run["scenarios"] if s.get("error")]
    if failures:
        parts += ["", "## Failures", "", *failures]
    flags = [
        f"- {scenario['id']} {level['label']}: {flag}"
        for scenario in run["scenarios"]
        for level in scenario["levels"]
        for flag in level["flags"]
    ]
    parts += ["", "## Bottleneck flags", "", *(flags or ["- none: the client core had headroom in every round"])]
    return "\n".join(parts) + "\n"


def _load(values: list[float]) -> str:
    return " ".join(f"{value:.2f}" for value in values)


def _mb(kb: int | None) -> str:
    return "-" if kb is None else f"{kb / 1024:.1f} MB"
