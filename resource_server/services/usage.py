"""The UsageSink: one RequestLog row per inference request, written off the request path.

Requests hand records to an in-memory queue and never wait on the database. A background
thread writes them in batches. While the database is down it keeps the records and retries;
at shutdown whatever could not be written goes to a spool file that the next start replays.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
from django.conf import settings
from django.db import IntegrityError, close_old_connections, connections, models, router, transaction
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from resource_server.models import ApiKey, RequestLog

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class UsageRecord:
    request_id: str
    user_id: int
    route: str
    api_key_id: int | None = None
    created_at: datetime = field(default_factory=timezone.now)
    model: str = ""
    endpoint_id: int | None = None
    streamed: bool = False
    status_code: int = 200
    error_code: str = ""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    latency_ms: float = 0.0
    time_to_first_token_ms: float | None = None
    request_body: Any = None
    response_body: Any = None

    def set_usage(self, usage: object) -> None:
        """Take token counts exactly as the model server reported them; never estimate."""
        if not isinstance(usage, dict):
            return
        for name in ("prompt_tokens", "completion_tokens", "total_tokens"):
            value = usage.get(name)
            if isinstance(value, int) and value >= 0:
                setattr(self, name, value)


def _insert_rows(batch: list[UsageRecord]) -> None:
    """One INSERT for many rows, skipping the per-row model and compiler work of bulk_create.

    The writer shares the worker's GIL with the event loop: bulk_create spent ~100 us per row in Python,
    this a few. Values are adapted as Django would, but only where it matters (times and JSON).
    """
    connection = connections[router.db_for_write(RequestLog)]
    columns = [column for column in RequestLog._meta.concrete_fields if not column.primary_key]
    adapt = [isinstance(column, models.DateTimeField | models.JSONField) for column in columns]
    quote = connection.ops.quote_name
    names = ", ".join(quote(column.column) for column in columns)
    # Names come from the model and are quoted; every value is a parameter.
    sql = f"INSERT INTO {quote(RequestLog._meta.db_table)} ({names}) VALUES ({', '.join(['%s'] * len(columns))})"  # noqa: S608
    rows = []
    for record in batch:
        row = []
        for column, needs_adapting in zip(columns, adapt, strict=True):
            value = getattr(record, column.attname)
            row.append(column.get_db_prep_save(value, connection) if needs_adapting and value is not None else value)
        rows.append(row)
    with connection.cursor() as cursor:
        cursor.executemany(sql, rows)


class UsageSink:
    max_pending = 100_000

    def __init__(self, *, batch_size: int, flush_seconds: float, spool_dir: Path) -> None:
        # None in the queue asks the writer to write what it holds now (see flush).
        self._queue: queue.SimpleQueue[UsageRecord | None] = queue.SimpleQueue()
        self._batch_size = batch_size
        self._flush_seconds = flush_seconds
        self._spool_dir = spool_dir
        self._pending: list[UsageRecord] = []
        self._accepted = 0
        self._settled = 0
        self._progress = threading.Condition()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._stopping = threading.Event()
        self._last_write = float("-inf")

    def record(self, record: UsageRecord) -> None:
        """Accept a record without blocking."""
        with self._progress:
            self._accepted += 1
        self._queue.put(record)
        if self._thread is None:
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
        """Start the writer (and replay spooled records); called at worker start-up or on first use."""
        with self._start_lock:
            if self._thread is not None:
                return
            self._pending.extend(self._read_spool())
            with self._progress:
                self._accepted += len(self._pending)
            self._thread = threading.Thread(target=self._run, name="usage-sink", daemon=True)
            self._thread.start()
            atexit.register(self.stop)

    def _run(self) -> None:
        try:
            self._write_until_stopped()
        finally:
            connections.close_all()  # this thread's connection, so the database can be dropped or failed over

    def _write_until_stopped(self) -> None:
        backoff = 1.0
        while not self._stopping.is_set():
            self._collect()
            if not self._pending:
                continue
            batch = self._pending[: self._batch_size]
            self._last_write = time.monotonic()
            try:
                self._write(batch)
            except Exception:
                logger.exception("could not write %d usage records; retrying in %.0f s", len(batch), backoff)
                close_old_connections()
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            backoff = 1.0
            del self._pending[: len(batch)]
            with self._progress:
                self._settled += len(batch)
                self._progress.notify_all()

    def _collect(self) -> None:
        """Move queued records into the pending list.

        At most one write starts per `flush_seconds` unless a batch fills up or flush() asks: a record
        that arrives after a quiet spell is written at once, while under load one transaction carries
        many records instead of one each, which keeps the writer's share of the worker's CPU (and its
        hold on the GIL) small at any request rate. Records left by a failed write are retried at once,
        with whatever queued since.
        """
        if self._pending:
            self._drain()
            return
        try:
            first = self._queue.get(timeout=self._flush_seconds)
        except queue.Empty:
            return
        if first is not None:
            self._pending.append(first)
        due = self._last_write + self._flush_seconds
        while first is not None and len(self._pending) < self._batch_size:
            remaining = due - time.monotonic()
            if remaining <= 0:
                break
            try:
                item = self._queue.get(timeout=remaining)
            except queue.Empty:
                break
            if item is None:
                break
            self._pending.append(item)
        self._drain()

    def _drain(self) -> None:
        try:
            while len(self._pending) < self.max_pending:
                item = self._queue.get_nowait()
                if item is not None:
                    self._pending.append(item)
        except queue.Empty:
            pass

    def _write(self, batch: list[UsageRecord]) -> None:
        close_old_connections()
        try:
            with transaction.atomic():
                _insert_rows(batch)
        except IntegrityError:
            # An endpoint or key deleted since the request must not cost the other rows: write one by one.
            for record in batch:
                self._write_one(RequestLog(**asdict(record)))
        last_used: dict[int, datetime] = {}
        for record in batch:
            if record.api_key_id is not None:
                last_used[record.api_key_id] = max(
                    record.created_at, last_used.get(record.api_key_id, record.created_at)
                )
        for key_id, used_at in last_used.items():
            ApiKey.objects.filter(pk=key_id).update(last_used_at=used_at)

    @staticmethod
    def _write_one(row: RequestLog) -> None:
        try:
            with transaction.atomic():
                row.save(force_insert=True)
        except IntegrityError:
            if RequestLog.objects.filter(request_id=row.request_id).exists():
                return  # written before a retry: keep one row per request
            row.endpoint_id = None
            row.api_key_id = None
            try:
                with transaction.atomic():
                    row.save(force_insert=True)
            except IntegrityError:
                # Its user is gone too: this row can never be stored, and retrying it would hold back all others.
                logger.error("dropped the usage record of request %s: its user no longer exists", row.request_id)

    def _spool_path(self) -> Path:
        return self._spool_dir / f"usage-{os.getpid()}-{time.time_ns()}.jsonl"

    def _read_spool(self) -> list[UsageRecord]:
        records: list[UsageRecord] = []
        if not self._spool_dir.is_dir():
            return records
        for path in sorted(self._spool_dir.glob("usage-*.jsonl")):
            claimed = path.with_suffix(".replaying")
            try:
                path.rename(claimed)  # rename is atomic: one worker replays each file
            except FileNotFoundError:
                continue
            for line in claimed.read_bytes().splitlines():
                data = orjson.loads(line)
                data["created_at"] = parse_datetime(data["created_at"])
                records.append(UsageRecord(**data))
            claimed.unlink()
        if records:
            logger.info("replaying %d spooled usage records", len(records))
        return records

    def stop(self, timeout: float = 5.0) -> None:
        """Write what is left and stop; what cannot be written within `timeout` goes to the spool file."""
        if self._thread is None or self._stopping.is_set():
            return
        written = self.flush(timeout=timeout)
        self._stopping.set()
        self._thread.join(timeout=self._flush_seconds + 1)
        if written:
            return
        leftovers = list(self._pending)
        try:
            while True:
                item = self._queue.get_nowait()
                if item is not None:
                    leftovers.append(item)
        except queue.Empty:
            pass
        with self._progress:
            self._settled += len(leftovers)
            self._progress.notify_all()
        if not leftovers:
            return
        # A batch the writer was still retrying may land too; the unique request_id keeps one row on replay.
        self._spool_dir.mkdir(parents=True, exist_ok=True)
        path = self._spool_path()
        path.write_bytes(b"".join(orjson.dumps(asdict(record)) + b"\n" for record in leftovers))
        logger.warning("database unavailable at shutdown: %d usage records spooled to %s", len(leftovers), path)


usage_sink = UsageSink(
    batch_size=settings.GATEWAY.USAGE_BATCH_SIZE,
    flush_seconds=settings.GATEWAY.USAGE_FLUSH_SECONDS,
    spool_dir=settings.GATEWAY.DATA_DIR / "usage-spool",
)
