"""python manage.py prune_usage [--dry-run] [--batch-size N]"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from resource_server.services.usage_retention import PRUNE_BATCH, request_log_prune


class Command(BaseCommand):
    help = (
        "Delete raw usage rows (request logs) older than USAGE_RETENTION_DAYS, in batches; the daily totals that "
        "reports and budgets read are kept. Run it daily."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--dry-run", action="store_true", help="Only count the rows that would be deleted.")
        parser.add_argument("--batch-size", type=int, default=PRUNE_BATCH, help="Rows per DELETE statement.")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["batch_size"] < 1:
            raise CommandError("--batch-size must be at least 1.")
        days = settings.GATEWAY.USAGE_RETENTION_DAYS
        if days == 0:
            self.stdout.write("USAGE_RETENTION_DAYS is 0: raw usage rows are kept forever; nothing deleted.")
            return
        cutoff = timezone.now() - timedelta(days=days)
        when = f"older than {days} days (before {cutoff:%Y-%m-%d %H:%M} UTC)"
        if options["dry_run"]:
            count = request_log_prune(older_than=cutoff, dry_run=True)
            self.stdout.write(f"Would delete {count} usage rows {when}; daily totals are kept.")
            return
        count = request_log_prune(
            older_than=cutoff,
            batch_size=options["batch_size"],
            progress=lambda done: self.stderr.write(f"deleted {done} so far", ending="\r"),
        )
        self.stdout.write(f"Deleted {count} usage rows {when}; daily totals are kept.")
