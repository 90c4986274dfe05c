"""Limits while Redis is down: budgets fail closed and rate limits open by default (each per a setting), every
request still leaves its usage row, and limits count again once Redis is back.

The gateway reaches Redis through a TCP proxy the test cuts: connections refused and open ones dropped.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import httpx
import pytest

from resource_server.models import Limit, RequestLog, User
from resource_server.services.api_keys import api_key_create
from tests.conftest import Seeded, seed
from tests.e2e.conftest import _usage_writes_settled, e2e_gateway, usage_row
from tests.integration.conftest import REDIS_URL, redis_through
from tests.tcp_proxy import TcpProxy

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(not REDIS_URL, reason="needs REDIS_URL pointing at Redis"),
    pytest.mark.usefixtures(_usage_writes_settled.__name__),
]

CHAT = {"model": "demo-model", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5}


@pytest.fixture
def through_proxy(redis_up: TcpProxy) -> str:
    return redis_through(redis_up)


def _another_user(seeded: Seeded) -> Seeded:
    """A second user with a key, on the same endpoint."""
    user = User.objects.create(identity_id="id-bob", username="bob@anl.gov")
    key_row, key = api_key_create(owner=user, name="test")
    return replace(seeded, user=user, api_key=key_row, key=key)


def _chat(url: str, seeded: Seeded) -> httpx.Response:
    return httpx.post(f"{url}/resource_server/v1/chat/completions", json=CHAT, headers=seeded.auth, timeout=20)


def test_with_redis_down_budgets_fail_closed_and_rates_open_by_default(
    model_server: str, tmp_path_factory: Any, redis_proxy: TcpProxy, through_proxy: str
) -> None:
    budgeted = seed(model_server)
    rated = _another_user(budgeted)
    Limit.objects.create(user=budgeted.user, tokens_per_day=1_000_000)
    Limit.objects.create(user=rated.user, requests_per_minute=1000, concurrent=10)
    with e2e_gateway(tmp_path_factory, REDIS_URL=through_proxy, LIMITS_REDIS_TIMEOUT_SECONDS="0.3") as url:
        assert _chat(url, budgeted).status_code == 200
        assert _chat(url, rated).status_code == 200
        # A bucket of 1000 a minute refills 16 a second: at most one came back between the two requests.
        assert _chat(url, rated).headers["x-ratelimit-remaining-requests"] in ("998", "999")

        redis_proxy.cut()
        refused = _chat(url, budgeted)
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "limits_unavailable"
        assert int(refused.headers["Retry-After"]) > 0
        let_through = _chat(url, rated)
        assert let_through.status_code == 200, let_through.text
        assert "x-ratelimit-remaining-requests" not in let_through.headers, "unmetered: nothing to report"
        row = usage_row(request_id=refused.headers["x-gateway-request-id"])
        assert (row.status_code, row.error_code) == (503, "limits_unavailable")

        redis_proxy.restore()
        assert _chat(url, budgeted).status_code == 200
        again = _chat(url, rated)
        assert again.status_code == 200
        assert int(again.headers["x-ratelimit-remaining-requests"]) < 1000, "counted again"
    assert RequestLog.objects.count() == 7, "one usage row per request, through the outage"


def test_the_settings_turn_it_around(
    model_server: str, tmp_path_factory: Any, redis_proxy: TcpProxy, through_proxy: str
) -> None:
    budgeted = seed(model_server)
    rated = _another_user(budgeted)
    Limit.objects.create(user=budgeted.user, tokens_per_day=1_000_000)
    Limit.objects.create(user=rated.user, requests_per_minute=1000)
    settings = {
        "REDIS_URL": through_proxy,
        "LIMITS_REDIS_TIMEOUT_SECONDS": "0.3",
        "LIMITS_BUDGETS_WHEN_STORE_DOWN": "open",
        "LIMITS_RATES_WHEN_STORE_DOWN": "closed",
    }
    with e2e_gateway(tmp_path_factory, **settings) as url:
        redis_proxy.cut()
        assert _chat(url, budgeted).status_code == 200
        refused = _chat(url, rated)
        assert (refused.status_code, refused.json()["error"]["code"]) == (503, "limits_unavailable")
