"""The backend pool: one live backend per endpoint, kept while its config is the same, replaced when it changes."""

from __future__ import annotations

from resource_server.bootstrap import bootstrap
from resource_server.dispatch.direct import DirectConfig


def _config(url: str = "http://127.0.0.1:9/v1") -> DirectConfig:
    return DirectConfig.model_validate({"base_url": url})


async def test_the_same_or_an_equal_config_keeps_the_backend_and_a_changed_one_replaces_it() -> None:
    pool = bootstrap().backend_pool
    config = _config()
    first = pool.get(1, "direct", config)
    assert pool.get(1, "direct", config) is first, "the routing table's own config object: the same backend"
    assert pool.get(1, "direct", _config()) is first, "a reloaded table's equal config: still the same backend"
    changed = pool.get(1, "direct", _config("http://127.0.0.1:10/v1"))
    assert changed is not first
    assert pool.get(2, "direct", config) is not changed, "each endpoint has its own backend"
