"""Data migrations: what a gateway's rows become when it upgrades (and back)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.db.migrations.state import StateApps

from resource_server.models import Cluster
from resource_server.selectors.endpoints import _load_table

pytestmark = pytest.mark.django_db(transaction=True)

BEFORE = ("resource_server", "0006_scheduling")
WINDOWS = ("resource_server", "0007_maintenance_windows")


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
