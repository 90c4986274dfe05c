"""The admin sign-in throttle as deployed: behind a trusted proxy, and shared by processes through Redis."""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import uuid
from typing import Any

import httpx
import pytest
from django.contrib.auth import get_user_model

from tests.e2e.conftest import e2e_gateway

PASSWORD = "pw-long-enough-123"
PAUSED = "Too many failed sign-ins"
LIMIT = 3


def fresh_address() -> str:
    """A documentation-range address no earlier run used (the counts outlive a run in Redis)."""
    return str(ipaddress.IPv4Address("198.18.0.0") + secrets.randbelow(2**17))


def sign_in(base_url: str, username: str, password: str, forwarded_for: str) -> str:
    """One sign-in through a proxy that sent `forwarded_for`: 'in', or the page's error text."""
    with httpx.Client(base_url=base_url, timeout=30) as client:
        page = client.get("/admin/login/")
        match = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
        assert match is not None
        response = client.post(
            "/admin/login/?next=/admin/",
            data={"username": username, "password": password, "csrfmiddlewaretoken": match.group(1)},
            headers={"X-Forwarded-For": forwarded_for},
        )
    if response.status_code == 302:
        return "in"
    assert response.status_code == 200
    return PAUSED if PAUSED in response.text else "refused"


@pytest.fixture
def staff() -> str:
    username = f"admin-{uuid.uuid4().hex[:8]}"
    get_user_model().objects.create_superuser(username, f"{username}@example.org", PASSWORD)
    return username


def test_client_behind_the_trusted_proxy_is_counted_by_its_own_address(tmp_path_factory: Any, staff: str) -> None:
    client, neighbour = fresh_address(), fresh_address()
    with e2e_gateway(tmp_path_factory, ADMIN_LOGIN_FAILURE_LIMIT=str(LIMIT)) as url:
        for _ in range(LIMIT):
            # nginx appends the address it saw to whatever X-Forwarded-For the client sent.
            spoofed = f"{fresh_address()}, {client}"
            assert sign_in(url, f"guess-{uuid.uuid4().hex[:8]}", "wrong", spoofed) != "in"
        assert sign_in(url, staff, PASSWORD, f"{fresh_address()}, {client}") == PAUSED
        assert sign_in(url, staff, PASSWORD, neighbour) == "in", "only the failing client is paused"


@pytest.mark.skipif(not os.environ.get("REDIS_URL"), reason="REDIS_URL is not set: counts are per process")
def test_every_worker_and_host_shares_the_counts_through_redis(tmp_path_factory: Any, staff: str) -> None:
    address = fresh_address()
    with (
        e2e_gateway(tmp_path_factory, ADMIN_LOGIN_FAILURE_LIMIT=str(LIMIT)) as first,
        e2e_gateway(tmp_path_factory, ADMIN_LOGIN_FAILURE_LIMIT=str(LIMIT)) as second,
    ):
        for attempt in range(LIMIT):
            assert sign_in((first, second)[attempt % 2], staff, "wrong", address) != "in"
        assert sign_in(first, staff, PASSWORD, fresh_address()) == PAUSED
        assert sign_in(second, staff, PASSWORD, fresh_address()) == PAUSED
