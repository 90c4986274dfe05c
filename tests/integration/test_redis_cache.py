"""With REDIS_URL set, the shared cache is Redis and works across connections."""

from __future__ import annotations

import os
import uuid

import pytest
import redis
from django.conf import settings
from django.core.cache import cache

pytestmark = pytest.mark.skipif(not os.environ.get("REDIS_URL"), reason="needs REDIS_URL pointing at Redis")


def test_cache_values_are_visible_to_another_redis_client() -> None:
    assert settings.CACHES["default"]["BACKEND"] == "django.core.cache.backends.redis.RedisCache"
    key = f"probe-{uuid.uuid4()}"
    cache.set(key, "shared", timeout=30)
    other = redis.Redis.from_url(os.environ["REDIS_URL"])
    assert any(name.decode().endswith(key) for name in other.scan_iter(match=f"*{key}"))
    assert cache.get(key) == "shared"
    cache.delete(key)
