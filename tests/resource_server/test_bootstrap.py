"""The composition root: nothing long-lived exists, and no thread runs, until bootstrap() builds it."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest

from resource_server import bootstrap as root
from resource_server.bootstrap import Runtime, bootstrap
from resource_server.dispatch.globus_compute import ComputeEndpointsClosed, Credentials
from tests.servers import ROOT

# Imports every product module in a fresh interpreter, then reports the threads running (by the module of
# what they run) and any module-level object of a long-lived kind.
_IMPORT_EVERYTHING = """
import importlib, json, os, pkgutil, sys, threading

os.environ["DJANGO_SETTINGS_MODULE"] = "gateway.settings"
before = {thread.ident for thread in threading.enumerate()}
import django

django.setup()
names = []
for package in ("gateway", "resource_server", "compute_functions"):
    for info in pkgutil.walk_packages(importlib.import_module(package).__path__, package + "."):
        if ".migrations." not in info.name:
            importlib.import_module(info.name)
            names.append(info.name)

from resource_server.adapters.relay import InProcessRelayHub, RedisRelayHub
from resource_server.auth.api_keys import ApiKeyAuthenticator
from resource_server.auth.globus import GlobusAuthenticator, GroupMemberships
from resource_server.bootstrap import Runtime
from resource_server.dispatch.globus_compute import ComputeEndpoints
from resource_server.dispatch.local import LocalComputeExecutor, LocalExecutors
from resource_server.dispatch.registry import BackendPool
from resource_server.selectors.endpoints import RoutingCache
from resource_server.services.authentication import Authenticators
from resource_server.services.usage import UsageSink
from resource_server.services.users import UserPrincipals
from resource_server.status.board import StatusBoard

kinds = (
    Runtime, InProcessRelayHub, RedisRelayHub, ApiKeyAuthenticator, GlobusAuthenticator, GroupMemberships,
    ComputeEndpoints, StatusBoard, LocalComputeExecutor, LocalExecutors, BackendPool, RoutingCache,
    Authenticators, UsageSink, UserPrincipals,
)
found = sorted(
    f"{name}.{attribute}"
    for name in names
    for attribute, value in vars(sys.modules[name]).items()
    if isinstance(value, kinds)
    or (isinstance(value, (list, tuple, dict)) and any(isinstance(item, kinds) for item in value))
)
threads = [
    getattr(getattr(thread, "_target", None), "__module__", thread.name)
    for thread in threading.enumerate()
    if thread.ident not in before
]
print(json.dumps({"modules": names, "found": found, "threads": threads}))
"""


def test_importing_every_product_module_builds_nothing_long_lived_and_starts_no_thread() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _IMPORT_EVERYTHING], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert {"gateway.asgi", "resource_server.bootstrap", "resource_server.api.fast"} <= set(report["modules"])
    assert report["found"] == []
    # The Globus Compute SDK starts its own exit watcher when it is imported. The product imports the SDK
    # only on first use (compute_serde, which the walk imports directly, is imported lazily; the routing
    # table preloads it at worker start), so that thread is the library's, not one of ours.
    assert [module for module in report["threads"] if module != "globus_compute_sdk.sdk.executor"] == []


def test_each_bootstrap_builds_fresh_objects_wired_to_each_other() -> None:
    first, second = bootstrap(), bootstrap()
    for name in Runtime.__dataclass_fields__:
        assert getattr(first, name) is not getattr(second, name), name
    parts = first.backend_pool.parts
    assert (parts.relay_hub, parts.compute_endpoints) == (first.relay_hub, first.compute_endpoints)
    assert first.authenticators.chain[-1]._groups is first.group_memberships  # type: ignore[attr-defined]


def test_without_a_lifespan_the_first_use_builds_one_runtime_for_the_process(runtime: Runtime) -> None:
    assert root.runtime() is runtime  # the one the fixture installed
    root.runtime_install(None)
    try:
        built = root.runtime()
        assert root.runtime() is built
        assert built is not runtime
    finally:
        root.runtime_install(runtime)


async def test_stopping_closes_the_compute_executors() -> None:
    stopped = bootstrap()
    credentials = Credentials(str(uuid.uuid4()), "secret")

    await stopped.stop(usage_seconds=1)

    with pytest.raises(ComputeEndpointsClosed):
        await stopped.compute_endpoints.submit(credentials, str(uuid.uuid4()), str(uuid.uuid4()), {})
