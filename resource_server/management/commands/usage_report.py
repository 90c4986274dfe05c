"""python manage.py usage_report [--since 30d|DATE] [--until DATE] [--by day,project,...] [--user NAME]
[--project NAME] [--model M] [--format csv|json]"""

from __future__ import annotations

import csv
import re
from datetime import date, timedelta
from typing import Any, cast

import orjson
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from resource_server.models import Project, User
from resource_server.selectors.usage import (
    DIMENSIONS,
    Dimension,
    UsageFilter,
    usage_columns,
    usage_list,
    usage_row,
)

_DAYS = re.compile(r"(\d+)d")


class Command(BaseCommand):
    help = (
        "Usage (requests, errors, tokens, mean latency) over a period of UTC days, summed per the dimensions asked "
        "for, with names rather than ids; read from the daily totals, so fast at any number of requests. "
        "Writes to stdout."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--since",
            default="30d",
            help="Nd (the N days up to --until, which is today by default) or a UTC date YYYY-MM-DD. Default 30d.",
        )
        parser.add_argument("--until", default=None, help="Last UTC day, included (YYYY-MM-DD). Default: today.")
        parser.add_argument(
            "--by",
            default="day",
            help=f"Comma-separated, any of: {','.join(DIMENSIONS)}. Empty: one line of totals. Default: day.",
        )
        parser.add_argument("--user", default=None, help="Only this user (their username).")
        parser.add_argument("--project", default=None, help="Only requests charged to this project (its name).")
        parser.add_argument("--model", default=None, help="Only this model (as requests named it).")
        parser.add_argument("--format", choices=("csv", "json"), default="csv")

    def handle(self, *args: Any, **options: Any) -> None:
        today = timezone.now().date()
        until = _date(options["until"]) if options["until"] else today
        since = _since(options["since"], until)
        if since > until:
            raise CommandError(f"--since ({since}) is after --until ({until}).")
        by = _dimensions(options["by"])
        where = UsageFilter(
            since=since,
            until=until,
            user_id=_id_named(User, "username", options["user"]),
            project_id=_id_named(Project, "name", options["project"]),
            model=options["model"],
        )
        lines = usage_list(where=where, by=by)
        columns = usage_columns(by)
        if options["format"] == "json":
            rows = [dict(zip(columns, usage_row(line), strict=True)) for line in lines]
            report = {"since": since.isoformat(), "until": until.isoformat(), "by": list(by), "rows": rows}
            self.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
            return
        writer = csv.writer(self.stdout, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(usage_row(line) for line in lines)


def _id_named(model: type[User] | type[Project], field: str, name: str | None) -> int | None:
    """The id of the user or project called `name` (None: no such filter)."""
    if name is None:
        return None
    found = model.objects.filter(**{field: name}).values_list("pk", flat=True).first()
    if found is None:
        raise CommandError(f"No {model._meta.verbose_name} is named {name!r}.")
    return int(found)


def _since(text: str, until: date) -> date:
    days = _DAYS.fullmatch(text.strip())
    if days is None:
        try:
            return date.fromisoformat(text.strip())
        except ValueError:
            raise CommandError(f"--since must be Nd or a date (YYYY-MM-DD), not {text!r}.") from None
    count = int(days.group(1))
    if count < 1:
        raise CommandError("--since Nd needs N of at least 1.")
    return until - timedelta(days=count - 1)


def _date(text: str) -> date:
    try:
        return date.fromisoformat(text.strip())
    except ValueError:
        raise CommandError(f"--until must be a date (YYYY-MM-DD), not {text!r}.") from None


def _dimensions(text: str) -> tuple[Dimension, ...]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in DIMENSIONS]
    if unknown:
        raise CommandError(f"--by: not a dimension: {', '.join(unknown)}. Use any of {', '.join(DIMENSIONS)}.")
    return tuple(dict.fromkeys(cast(Dimension, name) for name in names))
