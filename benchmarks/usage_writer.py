"""python -m benchmarks.usage_writer: what the usage writer's insert costs per row, in the worker's interpreter.

Times `_insert_rows` (the usage rows and, in the same transaction, their daily rollup) for batches of 500 records
spread over 20 users, 4 models and 2 days, against the database the settings name (DATABASE_URL, else the SQLite
file under DATA_DIR; migrated first). Reports, per row, the CPU time of the calling thread (what the writer holds
the GIL for, which the event loop then waits on) and the wall time (the database's share included), the best of
20 batches. The rows it writes are deleted again.
"""

from __future__ import annotations

import os
import time
import uuid
from datetime import timedelta

BATCH = 500
REPEATS = 20


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gateway.settings")
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection, transaction
    from django.utils import timezone

    from resource_server.models import RequestLog, UsageDaily, User
    from resource_server.services.usage import UsageRecord, _insert_rows

    call_command("migrate", verbosity=0)
    users = [
        User.objects.get_or_create(
            username=f"usage-bench-{n}@example.org", defaults={"identity_id": f"usage-bench-{n}"}
        )[0]
        for n in range(20)
    ]
    now = timezone.now()

    def batch() -> list[UsageRecord]:
        return [
            UsageRecord(
                request_id=uuid.uuid4().hex,
                user_id=users[n % 20].pk,
                route="chat/completions",
                api_key_prefix=f"igw_{n % 20:012d}",
                created_at=now - timedelta(days=n % 2),
                model=f"model-{n % 4}",
                status_code=200 if n % 10 else 500,
                prompt_tokens=100,
                completion_tokens=20,
                total_tokens=120,
                latency_ms=12.5,
                request_body={"model": f"model-{n % 4}", "messages": [{"role": "user", "content": "hi"}]},
            )
            for n in range(BATCH)
        ]

    cpu, wall = [], []
    try:
        for _ in range(REPEATS):
            records = batch()
            started_cpu, started = time.thread_time(), time.perf_counter()
            with transaction.atomic():
                _insert_rows(records)
            cpu.append(time.thread_time() - started_cpu)
            wall.append(time.perf_counter() - started)
    finally:
        ids = [user.pk for user in users]
        RequestLog.objects.filter(user_id__in=ids).delete()
        UsageDaily.objects.filter(user_id__in=ids).delete()
    print(
        f"{connection.vendor}: {BATCH}-row batch, best of {REPEATS}: "
        f"{min(cpu) / BATCH * 1e6:.1f} us CPU per row, {min(wall) / BATCH * 1e6:.1f} us wall per row "
        f"(median {sorted(cpu)[REPEATS // 2] / BATCH * 1e6:.1f} / {sorted(wall)[REPEATS // 2] / BATCH * 1e6:.1f})"
    )


if __name__ == "__main__":
    main()
