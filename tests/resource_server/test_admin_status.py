"""The admin's view of endpoint states, cluster jobs and maintenance windows: read from the records the workers
share in the cache (no probe, no network), and windows scheduled inline or on their own page."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta

import pytest
from django.core.cache import cache
from django.test import Client
from django.utils import timezone

from resource_server.models import Cluster, Endpoint, MaintenanceWindow
from resource_server.selectors.endpoints import _load_table
from resource_server.status.base import State
from resource_server.status.jobs import ClusterJobs, Job, JobState
from resource_server.status.shared import EndpointRecord, JobsRecord, Shared, endpoint_key, jobs_key

pytestmark = pytest.mark.django_db

LOCAL_SCHEDULER = {"kind": "pbs", "backend": "local", "user": "svc", "commands_dir": "/opt/pbs/bin"}


@pytest.fixture
def shared() -> Iterator[Shared]:
    """The process's cache, as the workers and the admin share it; emptied of this test's records after it."""
    written: list[str] = []

    class Recording(Shared):
        def set(self, key: str, value: object, timeout: float = 60) -> bool:
            written.append(key)
            return super().set(key, value, timeout)

    yield Recording()
    cache.delete_many(written)


@pytest.fixture
def endpoint() -> Endpoint:
    cluster = Cluster.objects.create(name="polaris", scheduler=LOCAL_SCHEDULER)
    return Endpoint.objects.create(
        cluster=cluster,
        model="meta-llama/Llama-3.1-70B-Instruct",
        backend="direct",
        backend_config={"base_url": "http://node12:8000/v1"},
        scheduler_job_name="gw-llama70b",
    )


def test_endpoint_list_and_page_show_the_state_the_workers_share(
    admin_client: Client, endpoint: Endpoint, shared: Shared
) -> None:
    now = time.time()
    record = EndpointRecord(
        State.QUEUED,
        since=now - 125,
        detail="job 4300 waits in queue demand; position 3",
        ready_at=now + 420,
        queue_position=3,
        updated_at=now,
    )
    shared.set(endpoint_key(endpoint.pk), record.as_dict())

    listing = admin_client.get("/admin/resource_server/endpoint/").content.decode()
    assert "queued" in listing and "2 minutes ago" in listing

    page = admin_client.get(f"/admin/resource_server/endpoint/{endpoint.pk}/change/").content.decode()
    for shown in ("queued", "job 4300 waits in queue demand; position 3", "about 7 minutes", "Queue position"):
        assert shown in page, shown


def test_an_endpoint_no_worker_reported_yet_is_unknown(admin_client: Client, endpoint: Endpoint) -> None:
    page = admin_client.get(f"/admin/resource_server/endpoint/{endpoint.pk}/change/").content.decode()
    assert "unknown (not reported yet)" in page


def test_the_cluster_page_shows_its_jobs_and_when_they_were_read(
    admin_client: Client, endpoint: Endpoint, shared: Shared
) -> None:
    now = time.time()
    jobs = ClusterJobs(
        scheduler="pbs",
        user="svc",
        collected_at=now,
        free_nodes=12,
        jobs=[
            Job(
                id="4300.polaris-pbs-01",
                name="gw-llama70b",
                user="svc",
                queue="demand",
                state=JobState.QUEUED,
                scheduler_state="Q",
                queue_position=3,
            )
        ],
        errors=["qstat -x: finished jobs unavailable"],
    )
    shared.set(jobs_key("polaris"), JobsRecord(jobs, now - 90, "no answer within 30 s", now).as_dict())

    page = admin_client.get(f"/admin/resource_server/cluster/{endpoint.cluster_id}/change/").content.decode()
    for shown in (
        "4300.polaris-pbs-01",
        "gw-llama70b",
        "queued (Q)",
        "free nodes: 12",
        "qstat -x: finished jobs unavailable",
        "jobs stale",
        "no answer within 30 s",
    ):
        assert shown in page, shown


def test_a_cluster_without_a_scheduler_says_so_and_one_not_read_yet_says_unknown(
    admin_client: Client, endpoint: Endpoint
) -> None:
    quiet = Cluster.objects.create(name="aurora")
    assert (
        "no scheduler config" in admin_client.get(f"/admin/resource_server/cluster/{quiet.pk}/change/").content.decode()
    )
    page = admin_client.get(f"/admin/resource_server/cluster/{endpoint.cluster_id}/change/").content.decode()
    assert "not read yet" in page


@pytest.mark.parametrize(
    ("scheduler", "said"),
    [
        ('{"kind": "lsf", "backend": "local", "user": "svc"}', "kind: Input should be"),
        ('{"kind": "pbs", "backend": "globus_compute", "user": "svc"}', "needs endpoint_id and function_id"),
        ('{"kind": "slurm", "backend": "local", "user": "svc", "commands_dir": "/opt/../bin"}', "must not go up"),
        ('{"kind": "slurm", "backend": "local", "user": "svc", "poll_seconds": 1}', "poll_seconds"),
    ],
)
def test_a_bad_scheduler_config_is_refused_naming_the_field(admin_client: Client, scheduler: str, said: str) -> None:
    response = admin_client.post(
        "/admin/resource_server/cluster/add/",
        {"name": "aurora", "allowed_groups": "[]", "allowed_domains": "[]", "scheduler": scheduler, **_empty_inlines()},
    )
    assert said in str(response.context["adminform"].form.errors["scheduler"])
    assert not Cluster.objects.filter(name="aurora").exists()


def test_a_good_scheduler_config_is_saved_and_read_with_the_routing_table(admin_client: Client) -> None:
    response = admin_client.post(
        "/admin/resource_server/cluster/add/",
        {
            "name": "aurora",
            "allowed_groups": "[]",
            "allowed_domains": "[]",
            "scheduler": '{"kind": "slurm", "backend": "local", "user": "svc", "poll_seconds": 30}',
            **_empty_inlines(),
        },
    )
    assert response.status_code == 302
    config = _load_table().clusters["aurora"].scheduler
    assert config is not None and (config.kind, config.poll_seconds, config.timeout_seconds) == ("slurm", 30, 30)


def _empty_inlines(**windows: str) -> dict[str, str]:
    """The management forms of the cluster page's inlines (its endpoints, its windows)."""
    form = {}
    for prefix in ("endpoints", "maintenance_windows"):
        form |= {f"{prefix}-TOTAL_FORMS": "0", f"{prefix}-INITIAL_FORMS": "0", f"{prefix}-MAX_NUM_FORMS": "1000"}
    if windows:
        form["maintenance_windows-TOTAL_FORMS"] = "1"
        form |= {f"maintenance_windows-0-{name}": value for name, value in windows.items()}
    return form


