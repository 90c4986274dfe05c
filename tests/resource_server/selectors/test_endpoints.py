"""The routing table: reloaded ahead of time in the background, waited for only when past its lifetime."""

from __future__ import annotations

import pytest
from django.conf import settings

from resource_server.models import Endpoint
from resource_server.selectors import endpoints
from resource_server.selectors.endpoints import routing_table
from tests.conftest import Seeded


@pytest.fixture
def lifetime(monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.setattr(settings.GATEWAY, "ROUTING_CACHE_SECONDS", 10.0)
    return 10.0


async def _disable_endpoint(seeded: Seeded) -> None:
    await Endpoint.objects.filter(pk=seeded.endpoint.pk).aupdate(enabled=False)


async def test_a_table_past_half_its_lifetime_is_served_while_a_new_one_loads(seeded: Seeded, lifetime: float) -> None:
    first = await routing_table()
    assert "demo-model" in first.by_model
    await _disable_endpoint(seeded)
    first.loaded_at -= lifetime * 0.6

    assert await routing_table() is first, "a busy worker must not wait for the database"
    assert endpoints._reload is not None
    await endpoints._reload
    assert "demo-model" not in (await routing_table()).by_model


async def test_a_table_past_its_lifetime_is_reloaded_before_it_is_used(seeded: Seeded, lifetime: float) -> None:
    first = await routing_table()
    await _disable_endpoint(seeded)
    first.loaded_at -= lifetime + 1

    assert "demo-model" not in (await routing_table()).by_model, "admin changes must apply within the lifetime"
