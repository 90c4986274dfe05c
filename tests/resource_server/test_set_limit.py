"""`python manage.py set_limit`: one scope, one row per scope and narrowing, 0 removes, clear errors."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from resource_server.models import Cluster, Endpoint, Limit, Project, User
from resource_server.services.api_keys import api_key_create

pytestmark = pytest.mark.django_db

GROUP = uuid.UUID("5d0f3a5e-8c4b-4f7e-9a51-2b3c4d5e6f70")


@pytest.fixture
def ada() -> User:
    return User.objects.create(identity_id="id-ada", username="ada@anl.gov")


@pytest.fixture
def endpoint() -> Endpoint:
    cluster = Cluster.objects.create(name="polaris")
    return Endpoint.objects.create(
        cluster=cluster, model="meta-llama/Llama-3.1-8B-Instruct", backend="direct", backend_config={}
    )


def set_limit(*arguments: str) -> str:
    out = StringIO()
    call_command("set_limit", *arguments, stdout=out)
    return out.getvalue().strip()


def test_user_limit_is_created_and_printed_in_words(ada: User) -> None:
    printed = set_limit("--user", "ada@anl.gov", "--concurrent", "4", "--rpm", "60", "--tokens-per-day", "1000000")
    limit = Limit.objects.get()
    assert (limit.user, limit.concurrent, limit.requests_per_minute, limit.tokens_per_day) == (ada, 4, 60, 1_000_000)
    assert limit.tokens_per_minute is None
    assert printed == (
        "Created: user ada@anl.gov: 4 concurrent requests, 60 requests per minute, 1,000,000 tokens per UTC day"
    )


def test_second_call_updates_the_same_row_and_keeps_what_it_does_not_name(ada: User) -> None:
    set_limit("--user", "ada@anl.gov", "--concurrent", "4", "--rpm", "60")
    printed = set_limit("--user", "ada@anl.gov", "--rpm", "120", "--tpm", "50000")
    limit = Limit.objects.get()
    assert (limit.concurrent, limit.requests_per_minute, limit.tokens_per_minute) == (4, 120, 50_000)
    assert printed.startswith("Updated: user ada@anl.gov: 4 concurrent requests, 120 requests per minute")
    assert set_limit("--user", "ada@anl.gov", "--rpm", "120").startswith("Unchanged: ")


def test_zero_removes_one_limit_and_the_row_goes_with_the_last(ada: User) -> None:
    set_limit("--user", "ada@anl.gov", "--concurrent", "4", "--rpm", "60")
    set_limit("--user", "ada@anl.gov", "--rpm", "0")
    limit = Limit.objects.get()
    assert (limit.concurrent, limit.requests_per_minute) == (4, None)
    assert set_limit("--user", "ada@anl.gov", "--concurrent", "0") == "Deleted: user ada@anl.gov: no limit"
    assert not Limit.objects.exists()


def test_narrowings_are_separate_rows(ada: User, endpoint: Endpoint) -> None:
    set_limit("--user", "ada@anl.gov", "--rpm", "60")
    on_model = set_limit("--user", "ada@anl.gov", "--model", endpoint.model, "--rpm", "10")
    on_endpoint = set_limit("--user", "ada@anl.gov", "--endpoint", str(endpoint.pk), "--concurrent", "2")
    assert Limit.objects.count() == 3
    assert on_model == f"Created: user ada@anl.gov on {endpoint.model}: 10 requests per minute"
    assert on_endpoint == f"Created: user ada@anl.gov on endpoint {endpoint}: 2 concurrent requests"
    assert Limit.objects.get(model="", endpoint=None).requests_per_minute == 60


def test_key_scope_by_prefix(ada: User) -> None:
    key, _ = api_key_create(owner=ada, name="workflow")
    set_limit("--key", key.prefix, "--tpm", "20000")
    assert Limit.objects.get().api_key == key


def test_everyone_scope(ada: User) -> None:
    assert set_limit("--everyone", "--concurrent", "8") == "Created: everyone: 8 concurrent requests"
    assert Limit.objects.get().everyone


def test_project_by_name_and_by_group() -> None:
    project = Project.objects.create(name="climate", globus_group=GROUP)
    set_limit("--project", "climate", "--tokens-per-month", "5000000")
    printed = set_limit("--project", str(GROUP), "--tokens-per-day", "300000")
    limit = Limit.objects.get()
    assert (limit.project, limit.tokens_per_month, limit.tokens_per_day) == (project, 5_000_000, 300_000)
    assert printed.startswith("Updated: project climate: ")


def test_project_for_a_new_group_is_created_only_with_a_name() -> None:
    with pytest.raises(CommandError, match=r"No project has the Globus group .*--project-name"):
        set_limit("--project", str(GROUP), "--rpm", "100")
    assert not Project.objects.exists()
    set_limit("--project", str(GROUP), "--project-name", "climate", "--rpm", "100")
    project = Project.objects.get()
    assert (project.name, project.globus_group) == ("climate", GROUP)
    assert Limit.objects.get().project == project


def test_allocation_needs_its_period_and_zero_removes_the_period_too() -> None:
    Project.objects.create(name="climate", globus_group=GROUP)
    with pytest.raises(CommandError, match="allocation_ends: An allocation needs the start and end of its period"):
        set_limit("--project", "climate", "--allocation-tokens", "1000000")
    with pytest.raises(CommandError, match="must end after it starts"):
        set_limit(
            "--project", "climate", "--allocation-tokens", "1000000",
            "--allocation-starts", "2026-07-01", "--allocation-ends", "2026-01-01",
        )  # fmt: skip
    printed = set_limit(
        "--project", "climate", "--allocation-tokens", "1000000",
        "--allocation-starts", "2026-01-01", "--allocation-ends", "2026-07-01T12:00",
    )  # fmt: skip
    limit = Limit.objects.get()
    assert (limit.allocation_starts, limit.allocation_ends) == (
        datetime(2026, 1, 1, tzinfo=UTC),
        datetime(2026, 7, 1, 12, tzinfo=UTC),
    )
    assert printed == (
        "Created: project climate: 1,000,000 tokens in the allocation from 2026-01-01 00:00 UTC to 2026-07-01 12:00 UTC"
    )
    set_limit("--project", "climate", "--rpm", "10")
    set_limit("--project", "climate", "--allocation-tokens", "0")
    limit.refresh_from_db()
    assert (limit.allocation_tokens, limit.allocation_starts, limit.allocation_ends) == (None, None, None)
    with pytest.raises(CommandError, match="An allocation period needs its tokens"):
        set_limit("--project", "climate", "--allocation-starts", "2026-01-01", "--allocation-ends", "2026-02-01")


def test_exempt_and_not_exempt(ada: User) -> None:
    printed = set_limit("--user", "ada@anl.gov", "--exempt")
    ada.refresh_from_db()
    assert ada.limits_exempt
    assert (
        printed == "Unchanged: user ada@anl.gov: no limit; ada@anl.gov is exempt from every limit (a service account)"
    )
    assert not Limit.objects.exists()
    set_limit("--user", "ada@anl.gov", "--not-exempt")
    ada.refresh_from_db()
    assert not ada.limits_exempt
    with pytest.raises(CommandError, match="Only a user can be exempt"):
        set_limit("--everyone", "--exempt")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (("--user", "nobody@anl.gov", "--rpm", "1"), "No user is named 'nobody@anl.gov'"),
        (("--key", "igw_nope", "--rpm", "1"), "No API key has the prefix 'igw_nope'"),
        (("--project", "nope", "--rpm", "1"), "No project is named 'nope'"),
        (("--user", "ada@anl.gov", "--endpoint", "999", "--rpm", "1"), "No endpoint has the id 999"),
        (("--user", "ada@anl.gov", "--model", "lama-typo", "--rpm", "1"), "No endpoint serves the model 'lama-typo'"),
        (("--user", "ada@anl.gov", "--rpm", "-5"), "argument --rpm: -5 is negative"),
        (("--user", "ada@anl.gov", "--tpm", "lots"), "argument --tpm: 'lots' is not a whole number"),
        (("--user", "ada@anl.gov", "--everyone", "--rpm", "1"), "not allowed with argument"),
        (
            (
                "--rpm",
                "1",
            ),
            "one of the arguments --user --key --project --everyone is required",
        ),
        (("--user", "ada@anl.gov", "--project-name", "x", "--rpm", "1"), "only given with a project's Globus group"),
        (("--user", "ada@anl.gov", "--allocation-starts", "soon"), "'soon' is not a date"),
    ],
)
def test_bad_input_is_a_clear_command_error(ada: User, arguments: tuple[str, ...], message: str) -> None:
    with pytest.raises(CommandError, match=message):
        set_limit(*arguments)
    assert not Limit.objects.exists()
    assert not User.objects.get().limits_exempt
