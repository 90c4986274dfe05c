from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from resource_server.auth.api_keys import api_key_hash
from resource_server.models import ApiKey, Endpoint

pytestmark = pytest.mark.django_db


def test_create_api_key_prints_the_key_once_and_stores_its_hash() -> None:
    out, err = StringIO(), StringIO()
    call_command("create_api_key", "--user", "ada@anl.gov", "--expires-days", "30", stdout=out, stderr=err)
    key = out.getvalue().strip()
    row = ApiKey.objects.select_related("owner").get()
    assert row.owner.username == "ada@anl.gov"
    assert row.secret_hash == api_key_hash(key)
    assert key not in err.getvalue()
    assert row.expires_at is not None


def test_create_api_key_refuses_a_non_positive_expiry() -> None:
    with pytest.raises(CommandError):
        call_command("create_api_key", "--user", "ada@anl.gov", "--expires-days", "0")


def test_seed_demo_is_idempotent() -> None:
    call_command("seed_demo", "--model-url", "http://127.0.0.1:9/v1", stderr=StringIO())
    call_command("seed_demo", "--model-url", "http://127.0.0.1:10/v1", stderr=StringIO())
    direct, local = Endpoint.objects.order_by("model")
    assert (direct.model, direct.backend_config) == ("demo-model", {"base_url": "http://127.0.0.1:10/v1"})
    assert (local.model, local.cluster.name, local.backend) == ("demo-model-hpc", "local-hpc", "local")
    assert local.backend_config["vllm"] == {"host": "127.0.0.1", "port": 10}
