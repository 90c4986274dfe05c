"""Retention of the raw usage rows: `manage.py prune_usage` deletes those older than USAGE_RETENTION_DAYS.

Only the raw rows go. The daily rollup (`UsageDaily`), which every report and budget reads, was kept up to date as
each row was inserted (and filled for older rows by migration 0008), so deleting raw rows changes no total.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from resource_server.models import RequestLog

PRUNE_BATCH = 5_000


def request_log_prune(
    *,
    older_than: datetime,
    batch_size: int = PRUNE_BATCH,
    dry_run: bool = False,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Delete the RequestLog rows created before `older_than`; returns how many (with `dry_run`: how many would be).

    In batches of `batch_size` rows, each its own short statement and transaction (found through the created_at
    index), rather than one DELETE of millions of rows: the usage writer, the admin and a replica never wait
    long on it, and a prune stopped half way keeps what it did. `progress` hears the running count after each
    batch.
    """
    old = RequestLog.objects.filter(created_at__lt=older_than)
    if dry_run:
        return old.count()
    deleted = 0
    while True:
        batch = list(old.order_by().values_list("pk", flat=True)[:batch_size])
        if not batch:
            return deleted
        # Nothing refers to a usage row, so Django deletes them with one DELETE ... WHERE id IN (...).
        deleted += RequestLog.objects.filter(pk__in=batch).delete()[0]
        if progress is not None:
            progress(deleted)