def test_a_window_scheduled_with_a_new_cluster_puts_it_in_maintenance(admin_client: Client) -> None:
    started = timezone.now() - timedelta(minutes=5)
    response = admin_client.post(
        "/admin/resource_server/cluster/add/",
        {
            "name": "sophia",
            "allowed_groups": "[]",
            "allowed_domains": "[]",
            "scheduler": "{}",
            **_empty_inlines(
                starts_at_0=started.strftime("%Y-%m-%d"),
                starts_at_1=started.strftime("%H:%M:%S"),
                ends_at_0="",
                ends_at_1="",
                message="Sophia's file system is being upgraded.",
            ),
        },
    )
    assert response.status_code == 302, response.context["adminform"].form.errors if response.context else ""
    [window] = MaintenanceWindow.objects.all()
    assert (window.cluster.name, window.ends_at) == ("sophia", None)
    assert _load_table().clusters["sophia"].maintenance_message == "Sophia's file system is being upgraded."
    listing = admin_client.get("/admin/resource_server/cluster/").content.decode()
    assert "icon-yes" in listing, "the list says it is in maintenance"


def test_a_window_on_its_own_page_needs_exactly_one_target(admin_client: Client, endpoint: Endpoint) -> None:
    soon = timezone.now() + timedelta(hours=1)
    form = {
        "starts_at_0": soon.strftime("%Y-%m-%d"),
        "starts_at_1": soon.strftime("%H:%M:%S"),
        "ends_at_0": (soon + timedelta(hours=2)).strftime("%Y-%m-%d"),
        "ends_at_1": (soon + timedelta(hours=2)).strftime("%H:%M:%S"),
        "message": "Node reboot.",
    }
    refused = admin_client.post("/admin/resource_server/maintenancewindow/add/", form)
    assert "Choose a cluster or an endpoint" in refused.content.decode()
    both = admin_client.post(
        "/admin/resource_server/maintenancewindow/add/",
        {**form, "cluster": str(endpoint.cluster_id), "endpoint": str(endpoint.pk)},
    )
    assert "Choose a cluster or an endpoint" in both.content.decode()
    saved = admin_client.post("/admin/resource_server/maintenancewindow/add/", {**form, "endpoint": str(endpoint.pk)})
    assert saved.status_code == 302
    assert MaintenanceWindow.objects.get().endpoint_id == endpoint.pk
    assert admin_client.get("/admin/resource_server/maintenancewindow/").status_code == 200
    page = admin_client.get(f"/admin/resource_server/endpoint/{endpoint.pk}/change/").content.decode()
    assert "Node reboot." in page, "the endpoint's page lists its windows"
