"""The daily rollup (UsageDaily) is kept by the usage writer in the transaction that inserts the rows, from the
rows really inserted: it always equals the raw rows summed per day, user, project, key, model and endpoint, through
replayed journals, refused rows, dead letters replayed, and request ids seen twice.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from django.db import transaction
from django.db.models import Count, FloatField, Q, Sum, Value
from django.db.models.functions import Coalesce, TruncDate

from resource_server.models import Cluster, Endpoint, Project, RequestLog, UsageDaily, User
from resource_server.services.usage import UsageRecord, UsageSink, _insert_rows, journal_line
from tests.resource_server.services.conftest import usage_sink

pytestmark = pytest.mark.django_db(transaction=True)

NOON = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)


@pytest.fixture
def world() -> dict[str, Any]:
    cluster = Cluster.objects.create(name="polaris")
    return {
        "ada": User.objects.create(identity_id="id-ada", username="ada@anl.gov"),
        "bob": User.objects.create(identity_id="id-bob", username="bob@uchicago.edu"),
        "project": Project.objects.create(name="climate", globus_group=uuid.uuid4()),
        "endpoint": Endpoint.objects.create(
            cluster=cluster, framework="vllm", model="m1", backend="direct", backend_config={"base_url": "http://x"}
        ),
    }


def _record(user: User, n: int = 0, **fields: Any) -> UsageRecord:
    record = UsageRecord(
        request_id=uuid.uuid4().hex,
        user_id=user.pk,
        route="chat/completions",
        created_at=NOON - timedelta(days=n % 3, minutes=n),
        model=f"m{n % 2}",
        api_key_prefix=f"igw_{n % 2:012d}",
        status_code=200 if n % 5 else 429,
        prompt_tokens=10 + n,
        completion_tokens=n,
        total_tokens=10 + 2 * n,
        latency_ms=1.5 * n,
    )
    for name, value in fields.items():
        setattr(record, name, value)
    return record


def _batch(world: dict[str, Any], size: int, offset: int = 0) -> list[UsageRecord]:
    records = []
    for n in range(offset, offset + size):
        user = world["ada"] if n % 3 else world["bob"]
        extra: dict[str, Any] = {}
        if n % 4 == 0:
            extra["endpoint_id"] = world["endpoint"].pk
        if n % 7 == 0:
            extra["project_id"] = world["project"].pk
        if n % 11 == 0:
            extra["total_tokens"] = None  # a row whose usage the model server did not report
            extra["prompt_tokens"] = None
            extra["completion_tokens"] = None
        records.append(_record(user, n, **extra))
    return records


def _insert(batch: list[UsageRecord]) -> None:
    with transaction.atomic():
        _insert_rows(batch)


def _rows_summed() -> dict[tuple[Any, ...], tuple[Any, ...]]:
    """The raw rows summed as the rollup keeps them."""
    totals = (
        RequestLog.objects.annotate(day=TruncDate("created_at"))
        .values("day", "user_id", "project_id", "api_key_prefix", "model", "endpoint_id")
        .annotate(
            requests=Count("id"),
            errors=Count("id", filter=Q(status_code__gte=400)),
            prompt=Coalesce(Sum("prompt_tokens"), 0),
            completion=Coalesce(Sum("completion_tokens"), 0),
            total=Coalesce(Sum("total_tokens"), 0),
            latency=Coalesce(Sum("latency_ms"), Value(0.0), output_field=FloatField()),
        )
        .order_by()
    )
    return {
        (
            row["day"],
            row["user_id"],
            row["project_id"] or 0,
            row["api_key_prefix"],
            row["model"],
            row["endpoint_id"] or 0,
        ): (
            row["requests"],
            row["errors"],
            row["prompt"],
            row["completion"],
            row["total"],
            round(row["latency"], 6),
        )
        for row in totals
    }


def _rollup() -> dict[tuple[Any, ...], tuple[Any, ...]]:
    return {
        (row.day, row.user_id, row.project_id, row.api_key_prefix, row.model, row.endpoint_id): (
            row.requests,
            row.errors,
            row.prompt_tokens,
            row.completion_tokens,
            row.total_tokens,
            round(row.latency_ms_sum, 6),
        )
        for row in UsageDaily.objects.all()
    }


def _requests_counted() -> int:
    return int(UsageDaily.objects.aggregate(total=Sum("requests"))["total"] or 0)


def test_rows_and_rollup_agree_after_several_batches(world: dict[str, Any]) -> None:
    _insert(_batch(world, 40))
    _insert(_batch(world, 25, offset=40))  # adds to the rows the first batch made
    assert RequestLog.objects.count() == 65
    assert _rollup() == _rows_summed()
    assert _requests_counted() == 65
    ada_m1 = UsageDaily.objects.filter(user_id=world["ada"].pk, model="m1")
    assert ada_m1.aggregate(errors=Sum("errors"))["errors"] == sum(
        1 for n in range(65) if n % 3 and n % 2 and n % 5 == 0
    )


def test_a_replayed_batch_is_not_counted_twice(world: dict[str, Any]) -> None:
    batch = _batch(world, 30)
    _insert(batch[:20])
    _insert(batch)  # a journal replayed after its first 20 rows went in
    _insert(batch)
    assert RequestLog.objects.count() == 30
    assert _requests_counted() == 30
    assert _rollup() == _rows_summed()


def test_a_request_id_twice_in_one_batch_counts_once(world: dict[str, Any]) -> None:
    record = _record(world["ada"], 1)
    again = _record(world["ada"], 1, request_id=record.request_id, total_tokens=999)
    _insert([record, again])
    assert _requests_counted() == 1
    assert _rollup() == _rows_summed()
    assert UsageDaily.objects.get().total_tokens == record.total_tokens  # the row that went in: the first


def test_a_batch_with_more_keys_than_one_statement_takes_is_counted_whole(world: dict[str, Any]) -> None:
    batch = [_record(world["ada"], n, model=f"model-{n}") for n in range(1200)]  # 1,200 rollup keys
    _insert(batch)
    _insert(batch[:700])  # replayed: nothing added
    assert _requests_counted() == 1200
    assert _rollup() == _rows_summed()


def test_the_day_is_the_utc_date_of_the_request(world: dict[str, Any]) -> None:
    chicago = timezone(timedelta(hours=-6))
    late = _record(world["ada"], created_at=datetime(2026, 11, 20, 21, 30, tzinfo=chicago))  # 03:30 UTC next day
    _insert([late])
    assert UsageDaily.objects.get().day.isoformat() == "2026-11-21"


def test_a_batch_with_a_refused_row_keeps_the_rollup_equal_to_the_rows(world: dict[str, Any], sink: UsageSink) -> None:
    good = _batch(world, 12)
    orphan = _record(world["ada"], 3, user_id=world["bob"].pk + 10_000)  # a user deleted since: refused for good
    negative = _record(world["bob"], 4, prompt_tokens=-1)  # refused by the column's CHECK
    for record in [*good[:5], orphan, *good[5:9], negative, *good[9:]]:
        sink.record(record)
    assert sink.flush(timeout=20)
    assert sink.dead_lettered == 2
    assert RequestLog.objects.count() == 12
    assert _requests_counted() == 12, "the refused rows' halves were rolled back with them, and counted once"
    assert _rollup() == _rows_summed()


def test_a_row_whose_endpoint_was_deleted_is_counted_without_it(world: dict[str, Any], sink: UsageSink) -> None:
    gone = world["endpoint"].pk + 1000
    record = _record(world["ada"], 1, endpoint_id=gone)  # refused (foreign key), then stored without the endpoint
    sink.record(record)
    sink.record(_record(world["ada"], 2))
    assert sink.flush(timeout=20)
    assert sink.dead_lettered == 0
    assert _requests_counted() == 2
    assert _rollup() == _rows_summed()
    assert not UsageDaily.objects.filter(endpoint_id=gone).exists()


def test_a_journal_replayed_by_the_next_start_is_counted_once(world: dict[str, Any], tmp_path: Path) -> None:
    written = _batch(world, 6)
    _insert(written)  # in the database, but the worker was killed before it trimmed its journal
    unwritten = _batch(world, 4, offset=6)
    spool = tmp_path / "usage-spool"
    spool.mkdir()
    (spool / "usage-1234-1.jsonl").write_bytes(b"".join(journal_line(record) for record in [*written, *unwritten]))
    sink = usage_sink(tmp_path)
    sink.start()
    try:
        assert sink.flush(timeout=20)
    finally:
        sink.stop(timeout=10)
    assert RequestLog.objects.count() == 10
    assert _requests_counted() == 10
    assert _rollup() == _rows_summed()


def test_a_dead_letter_replayed_after_its_fix_is_counted_once(world: dict[str, Any], tmp_path: Path) -> None:
    missing = world["bob"].pk + 10_000
    orphan = _record(world["ada"], 2, user_id=missing)
    first = usage_sink(tmp_path)
    first.record(orphan)
    first.record(_record(world["ada"], 1))
    try:
        assert first.flush(timeout=20)
    finally:
        first.stop(timeout=10)
    assert _requests_counted() == 1, "a refused row is not counted"
    (letter,) = (tmp_path / "usage-dead-letter").glob("*.jsonl")
    User.objects.create(pk=missing, identity_id="id-restored", username="restored@anl.gov")  # the fix
    letter.rename(tmp_path / "usage-spool" / "usage-replay-1.jsonl")  # as the admin guide says
    second = usage_sink(tmp_path)
    second.start()
    try:
        assert second.flush(timeout=20)
    finally:
        second.stop(timeout=10)
    assert _requests_counted() == 2
    assert UsageDaily.objects.filter(user_id=missing).get().requests == 1
    assert _rollup() == _rows_summed()
