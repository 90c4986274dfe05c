"""Backend names for models and the admin, without loading any backend; the registry agrees with them at boot."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from resource_server.backend_kinds import BACKEND_CHOICES, BACKEND_KINDS, backend_config_errors
from resource_server.dispatch.direct import DirectConfig
from resource_server.dispatch.local import LocalConfig
from resource_server.dispatch.registry import BACKENDS, Registered, registered

ROOT = Path(__file__).resolve().parents[2]
# What a backend brings with it: none of it belongs in a process that only sets Django up (manage.py, admin).
BACKEND_MODULES = (
    "globus_compute_sdk",
    "resource_server.dispatch.registry",
    "resource_server.dispatch.direct",
    "resource_server.dispatch.compute",
    "resource_server.dispatch.globus_compute",
    "resource_server.dispatch.local",
    "resource_server.adapters.relay",
    "resource_server.services.relay",
)


def test_setting_up_django_loads_no_backend_sdk_or_relay() -> None:
    probe = (
        "import json, os, sys\n"
        "os.environ['DJANGO_SETTINGS_MODULE'] = 'gateway.settings'\n"
        "import django\n"
        "django.setup()\n"
        "import resource_server.models, resource_server.admin\n"
        f"print(json.dumps([name for name in {BACKEND_MODULES!r} if name in sys.modules]))\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "DJANGO_SETTINGS_MODULE"}
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_every_backend_kind_is_registered_with_its_config_model() -> None:
    assert set(BACKENDS) == set(BACKEND_KINDS) == {name for name, _label in BACKEND_CHOICES}
    for name, kind in BACKEND_KINDS.items():
        assert kind.config_model() is BACKENDS[name].config_model


def test_a_registry_that_differs_from_the_backend_kinds_fails_at_import() -> None:
    with pytest.raises(ImproperlyConfigured, match="name different backends"):
        registered({"direct": BACKENDS["direct"]})
    swapped = {**BACKENDS, "direct": Registered(LocalConfig, BACKENDS["direct"].build)}
    with pytest.raises(ImproperlyConfigured, match=re.escape("resource_server.dispatch.direct:DirectConfig")):
        registered(swapped)
    assert BACKENDS["direct"].config_model is DirectConfig


def test_backend_config_errors_name_the_field_or_the_unknown_backend() -> None:
    assert backend_config_errors("direct", {"base_url": "http://node1:8000/v1"}) == []
    assert backend_config_errors("direct", {"base_url": "http://node1:8000/v1", "api_key_env": "lower"}) == [
        "api_key_env: String should match pattern '^[A-Z_][A-Z0-9_]*$'"
    ]
    assert backend_config_errors("nope", {}) == ["Unknown backend 'nope'; choose one of direct, globus_compute, local."]
