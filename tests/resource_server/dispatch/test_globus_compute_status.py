"""The endpoint's status as Globus Compute reports it, and what the gateway concludes from it.

The documents are shaped as the service returns them: {"status", "details": the engine's status report}, with
the report's keys as globus-compute-endpoint 4.19's `GlobusComputeEngine.get_status_report` writes them.
"""

from __future__ import annotations

from typing import Any

import pytest

from resource_server.dispatch.globus_compute import EndpointStatus, _parse_status, task_lost


def report(**changes: Any) -> dict[str, Any]:
    details = {
        "managers": 1,
        "active_managers": 1,
        "total_workers": 4,
        "idle_workers": 3,
        "pending_tasks": 0,
        "outstanding_tasks": 1,
        "total_tasks": 17,
        "scaling_enabled": True,
        "max_blocks": 1,
        "min_blocks": 0,
        "max_workers_per_node": 4,
        "nodes_per_block": 1,
        "engine_type": "GlobusComputeEngine",
        "provider_type": "PBSProProvider",
    }
    return {"status": "online", "details": details | changes}


def test_an_endpoint_with_workers_is_live_and_counts_what_it_holds() -> None:
    status = _parse_status(report(), fetched_at=12.5)

    assert (status.online, status.workers, status.idle_workers, status.outstanding_tasks) == (True, 4, 3, 1)
    assert status.can_start is True
    assert status.fetched_at == 12.5
    assert status.detail == "online; 4 workers (3 idle)"


def test_no_workers_with_on_demand_scaling_can_start_a_block() -> None:
    status = _parse_status(report(total_workers=0, idle_workers=0, managers=0, outstanding_tasks=0))

    assert (status.online, status.workers, status.can_start) == (True, 0, True)
    assert "start a block" in status.detail


@pytest.mark.parametrize("changes", [{"scaling_enabled": False}, {"max_blocks": 0}])
def test_no_workers_and_no_scaling_can_start_nothing(changes: dict[str, Any]) -> None:
    status = _parse_status(report(total_workers=0, idle_workers=0, **changes))

    assert status.can_start is False
    assert "starts none" in status.detail


def test_a_report_without_the_scaling_keys_leaves_it_unknown() -> None:
    status = _parse_status({"status": "online", "details": {"total_workers": 0}})

    assert (status.workers, status.can_start, status.outstanding_tasks) == (0, None, None)


def test_an_offline_endpoint_is_offline() -> None:
    assert _parse_status({"status": "offline", "details": {}}).online is False


def test_a_task_is_lost_when_the_connected_endpoint_holds_none() -> None:
    lost = task_lost(_parse_status(report(outstanding_tasks=0)))

    assert lost is not None and not lost.offline


def test_a_task_is_lost_to_an_endpoint_that_went_offline() -> None:
    lost = task_lost(_parse_status({"status": "offline", "details": {}}))

    assert lost is not None and lost.offline


@pytest.mark.parametrize(
    "status",
    [
        _parse_status(report(outstanding_tasks=3)),  # it may be one of these
        _parse_status({"status": "online", "details": {"total_workers": 2}}),  # the count is not reported
        EndpointStatus(None, detail="status unavailable (ConnectionError)"),
    ],
)
def test_a_task_is_not_taken_for_lost_on_what_does_not_prove_it(status: EndpointStatus) -> None:
    assert task_lost(status) is None
