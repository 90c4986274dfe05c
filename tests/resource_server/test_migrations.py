"""Data migrations: what a gateway's rows become when it upgrades (and back)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.db.migrations.state import StateApps

from resource_server.models import Cluster
from resource_server.selectors.endpoints import _load_table

pytestmark = pytest.mark.django_db(transaction=True)

BEFORE = ("resource_server", "0006_scheduling")
WINDOWS = ("resource_server", "0007_maintenance_windows")
LIMITS = ("resource_server", "0008_limits_and_usage")


def _migrate(target: tuple[str, str]) -> StateApps:
    executor = MigrationExecutor(connection)
    executor.migrate([target])
    return executor.loader.project_state([target]).apps


@pytest.fixture
def at_0006() -> Iterator[StateApps]:
    """The schema as of 0006, and back to the latest after the test."""
    apps = _migrate(BEFORE)
    yield apps
    executor = MigrationExecutor(connection)
    executor.migrate(executor.loader.graph.leaf_nodes())


def test_a_clusters_maintenance_flag_becomes_an_open_ended_window_in_force_now(at_0006: StateApps) -> None:
    OldCluster = at_0006.get_model("resource_server", "Cluster")
    OldCluster.objects.create(name="polaris", maintenance=True, maintenance_message="Upgrades until Monday.")
    OldCluster.objects.create(name="sophia", maintenance=True)
    OldCluster.objects.create(name="aurora", maintenance_message="a message left from an earlier maintenance")

    apps = _migrate(WINDOWS)

    Window = apps.get_model("resource_server", "MaintenanceWindow")
    windows = {window.cluster.name: (window.message, window.ends_at) for window in Window.objects.all()}
    assert windows == {
        "polaris": ("Upgrades until Monday.", None),
        "sophia": ("The cluster is under maintenance.", None),
    }
    assert not any(field.name.startswith("maintenance") for field in Cluster._meta.concrete_fields)
    # The routing table, as the upgraded gateway reads it: the same clusters in maintenance, with the same words.
    _migrate(LIMITS)
    clusters = _load_table().clusters
    assert {name: cluster.maintenance_message for name, cluster in clusters.items()} == {
        "aurora": None,
        "polaris": "Upgrades until Monday.",
        "sophia": "The cluster is under maintenance.",
    }

    back = _migrate(BEFORE)
    flags = {
        cluster.name: (cluster.maintenance, cluster.maintenance_message)
        for cluster in back.get_model("resource_server", "Cluster").objects.all()
    }
    assert flags["polaris"] == (True, "Upgrades until Monday.")
    assert flags["aurora"] == (False, ""), "its old message is not kept: no window said anything"


def test_past_usage_rows_keep_their_key_prefix_and_are_counted_in_the_daily_rollup(at_0006: StateApps) -> None:
    apps = _migrate(WINDOWS)
    User = apps.get_model("resource_server", "User")
    Key = apps.get_model("resource_server", "ApiKey")
    Log = apps.get_model("resource_server", "RequestLog")
    user = User.objects.create(identity_id="i1", username="jdoe@anl.gov")
    key = Key.objects.create(owner=user, name="k", prefix="igw_abc", secret_hash="x")
    when = datetime(2026, 11, 3, 12, tzinfo=UTC)
    common = {"user": user, "model": "m", "route": "chat", "latency_ms": 10.0, "created_at": when}
    Log.objects.create(request_id="r1", api_key=key, status_code=200, prompt_tokens=5, total_tokens=12, **common)
    Log.objects.create(request_id="r2", api_key=key, status_code=429, **common)
    Log.objects.create(request_id="r3", status_code=200, total_tokens=3, **common)

    apps = _migrate(LIMITS)

    rows = apps.get_model("resource_server", "RequestLog").objects.order_by("request_id")
    assert [row.api_key_prefix for row in rows] == ["igw_abc", "igw_abc", ""]
    daily = {
        row.api_key_prefix: (row.day, row.requests, row.errors, row.prompt_tokens, row.total_tokens, row.latency_ms_sum)
        for row in apps.get_model("resource_server", "UsageDaily").objects.all()
    }
    assert daily == {"igw_abc": (date(2026, 11, 3), 2, 1, 5, 12, 20.0), "": (date(2026, 11, 3), 1, 0, 0, 3, 10.0)}
