"""The UsageSink against the real database (SQLite, or PostgreSQL when DATABASE_URL is set).

Odd text a client controls is made storable; a record the database refuses for good is set aside in the
dead-letter file and never holds back the rest, whether it arrives live or from a journal left by a
stopped worker; records are journaled, and a live worker's journal is never adopted by another.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from django.db import connection

from resource_server.models import RequestLog, User
from resource_server.services.usage import DeadLetter, UsageJournal, UsageRecord, UsageSink, journal_line
from tests.conftest import Seeded
from tests.resource_server.services.conftest import usage_sink

pytestmark = pytest.mark.django_db(transaction=True)

MEGABYTE = 1024 * 1024


def _record(seeded: Seeded, **fields: object) -> UsageRecord:
    record = UsageRecord(request_id=uuid.uuid4().hex, user_id=seeded.user.pk, route="chat/completions")
    record.api_key_id = seeded.api_key.pk
    record.endpoint_id = seeded.endpoint.pk
    for name, value in fields.items():
        setattr(record, name, value)
    return record


def _dead_letters(tmp_path: Path) -> list[dict[str, object]]:
    return [
        orjson.loads(line)
        for path in sorted((tmp_path / "usage-dead-letter").glob("*.jsonl"))
        for line in path.read_bytes().splitlines()
    ]


def _journal_bytes(tmp_path: Path) -> int:
    return sum(path.stat().st_size for path in (tmp_path / "usage-spool").iterdir())


def test_unstorable_text_is_made_storable_and_every_row_is_written(
    seeded: Seeded, sink: UsageSink, tmp_path: Path
) -> None:
    records = {
        "nul": _record(seeded, model="demo-model\x00"),
        "surrogate": _record(seeded, model="demo-\ud800model"),
        "megabyte": _record(seeded, model="m" * MEGABYTE),
        "body": _record(
            seeded,
            model="demo-model",
            request_body={"messages": [{"role": "user", "content": "a\x00b\udfff"}], "user\x00": "x" * MEGABYTE},
            response_body={"choices": [{"text": "\x00"}]},
        ),
    }
    for record in records.values():
        sink.record(record)
    assert sink.flush(timeout=20)
    rows = {name: RequestLog.objects.get(request_id=record.request_id) for name, record in records.items()}
    assert rows["nul"].model == "demo-model\ufffd"
    assert rows["surrogate"].model == "demo-\ufffdmodel"
    assert rows["megabyte"].model == "m" * 255  # the column's size
    body = rows["body"].request_body
    assert body["messages"][0]["content"] == "a\ufffdb\ufffd"
    assert body["user\ufffd"] == "x" * MEGABYTE
    assert rows["body"].response_body == {"choices": [{"text": "\ufffd"}]}
    assert sink.dead_lettered == 0


def test_a_row_the_database_refuses_is_set_aside_and_the_others_are_written(
    seeded: Seeded, sink: UsageSink, tmp_path: Path
) -> None:
    good = [_record(seeded, model=f"good-{n}") for n in range(5)]
    # Rows the database refuses whatever their text: a user deleted since, a count its CHECK forbids.
    orphan = _record(seeded, user_id=seeded.user.pk + 10_000)
    negative = _record(seeded, prompt_tokens=-1)
    for record in (good[0], orphan, good[1], good[2], negative, good[3]):
        sink.record(record)
    assert sink.flush(timeout=20)
    later = good[4]
    sink.record(later)
    assert sink.flush(timeout=20), "a refused row must not hold back the rows behind it"
    written = set(RequestLog.objects.values_list("request_id", flat=True))
    assert {record.request_id for record in good} <= written
    assert orphan.request_id not in written and negative.request_id not in written
    assert sink.dead_lettered == 2
    letters = {letter["request_id"]: letter for letter in _dead_letters(tmp_path)}
    assert set(letters) == {orphan.request_id, negative.request_id}
    assert "IntegrityError" in str(letters[orphan.request_id]["dead_letter"])
    sink.stop(timeout=10)
    assert _journal_bytes(tmp_path) == 0, "a stop with everything written leaves no journal"


@pytest.mark.skipif(connection.vendor != "postgresql", reason="SQLite stores any integer")
def test_a_value_postgresql_rejects_is_set_aside(seeded: Seeded, sink: UsageSink, tmp_path: Path) -> None:
    huge = _record(seeded, prompt_tokens=2**31)  # integer out of range: DataError
    good = _record(seeded)
    sink.record(huge)
    sink.record(good)
    assert sink.flush(timeout=20)
    assert RequestLog.objects.filter(request_id=good.request_id).exists()
    assert [letter["request_id"] for letter in _dead_letters(tmp_path)] == [huge.request_id]
    assert "DataError" in str(_dead_letters(tmp_path)[0]["dead_letter"])


def test_a_journal_left_by_a_stopped_worker_is_replayed_and_its_refused_rows_set_aside(
    seeded: Seeded, tmp_path: Path
) -> None:
    good = _record(seeded, model="demo-model")
    orphan = _record(seeded, user_id=seeded.user.pk + 10_000)
    nul = _record(seeded)
    nul_line = journal_line(nul).replace(b'"model":""', b'"model":"demo-model\\u0000"')  # as an old worker wrote it
    already = _record(seeded)
    spool = tmp_path / "usage-spool"
    spool.mkdir()
    torn = journal_line(_record(seeded))[:40]  # the worker was killed mid-write
    journal = b"".join([journal_line(already), journal_line(good), journal_line(orphan), nul_line, torn])
    (spool / "usage-1234-1.jsonl").write_bytes(journal)
    sink = usage_sink(tmp_path)
    sink.record(already)  # inserted before the journal is replayed: must not be written twice
    try:
        assert sink.flush(timeout=20)
        assert RequestLog.objects.get(request_id=nul.request_id).model == "demo-model\ufffd"
        assert RequestLog.objects.filter(request_id__in=[good.request_id, already.request_id]).count() == 2
        assert not RequestLog.objects.filter(request_id=orphan.request_id).exists()
        assert sink.dead_lettered == 2  # the orphan and the torn line
        assert not (spool / "usage-1234-1.jsonl").exists(), "a replayed journal is deleted once settled"
    finally:
        sink.stop(timeout=10)


def test_a_live_workers_journal_is_not_adopted_by_another(seeded: Seeded, tmp_path: Path) -> None:
    sink = usage_sink(tmp_path)
    sink.record(_record(seeded))
    assert sink.flush(timeout=20)
    try:
        unwritten = _record(seeded)
        sink.journal.append([journal_line(unwritten)], 1)  # journaled, not yet written
        other = UsageJournal(tmp_path / "usage-spool", sink.dead_letter)
        assert other.adopt() == [], "its owner is alive and will write it"
    finally:
        sink.stop(timeout=10)
    # Stopped with a record it never wrote: the next start finds it.
    found = UsageJournal(tmp_path / "usage-spool", sink.dead_letter).adopt()
    assert unwritten.request_id in {record.request_id for record in found}


def test_a_dead_letter_file_moved_into_the_spool_is_replayed_once_its_cause_is_fixed(
    seeded: Seeded, tmp_path: Path
) -> None:
    missing_user = seeded.user.pk + 10_000
    orphan = _record(seeded, user_id=missing_user, model="demo-model")
    first = usage_sink(tmp_path)
    first.record(orphan)
    try:
        assert first.flush(timeout=20)
    finally:
        first.stop(timeout=10)
    (letter,) = (tmp_path / "usage-dead-letter").glob("*.jsonl")
    User.objects.create(pk=missing_user, identity_id="id-restored", username="restored@anl.gov")  # the fix
    letter.rename(tmp_path / "usage-spool" / "usage-replay-1.jsonl")  # as the admin guide says
    second = usage_sink(tmp_path)
    second.start()
    try:
        assert second.flush(timeout=20)
        assert RequestLog.objects.get(request_id=orphan.request_id).user_id == missing_user
        assert second.dead_lettered == 0
        assert not list((tmp_path / "usage-spool").glob("usage-*.jsonl"))
    finally:
        second.stop(timeout=10)


def test_the_journal_is_emptied_once_its_records_are_settled(tmp_path: Path) -> None:
    journal = UsageJournal(tmp_path, DeadLetter(tmp_path / "dead"), trim_bytes=1)
    lines = [b'{"n": %d}\n' % n for n in range(3)]
    journal.append(lines[:2], 2)
    journal.append(lines[2:], 1)
    (path,) = tmp_path.glob("usage-*.jsonl")
    assert path.read_bytes() == b"".join(lines)
    journal.settle(2)
    assert path.read_bytes() == b"".join(lines), "one record is not yet written"
    journal.settle(1)
    assert path.read_bytes() == b""
    journal.append(lines[:1], 1)
    assert path.read_bytes() == lines[0]
    assert journal.close() == 1 and path.exists(), "an unwritten record stays for the next start"


def test_a_record_handed_over_after_stop_is_journaled_for_the_next_start(seeded: Seeded, tmp_path: Path) -> None:
    sink = usage_sink(tmp_path)
    sink.start()
    sink.stop(timeout=10)
    late = _record(seeded)  # a stream cancelled at shutdown finishes after the writer stopped
    sink.record(late)
    assert sink.journal.close() == 1  # what the process's exit does: the file stays, its lock goes
    found = UsageJournal(tmp_path / "usage-spool", sink.dead_letter).adopt()
    assert [record.request_id for record in found] == [late.request_id]


def test_records_reach_the_journal_long_before_the_next_insert_is_due(seeded: Seeded, tmp_path: Path) -> None:
    """What a killed worker can lose is bounded by the journal's write pace, not by the insert batching.

    With inserts (and fsyncs) paced 30 s apart, a record handed over just after another one is still in the
    journal file within a moment: the kernel keeps it for the next start whatever happens to the process.
    """
    slow = UsageSink(
        batch_size=50,
        flush_seconds=30,
        spool_dir=tmp_path / "usage-spool",
        dead_letter_dir=tmp_path / "usage-dead-letter",
    )
    try:
        first, second = _record(seeded), _record(seeded)
        slow.record(first)
        assert _wait_for_journal(tmp_path, first.request_id)
        slow.record(second)
        assert _wait_for_journal(tmp_path, second.request_id), "the second record waited for the insert pace"
    finally:
        slow.stop(timeout=10)


def _wait_for_journal(tmp_path: Path, request_id: str, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(request_id.encode() in path.read_bytes() for path in (tmp_path / "usage-spool").glob("*.jsonl")):
            return True
        time.sleep(0.01)
    return False


def test_open_marks_are_dropped_as_records_arrive_and_leave_nothing_at_a_clean_stop(
    seeded: Seeded, tmp_path: Path
) -> None:
    sink = usage_sink(tmp_path)
    marks = tmp_path / "usage-spool"
    try:
        records = [_record(seeded, model="demo-model", request_body={"prompt": "x" * 200}) for _ in range(2000)]
        for record in records:
            sink.opened(record)
        assert _wait_until(lambda: _bytes(marks, "opened-*.jsonl") > 64 * 1024), "requests in flight are marked"
        for record in records:
            sink.record(record)
        assert sink.flush(timeout=20)
        # Released marks are trimmed away: the file does not grow with the number of requests.
        assert _wait_until(lambda: _bytes(marks, "opened-*.jsonl") == 0)
    finally:
        sink.stop(timeout=10)
    assert not list(marks.glob("opened-*.jsonl")), "a clean stop leaves no open marks"
    assert RequestLog.objects.filter(user=seeded.user).count() == 2000


def _bytes(directory: Path, pattern: str) -> int:
    return sum(path.stat().st_size for path in directory.glob(pattern))


def _wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False
