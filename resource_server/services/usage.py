"""The UsageSink: one RequestLog row per inference request, written off the request path.

Requests hand records to an in-memory queue and never wait on the database or the disk. A background
thread makes their text storable and appends them to a journal file as they come (one write per
JOURNAL_WRITE_SECONDS at most, one fsync per USAGE_FLUSH_SECONDS); another inserts them, one transaction
per USAGE_FLUSH_SECONDS under load. Once every journaled record is in the database the journal is trimmed.
A worker killed with SIGKILL therefore loses only the records handed over in its last JOURNAL_WRITE_SECONDS
(what the kernel holds survives the process); a power cut, those of the last USAGE_FLUSH_SECONDS. Whatever
was journaled is replayed by the next worker that starts. The request id is the rows' unique key, so a
record replayed after it was inserted is skipped, not written twice.

A request on its way to a model server is marked open in a second file, and the mark is dropped once its
record is journaled. A worker killed mid-request leaves the mark behind: the next start records that
request as lost with the worker (status 500, `worker_lost`) unless its own record arrived after all.

A record the database refuses for a reason that will not go away (a value it cannot hold, a user deleted
since the request) is found by bisecting the batch and set aside in a dead-letter file, with a log line
and a counter; it never holds back the records behind it.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import fcntl
import functools
import logging
import os
import queue
import re
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from django.conf import settings
from django.db import (
    IntegrityError,
    InterfaceError,
    OperationalError,
    ProgrammingError,
    close_old_connections,
    connections,
    models,
    router,
    transaction,
)
from django.db.models import Q
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from resource_server.db import connections_prepare
from resource_server.models import ApiKey, RequestLog, UsageDaily

logger = logging.getLogger(__name__)

# Errors that say nothing about the rows: the database is unreachable, restarting, locked, or its schema
# or grants are not (yet) what this code expects (a deploy whose migration has not run). The batch waits
# in the journal and is retried. Every other error may be caused by one row and is bisected down to it.
TRANSIENT_ERRORS = (OperationalError, InterfaceError, ProgrammingError)
_REPLACEMENT = "\ufffd"
_SURROGATES = re.compile("[\ud800-\udfff]")
# A live journal, one left by a killed worker, or one an older version was replaying when it stopped.
_JOURNAL_GLOBS = ("usage-*.jsonl", "usage-*.replaying")
# Requests on their way to a model server, one line each (see UsageSink.opened).
_OPEN_GLOB = "opened-*.jsonl"
LOST_STATUS, LOST_ERROR_CODE = 500, "worker_lost"
_MAX_BACKOFF_SECONDS = 10.0
# How long the journal thread gathers records before one write: what a killed process can lose. Short, as a
# write to the page cache costs microseconds; the fsync that guards against a power cut is paced apart.
JOURNAL_WRITE_SECONDS = 0.01


def storable_text(text: str, limit: int | None = None) -> str:
    """`text` as any database can hold it: NUL and lone surrogates become U+FFFD, cut to `limit` characters.

    PostgreSQL text cannot hold NUL, and no UTF-8 encoder (psycopg's, SQLite's, orjson's) accepts a lone
    surrogate, which a client can send as a JSON escape. Replacing rather than dropping them keeps a trace
    that the client sent something odd.
    """
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = _SURROGATES.sub(_REPLACEMENT, text)
    if "\x00" in text:
        text = text.replace("\x00", _REPLACEMENT)
    if limit is not None and len(text) > limit:
        text = text[:limit]
    return text


def storable_json(value: Any) -> Any:
    """A JSON value with every string and key made storable (PostgreSQL's jsonb refuses \\u0000 too)."""
    if isinstance(value, str):
        return storable_text(value)
    if isinstance(value, dict):
        return {storable_text(str(key)): storable_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [storable_json(item) for item in value]
    return value


@dataclass(slots=True)
class UsageRecord:
    # The gateway's own id (uuid4 hex): the row's unique key, never chosen by the client.
    request_id: str
    user_id: int
    route: str
    api_key_id: int | None = None
    api_key_prefix: str = ""
    project_id: int | None = None  # the project the request is charged to (the admit stage decides)
    # The client's X-Request-ID when it sent a sane one: stored beside the key, not unique.
    client_request_id: str = ""
    created_at: datetime = field(default_factory=timezone.now)
    model: str = ""
    endpoint_id: int | None = None
    gateway_route: str = ""  # the X-Gateway-Route header: cluster, endpoint and why it was chosen
    streamed: bool = False
    status_code: int = 200
    error_code: str = ""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    audio_seconds: int | None = None  # the audio routes' usage when not streamed (vLLM reports no tokens then)
    latency_ms: float = 0.0
    time_to_first_token_ms: float | None = None
    request_body: Any = None
    response_body: Any = None

    def set_usage(self, usage: object) -> None:
        """Take token counts (or an audio's duration) exactly as the model server reported them; never estimate."""
        if not isinstance(usage, dict):
            return
        seconds = usage.get("seconds")
        if usage.get("type") == "duration" and isinstance(seconds, int) and seconds >= 0:
            self.audio_seconds = seconds
        for name in ("prompt_tokens", "completion_tokens", "total_tokens"):
            value = usage.get(name)
            if isinstance(value, int) and value >= 0:
                setattr(self, name, value)

    def make_storable(self) -> None:
        """Make the text fields fit their columns (cheap when they already do, as nearly all will)."""
        for name, limit in _TEXT_LIMITS:
            value = getattr(self, name)
            if not isinstance(value, str):
                value = str(value)
            elif value.isascii() and len(value) <= limit and "\x00" not in value:
                continue
            setattr(self, name, storable_text(value, limit))

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _FIELDS}


_FIELDS = tuple(item.name for item in dataclasses.fields(UsageRecord))
_TEXT_LIMITS = tuple(
    (column.attname, column.max_length)
    for column in RequestLog._meta.concrete_fields
    if isinstance(column, models.CharField) and column.max_length is not None and column.attname in _FIELDS
)


def journal_line(record: UsageRecord) -> bytes:
    """The record as one JSON line, its text made storable first (bodies only when they need it)."""
    record.make_storable()
    try:
        line = orjson.dumps(record)  # orjson reads the dataclass itself: faster than building a dict first
    except TypeError:
        line = b""  # a lone surrogate in a body: orjson refuses it
    # orjson writes NUL as \u0000, which jsonb refuses; the test may also match an escaped backslash, harmless.
    if not line or b"\\u0000" in line:
        record.request_body = storable_json(record.request_body)
        record.response_body = storable_json(record.response_body)
        line = orjson.dumps(record)
    return line + b"\n"


def record_from_line(line: bytes) -> UsageRecord:
    data = orjson.loads(line)
    data.pop("dead_letter", None)  # a dead-letter line moved back into the spool for replay
    data["created_at"] = parse_datetime(data["created_at"])
    record = UsageRecord(**data)
    journal_line(record)  # written by an older version, or edited by hand: make it storable all the same
    return record


def _insert_rows(batch: list[UsageRecord]) -> None:
    """Insert the rows and add them to the daily rollup (`UsageDaily`), in the caller's transaction.

    The writer shares the worker's GIL with the event loop, so this skips the per-row model and compiler work
    of bulk_create (values are adapted as Django would, but only where it matters: times and JSON) and keeps
    each statement's text small enough for psycopg to parse once. A row whose request id is already stored is
    skipped (a journal replayed after its rows went in); `RETURNING` names the rows really inserted, and only
    those are added to the rollup (one upsert unless the batch has more than `_ROWS_PER_STATEMENT` of its keys).
    """
    connection = connections[router.db_for_write(RequestLog)]
    rows = []
    for record in batch:
        row = []
        for column, needs_adapting in _INSERT_COLUMNS:
            value = getattr(record, column.attname)
            row.append(column.get_db_prep_save(value, connection) if needs_adapting and value is not None else value)
        rows.append(row)
    inserted: set[str] = set()
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            # One statement, its parameters sent in a pipeline; Django's wrapper has no `returning`.
            raw = cursor.cursor
            with connection.wrap_database_errors:
                raw.executemany(_insert_sql(1), rows, returning=True)
                while True:
                    inserted.update(request_id for (request_id,) in raw.fetchall())
                    if not raw.nextset():
                        break
        else:
            # SQLite's executemany drops what RETURNING returns: many rows per statement instead.
            for chunk in _chunks(connection, rows, len(_INSERT_COLUMNS)):
                cursor.execute(_insert_sql(len(chunk)), [value for row in chunk for value in row])
                inserted.update(request_id for (request_id,) in cursor.fetchall())
        if inserted:
            rollup = _rollup_of(batch, inserted)
            for chunk in _chunks(connection, rollup, len(_ROLLUP_KEY) + len(_ROLLUP_SUMS)):
                cursor.execute(_rollup_sql(len(chunk)), [value for row in chunk for value in row])


def _chunks(connection: Any, rows: list[Any], width: int) -> Iterator[list[Any]]:
    """`rows` in order, as many per statement as the database takes parameters (SQLite: 999 by Django's count),
    and at most `_ROWS_PER_STATEMENT`, which keeps the cached statements few and short."""
    limit = connection.features.max_query_params
    per_statement = min(_ROWS_PER_STATEMENT, max(1, limit // width) if limit else _ROWS_PER_STATEMENT)
    for start in range(0, len(rows), per_statement):
        yield rows[start : start + per_statement]


# Each column, and whether its value needs Django's adapting.
_INSERT_COLUMNS = tuple(
    (column, isinstance(column, models.DateTimeField | models.JSONField))
    for column in RequestLog._meta.concrete_fields
    if not column.primary_key
)
_ROLLUP_KEY = ("day", "user_id", "project_id", "api_key_prefix", "model", "endpoint_id")
_ROLLUP_SUMS = ("requests", "errors", "prompt_tokens", "completion_tokens", "total_tokens", "latency_ms_sum")
_ROWS_PER_STATEMENT = 500


def _quote(name: str) -> str:
    # As Django quotes them for PostgreSQL and SQLite alike: the statements need no connection, so one cache serves
    # every thread's.
    return f'"{name}"'


@functools.lru_cache(maxsize=64)
def _insert_sql(rows: int) -> str:
    names = ", ".join(_quote(column.column) for column, _ in _INSERT_COLUMNS)
    key = _quote(RequestLog._meta.get_field("request_id").column)
    row = f"({', '.join(['%s'] * len(_INSERT_COLUMNS))})"
    # Names come from the model and are quoted; every value is a parameter. SQLite (3.35+) and PostgreSQL
    # both take this ON CONFLICT and RETURNING.
    return (
        f"INSERT INTO {_quote(RequestLog._meta.db_table)} ({names}) "  # noqa: S608
        f"VALUES {', '.join([row] * rows)} ON CONFLICT ({key}) DO NOTHING RETURNING {key}"
    )


@functools.lru_cache(maxsize=64)
def _rollup_sql(rows: int) -> str:
    table = _quote(UsageDaily._meta.db_table)
    names = [*_ROLLUP_KEY, *_ROLLUP_SUMS]
    row = f"({', '.join(['%s'] * len(names))})"
    adds = ", ".join(f"{_quote(name)} = {table}.{_quote(name)} + excluded.{_quote(name)}" for name in _ROLLUP_SUMS)
    return (
        f"INSERT INTO {table} ({', '.join(_quote(name) for name in names)}) "  # noqa: S608
        f"VALUES {', '.join([row] * rows)} "
        f"ON CONFLICT ({', '.join(_quote(name) for name in _ROLLUP_KEY)}) DO UPDATE SET {adds}"
    )


def _rollup_of(batch: list[UsageRecord], inserted: set[str]) -> list[tuple[Any, ...]]:
    """The batch's inserted rows summed per rollup key (day first), sorted: concurrent writers then lock the
    rollup rows they share in the same order and cannot deadlock on them."""
    sums: dict[tuple[Any, ...], list[Any]] = {}
    left = set(inserted)
    for record in batch:
        # A request id twice in one batch (a journal replayed beside the live records) went in once: the first.
        if record.request_id not in left:
            continue
        left.discard(record.request_id)
        created = record.created_at
        day = (created if created.tzinfo is UTC or created.tzinfo is None else created.astimezone(UTC)).date()
        key = (
            day,
            record.user_id,
            record.project_id or 0,
            record.api_key_prefix,
            record.model,
            record.endpoint_id or 0,
        )
        row = sums.get(key)
        if row is None:
            row = sums[key] = [0, 0, 0, 0, 0, 0.0]
        row[0] += 1
        row[1] += record.status_code >= 400
        row[2] += record.prompt_tokens or 0
        row[3] += record.completion_tokens or 0
        row[4] += record.total_tokens or 0
        row[5] += record.latency_ms
    return [(*key, *sums[key]) for key in sorted(sums)]


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).strip()[:500]}"


class DeadLetter:
    """Usage records the database refused for good, one JSON line each, for an admin to inspect or replay.

    A line is the record as journaled plus a `dead_letter` object saying why and when, so moving the file
    into the spool directory (as usage-*.jsonl) replays it once its cause is fixed.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.count = 0
        self._lock = threading.Lock()

    def add(self, record: UsageRecord, error: BaseException | str) -> None:
        reason = error if isinstance(error, str) else _describe(error)
        try:
            line = orjson.dumps({**record.as_dict(), "dead_letter": self._note(reason)})
        except TypeError as unserialisable:
            self.add_raw(repr(record).encode("utf-8", "backslashreplace"), f"{reason}; {unserialisable}")
            return
        path = self._write(line)
        logger.error("usage record of request %s set aside in %s: %s", record.request_id, path, reason)

    def add_raw(self, raw: bytes, reason: str) -> None:
        text = raw.decode("utf-8", "backslashreplace")
        self._write(orjson.dumps({"dead_letter": {**self._note(reason), "raw": text}}))

    @staticmethod
    def _note(reason: str) -> dict[str, str]:
        return {"error": reason, "set_aside_at": datetime.now(UTC).isoformat(), "pid": str(os.getpid())}

    def _write(self, line: bytes) -> Path:
        path = self.directory / f"usage-{datetime.now(UTC):%Y%m%d}-{os.getpid()}.jsonl"
        with self._lock:
            self.count += 1
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                with path.open("ab") as file:
                    file.write(line + b"\n")
                    file.flush()
                    os.fsync(file.fileno())
            except OSError:
                logger.exception("could not write the usage dead-letter file %s", path)
        return path


@dataclass(slots=True, eq=False)  # compared and hashed by identity: one open file each
class _Segment:
    path: Path
    fd: int
    unsettled: int = 0
    size: int = 0


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class UsageJournal:
    """Append-only files of usage records not yet in the database, one writer process each.

    Each segment is held with an exclusive flock for as long as its process lives, so a starting worker
    adopts exactly the segments whose owner is gone (killed, or stopped with the database down) and
    never a live one. A segment is created under a hidden name and renamed once locked, so no other
    worker can see it unlocked. Records are settled in the order they were appended; a segment whose
    records are all settled is deleted, or emptied once it holds 64 KB if it is the one being appended to.
    """

    def __init__(
        self,
        directory: Path,
        dead_letter: DeadLetter,
        *,
        segment_bytes: int = 64 * 1024 * 1024,
        trim_bytes: int = 64 * 1024,
    ) -> None:
        self.directory = directory
        self._dead_letter = dead_letter
        self._segment_bytes = segment_bytes
        # Emptying the file after every batch would cost a syscall each; a kill leaves at most this much
        # already-written records to replay, which the unique request id skips.
        self._trim_bytes = trim_bytes
        self._segments: deque[_Segment] = deque()
        # Which segment holds the next records to settle, in append order (None: journaling failed).
        self._runs: deque[list[Any]] = deque()
        self._current: _Segment | None = None
        self._lock = threading.Lock()
        self._unsynced: set[_Segment] = set()
        # Open marks: which segment holds each open request's mark (its `unsettled` counts open marks).
        self._open_current: _Segment | None = None
        self._open_segments: list[_Segment] = []
        self._open_of: dict[str, _Segment] = {}
        self.write_errors = 0

    def mark_open(self, lines: dict[str, bytes]) -> None:
        """Write the marks of requests now open (request id -> line), with one write."""
        data = b"".join(lines.values())
        with self._lock:
            try:
                segment = self._open_current
                if segment is None or segment.size >= self._segment_bytes:
                    segment = self._open_current = self._new_segment("opened")
                    self._open_segments.append(segment)
                _write_all(segment.fd, data)
            except OSError:
                self.write_errors += 1
                logger.exception("could not mark %d requests open; a worker crash would lose them", len(lines))
                return
            self._unsynced.add(segment)
            segment.size += len(data)
            segment.unsettled += len(lines)
            for request_id in lines:
                self._open_of[request_id] = segment

    def release(self, request_ids: list[str]) -> None:
        """Drop the marks of requests whose records are journaled now; trim what that frees."""
        with self._lock:
            for request_id in request_ids:
                segment = self._open_of.pop(request_id, None)
                if segment is None:
                    continue
                segment.unsettled -= 1
                if segment.unsettled:
                    continue
                if segment is not self._open_current:
                    self._open_segments.remove(segment)
                    self._remove(segment)
                elif segment.size >= self._trim_bytes:
                    os.ftruncate(segment.fd, 0)
                    segment.size = 0

    def adopt_lost(self, found: set[str]) -> list[UsageRecord]:
        """Requests that dead workers left open and whose records are not in `found`: recorded as lost.

        They are journaled here before the marks are deleted, so a crash during start-up loses nothing.
        Returns them, to be inserted after the adopted records (a record that reached the database before
        its worker died makes the lost one a duplicate, which the insert skips).
        """
        if not self.directory.is_dir():
            return []
        lost: dict[str, UsageRecord] = {}
        claimed = []
        for path in sorted(self.directory.glob(_OPEN_GLOB)):
            segment = self._claim(path)
            if segment is None:
                continue
            claimed.append(segment)
            for record in self._read(segment.path):
                if record.request_id not in found:
                    record.status_code, record.error_code = LOST_STATUS, LOST_ERROR_CODE
                    lost[record.request_id] = record
        if lost:
            logger.warning("%d requests were cut by a worker that stopped without recording them", len(lost))
            self.append([journal_line(record) for record in lost.values()], len(lost))
            self.sync()
        for segment in claimed:
            self._remove(segment)
        return list(lost.values())

    def sync(self) -> None:
        """fdatasync what was appended since the last sync, so that it survives a power cut too."""
        with self._lock:
            self._sync_locked()

    def _sync_locked(self) -> None:
        segments, self._unsynced = self._unsynced, set()
        for segment in segments:
            try:
                os.fdatasync(segment.fd)
            except OSError:
                self.write_errors += 1
                logger.exception("could not sync the usage journal %s", segment.path)

    def adopt(self) -> list[UsageRecord]:
        """Claim the segments no live process holds and return their records, oldest file first."""
        records: list[UsageRecord] = []
        if not self.directory.is_dir():
            return records
        self._remove_stale_hidden()
        paths = sorted({path for pattern in _JOURNAL_GLOBS for path in self.directory.glob(pattern)})
        for path in paths:
            segment = self._claim(path)
            if segment is None:
                continue
            found = self._read(segment.path)
            if not found:
                self._remove(segment)
                continue
            segment.unsettled = len(found)
            with self._lock:
                self._segments.append(segment)
                self._runs.append([segment, len(found)])
            records.extend(found)
        if records:
            logger.info("replaying %d journaled usage records (any already written are skipped)", len(records))
        return records

    def _remove_stale_hidden(self) -> None:
        """Hidden segments are renamed as soon as they are locked, before any write: an old one is empty."""
        for path in self.directory.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                if time.time() - path.stat().st_mtime > 60:
                    path.unlink()

    @staticmethod
    def _claim(path: Path) -> _Segment | None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # Still the file at that path? Its replayer may have deleted it between our open and lock.
            if os.stat(path).st_ino != os.fstat(fd).st_ino:
                raise FileNotFoundError(path)
        except OSError:  # held by a live process (BlockingIOError), or gone
            os.close(fd)
            return None
        return _Segment(path, fd, size=os.fstat(fd).st_size)

    def _read(self, path: Path) -> list[UsageRecord]:
        records = []
        for number, line in enumerate(path.read_bytes().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(record_from_line(line))
            except (orjson.JSONDecodeError, TypeError, KeyError, ValueError) as error:
                # A line cut short by a kill mid-write, or not a record: kept for an admin, not retried.
                logger.error("usage journal %s line %d is not a usage record (%s); set aside", path, number, error)
                self._dead_letter.add_raw(line, f"unreadable journal line {path.name}:{number}: {error}")
        return records

    def append(self, lines: list[bytes], count: int) -> None:
        """Write `count` records (their lines) with one write: from then on they outlive this process.

        They outlive a power cut after the next `sync()`.
        """
        data = b"".join(lines)
        with self._lock:
            try:
                segment = self._writable()
                _write_all(segment.fd, data)
                self._unsynced.add(segment)
                segment.size += len(data)
                segment.unsettled += count
                target: _Segment | None = segment
            except OSError:
                self.write_errors += 1
                logger.exception("could not journal %d usage records; they are kept in memory only", count)
                target = None
            if self._runs and self._runs[-1][0] is target:
                self._runs[-1][1] += count
            else:
                self._runs.append([target, count])

    def _writable(self) -> _Segment:
        current = self._current
        if current is not None and current.size < self._segment_bytes:
            return current
        self._current = self._new_segment("usage")
        self._segments.append(self._current)
        return self._current

    def _new_segment(self, kind: str) -> _Segment:
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"{kind}-{os.getpid()}-{time.time_ns()}"
        hidden = self.directory / f".{name}.tmp"
        fd = os.open(hidden, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        path = self.directory / f"{name}.jsonl"
        os.rename(hidden, path)
        directory = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(directory)  # the file's name survives a power cut too
        finally:
            os.close(directory)
        return _Segment(path, fd)

    def settle(self, count: int) -> None:
        """The oldest `count` appended records are in the database (or set aside): trim what they free."""
        with self._lock:
            while count and self._runs:
                run = self._runs[0]
                taken = min(count, run[1])
                run[1] -= taken
                count -= taken
                if not run[1]:
                    self._runs.popleft()
                segment: _Segment | None = run[0]
                if segment is None:
                    continue
                segment.unsettled -= taken
                if segment.unsettled:
                    continue
                if segment is self._current:
                    if segment.size >= self._trim_bytes:
                        os.ftruncate(segment.fd, 0)  # appends resume at offset 0 (O_APPEND)
                        segment.size = 0
                else:
                    self._segments.remove(segment)
                    self._remove(segment)

    @property
    def unsettled(self) -> int:
        with self._lock:
            return sum(run[1] for run in self._runs if run[0] is not None)

    def close(self) -> int:
        """Delete the segments with nothing left to write and release the rest for the next start."""
        with self._lock:
            self._sync_locked()
            left = 0
            for segment in self._segments:
                if segment.unsettled:
                    left += segment.unsettled
                    os.close(segment.fd)
                else:
                    self._remove(segment)
            for segment in self._open_segments:
                if segment.unsettled:
                    os.close(segment.fd)  # requests cut without a record: the next start records them lost
                else:
                    self._remove(segment)
            self._open_segments.clear()
            self._open_of.clear()
            self._open_current = None
            self._segments.clear()
            self._runs.clear()
            self._current = None
            return left

    def _remove(self, segment: _Segment) -> None:
        self._unsynced.discard(segment)
        with contextlib.suppress(FileNotFoundError):
            segment.path.unlink()
        os.close(segment.fd)


class UsageSink:
    """Two threads: one journals records as they come, the other writes the journaled ones to the database.

    Journaling never waits on the database (a connection attempt to a host that has vanished can hang for
    minutes), so how much a SIGKILL can lose does not depend on the database's state.
    """

    def __init__(self, *, batch_size: int, flush_seconds: float, spool_dir: Path, dead_letter_dir: Path) -> None:
        # None in the queue asks the writer to write what it holds now (see flush).
        self._queue: queue.SimpleQueue[UsageRecord | _Opened | None] = queue.SimpleQueue()
        # Journaled records on their way to the database writer (None: flush now).
        self._journaled: queue.SimpleQueue[list[UsageRecord] | None] = queue.SimpleQueue()
        self._batch_size = batch_size
        self._flush_seconds = flush_seconds
        self.dead_letter = DeadLetter(dead_letter_dir)
        self.journal = UsageJournal(spool_dir, self.dead_letter)
        self._pending: list[UsageRecord] = []
        self._accepted = 0
        self._settled = 0
        self._progress = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._start_lock = threading.Lock()
        self._stopping = threading.Event()
        self._stopped = False
        self._last_journal = float("-inf")
        self._last_insert = float("-inf")
        self._retry_at = float("-inf")
        self._flush_asked = False

    @property
    def dead_lettered(self) -> int:
        """Records set aside in the dead-letter file by this process (for metrics)."""
        return self.dead_letter.count

    def record(self, record: UsageRecord) -> None:
        """Accept a record without blocking."""
        with self._progress:
            stopped = self._stopped
            if not stopped:
                self._accepted += 1
                self._queue.put(record)  # under the lock: stop() drains the queue once it has set _stopped
        if stopped:
            # Handed over after stop(), by a request cancelled at shutdown: straight to the journal.
            self._journal_now([record])
            return
        if not self._threads:
            self.start()

    def opened(self, record: UsageRecord) -> None:
        """Mark a request open as it goes to a model server, so that a worker crash cannot lose it unseen.

        Its record (this one, finished, through `record`) drops the mark. The mark holds what identifies the
        request, as it is now (the request goes on changing `record`); a tuple, so the hand-off stays cheap.
        """
        if self._stopped:
            return
        self._queue.put(_Opened(tuple(getattr(record, name) for name in _MARK_FIELDS)))
        if not self._threads:
            self.start()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every record accepted so far is written; False if that took longer than `timeout`."""
        deadline = time.monotonic() + timeout
        self._queue.put(None)
        with self._progress:
            target = self._accepted
            while self._settled < target:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._progress.wait(remaining)
        return True

    def start(self) -> None:
        """Start the writer (and replay journals left by stopped workers); at worker start-up or first use."""
        with self._start_lock:
            if self._threads:
                return
            self._pending.extend(self.journal.adopt())
            self._pending.extend(self.journal.adopt_lost({record.request_id for record in self._pending}))
            with self._progress:
                self._accepted += len(self._pending)
            self._threads = [
                threading.Thread(target=self._journal_until_stopped, name="usage-journal", daemon=True),
                threading.Thread(target=self._run, name="usage-sink", daemon=True),
            ]
            for thread in self._threads:
                thread.start()
            atexit.register(self.stop)

    def _journal_until_stopped(self) -> None:
        synced_at = time.monotonic()
        while not self._stopping.is_set():
            records, flush = self._collect()
            now = time.monotonic()
            if records:
                self._last_journal = now
                kept = self._journal_now(records)
                if kept:
                    self._journaled.put(kept)
            if flush or not records or now - synced_at >= self._flush_seconds:
                # Paced apart from the writes: one fsync per USAGE_FLUSH_SECONDS under load, and at once
                # when records stop coming (a quiet spell) or flush() asks.
                self.journal.sync()
                synced_at = now
            if flush:
                self._journaled.put(None)

    def _run(self) -> None:
        try:
            self._write_until_stopped()
        finally:
            connections.close_all()  # this thread's connection, so the database can be dropped or failed over

    def _write_until_stopped(self) -> None:
        backoff = 1.0
        while not self._stopping.is_set():
            self._take_journaled()
            if not self._pending or self._insert_due_in(time.monotonic()) > 0:
                continue
            batch = self._pending[: self._batch_size]
            self._last_insert = time.monotonic()
            try:
                self._store(batch)
            except Exception:
                # The whole batch stays journaled and pending; rows of it already in are skipped on retry.
                logger.exception("could not write %d usage records; retrying in %.0f s", len(batch), backoff)
                close_old_connections()
                self._retry_at = time.monotonic() + backoff
                backoff = min(backoff * 2, _MAX_BACKOFF_SECONDS)
                continue
            backoff = 1.0
            self._touch_api_keys(batch)
            del self._pending[: len(batch)]
            self._flush_asked = bool(self._pending) and self._flush_asked
            self.journal.settle(len(batch))
            self._settle(len(batch))

    def _insert_due_in(self, now: float) -> float:
        """Seconds until the next insert may start (0: now).

        One transaction per `flush_seconds` unless a batch fills up or flush() asks: a record after a quiet
        spell is written at once, while under load one transaction carries many records instead of one each,
        which keeps the writer's share of the worker's CPU (and its hold on the GIL) small at any rate.
        After a failure, not before the retry time.
        """
        if now < self._retry_at:
            return self._retry_at - now
        if self._flush_asked or len(self._pending) >= self._batch_size:
            return 0.0
        return max(0.0, self._last_insert + self._flush_seconds - now)

    def _take_journaled(self) -> None:
        """Move journaled records to the pending list: wait for more while no insert is due."""
        due_in = self._insert_due_in(time.monotonic()) if self._pending else self._flush_seconds
        wait = min(self._flush_seconds, due_in)
        try:
            item = self._journaled.get(timeout=wait) if wait > 0 else self._journaled.get_nowait()
            while True:
                if item is None:
                    # flush() asks: try the database now
                    self._retry_at = float("-inf")
                    self._flush_asked = True
                else:
                    self._pending.extend(item)
                item = self._journaled.get_nowait()
        except queue.Empty:
            pass

    def _settle(self, count: int) -> None:
        with self._progress:
            self._settled += count
            self._progress.notify_all()

    def _journal_now(self, items: list[UsageRecord | _Opened]) -> list[UsageRecord]:
        """Make records storable and journal them, then mark open requests and unmark finished ones.

        Returns the records journaled (the rest are set aside). A request that opened and finished within
        one batch is never marked.
        """
        records = [item for item in items if isinstance(item, UsageRecord)]
        finished = [record.request_id for record in records]
        done = set(finished)
        opened = {
            item.request_id: item.line() for item in items if isinstance(item, _Opened) and item.request_id not in done
        }
        kept = self._journal_records(records)
        self.journal.release(finished)  # after their records are written: a crash in between leaves both
        if opened:
            self.journal.mark_open(opened)
        return kept

    def _journal_records(self, records: list[UsageRecord]) -> list[UsageRecord]:
        lines = []
        kept = []
        for record in records:
            try:
                lines.append(journal_line(record))
            except Exception as error:  # e.g. a body nested too deep to serialise: it could never be stored
                self.dead_letter.add(record, error)
                self._settle(1)
                continue
            kept.append(record)
        if kept:
            self.journal.append(lines, len(kept))
        return kept

    def _collect(self) -> tuple[list[UsageRecord | _Opened], bool]:
        """Take queued records, waiting for them to gather so that one journal write carries many.

        At most one journal write starts per JOURNAL_WRITE_SECONDS unless a batch fills up or flush() asks:
        a record that arrives after a quiet spell is journaled at once. This wait is all a SIGKILL can lose:
        records still waiting here.
        """
        records: list[UsageRecord | _Opened] = []
        try:
            first = self._queue.get(timeout=self._flush_seconds)
        except queue.Empty:
            return records, False
        if first is None:
            return records, True
        records.append(first)
        due = self._last_journal + JOURNAL_WRITE_SECONDS
        flush = False
        while len(records) < self._batch_size:
            remaining = due - time.monotonic()
            if remaining <= 0:
                break
            try:
                item = self._queue.get(timeout=remaining)
            except queue.Empty:
                break
            if item is None:
                flush = True
                break
            records.append(item)
        return records, self._drain(records) or flush

    def _drain(self, into: list[UsageRecord | _Opened]) -> bool:
        """Move what is queued into `into`; True if flush() asked meanwhile."""
        flush = False
        try:
            while True:
                item = self._queue.get_nowait()
                if item is None:
                    flush = True
                else:
                    into.append(item)
        except queue.Empty:
            return flush

    def _store(self, batch: list[UsageRecord]) -> None:
        """Insert `batch`; a permanent refusal is bisected down to the rows that cause it.

        Raises only the transient errors (the database is away): then nothing is lost or set aside, and
        the caller retries the whole batch later.
        """
        # Django's housekeeping, keeping a healthy connection: with CONN_MAX_AGE=0, close_old_connections()
        # would close it, and every batch would pay a new connection (on PostgreSQL, milliseconds of the GIL).
        connections_prepare()
        try:
            with transaction.atomic():
                _insert_rows(batch)
        except TRANSIENT_ERRORS:
            raise
        except Exception as error:
            if len(batch) == 1:
                self._store_alone(batch[0], error)
                return
            middle = len(batch) // 2
            self._store(batch[:middle])
            self._store(batch[middle:])

    def _store_alone(self, record: UsageRecord, error: Exception) -> None:
        if isinstance(error, IntegrityError) and (record.endpoint_id is not None or record.api_key_id is not None):
            # An endpoint or key deleted since the request must not cost the row: keep it without them.
            try:
                with transaction.atomic():
                    _insert_rows([dataclasses.replace(record, endpoint_id=None, api_key_id=None)])
                return
            except TRANSIENT_ERRORS:
                raise
            except Exception as again:
                error = again
        self.dead_letter.add(record, error)

    @staticmethod
    def _touch_api_keys(batch: list[UsageRecord]) -> None:
        last_used: dict[int, datetime] = {}
        for record in batch:
            if record.api_key_id is not None:
                last_used[record.api_key_id] = max(
                    record.created_at, last_used.get(record.api_key_id, record.created_at)
                )
        try:
            for key_id, used_at in last_used.items():
                # Never backwards: a replayed journal carries old times.
                ApiKey.objects.filter(Q(last_used_at__isnull=True) | Q(last_used_at__lt=used_at), pk=key_id).update(
                    last_used_at=used_at
                )
        except Exception:
            # Informational only: the rows are in, and retrying them for this would set aside refused ones twice.
            logger.warning("could not update API keys' last use", exc_info=True)
            close_old_connections()

    def stop(self, timeout: float = 5.0) -> None:
        """Write what is left within `timeout`; whatever is not written stays in the journal for the next start.

        Everything handed over is journaled within `flush_seconds`, before it is written, so the time spent
        here only decides whether the rows arrive now or at the next start, never whether they arrive.
        """
        if not self._threads or self._stopping.is_set():
            return
        atexit.unregister(self.stop)  # a sink stopped by its owner needs no second stop at exit
        written = self.flush(timeout=timeout)
        self._stopping.set()
        self._queue.put(None)  # wake both threads if they wait for records
        self._journaled.put(None)
        journaler, writer = self._threads
        journaler.join(timeout=1)
        writer.join(timeout=1)
        with self._progress:
            self._stopped = True
        leftovers: list[UsageRecord | _Opened] = []
        self._drain(leftovers)
        self._settle(len(self._journal_now(leftovers)))
        if writer.is_alive():
            # Stuck in a database call: it may still settle its batch, so the journal stays as it is.
            logger.warning("the usage writer did not stop; its records stay in the journal for the next start")
            return
        left = self.journal.close()
        if not written or left:
            logger.warning(
                "%d usage records were not written to the database before shutdown; they stay in %s for the next start",
                left,
                self.journal.directory,
            )


@dataclass(frozen=True, slots=True)
class _Opened:
    """A request's open mark on its way to the journal (see UsageSink.opened): values of _MARK_FIELDS."""

    values: tuple[Any, ...]

    @property
    def request_id(self) -> str:
        return str(self.values[0])

    def line(self) -> bytes:
        try:
            return orjson.dumps(dict(zip(_MARK_FIELDS, self.values, strict=True))) + b"\n"
        except TypeError:  # a lone surrogate in the model name: the full record's path makes it storable
            return journal_line(UsageRecord(**dict(zip(_MARK_FIELDS, self.values, strict=True))))


# What a lost request's row can say: who, what, where, when (request_id first).
_MARK_FIELDS = (
    "request_id",
    "client_request_id",
    "user_id",
    "route",
    "api_key_id",
    "created_at",
    "model",
    "endpoint_id",
    "streamed",
)


def usage_sink_from_settings() -> UsageSink:
    """The usage sink the settings describe (the composition root builds the process's one)."""
    gateway = settings.GATEWAY
    return UsageSink(
        batch_size=gateway.USAGE_BATCH_SIZE,
        flush_seconds=gateway.USAGE_FLUSH_SECONDS,
        spool_dir=gateway.DATA_DIR / "usage-spool",
        dead_letter_dir=gateway.DATA_DIR / "usage-dead-letter",
    )
