"""python manage.py set_limit --user NAME | --key PREFIX | --project GROUP | --everyone [--model M | --endpoint ID]
[--concurrent N] [--rpm N] [--tpm N] [--tokens-per-day N] [--tokens-per-month N]
[--allocation-tokens N --allocation-starts DATE --allocation-ends DATE] [--exempt | --not-exempt]"""

from __future__ import annotations

import argparse
from datetime import UTC, date, datetime
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from resource_server.services.limits import limit_set

# Option (its argparse dest) -> the Limit field it sets.
LIMIT_OPTIONS = {
    "concurrent": "concurrent",
    "rpm": "requests_per_minute",
    "tpm": "tokens_per_minute",
    "tokens_per_day": "tokens_per_day",
    "tokens_per_month": "tokens_per_month",
    "allocation_tokens": "allocation_tokens",
}


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative: give 0 to remove the limit, or more")
    return value


def _moment(text: str) -> datetime:
    """A date (midnight UTC) or an ISO 8601 date and time (UTC unless it names its offset)."""
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            return datetime(day.year, day.month, day.day, tzinfo=UTC)
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (2026-01-31) or date and time") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _in_words(error: ValidationError) -> str:
    if not hasattr(error, "error_dict"):
        return " ".join(error.messages)
    return " ".join(
        f"{field}: {message}" if field != "__all__" else message
        for field, errors in error.message_dict.items()
        for message in errors
    )


class Command(BaseCommand):
    help = (
        "Set, change or remove the limits of one scope (a user, an API key, a project, or everyone), optionally "
        "narrowed to a model or an endpoint. A value of 0 removes that limit; options not given keep their value; "
        "a scope left with no limit has its row deleted. Prints the resulting limit."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        scope = parser.add_mutually_exclusive_group(required=True)
        scope.add_argument("--user", help="A username, e.g. jdoe@anl.gov: counts that user's requests.")
        scope.add_argument("--key", metavar="PREFIX", help="An API key's prefix: counts the key's requests.")
        scope.add_argument(
            "--project",
            metavar="GROUP",
            help="A project's name or its Globus group UUID: counts every request charged to the project.",
        )
        scope.add_argument(
            "--everyone", action="store_true", help="Every user, each counted separately (a default per user)."
        )
        parser.add_argument(
            "--project-name", help="With --project GROUP_UUID of a group that has no project yet: create it so named."
        )
        narrow = parser.add_mutually_exclusive_group()
        narrow.add_argument("--model", default="", help="Only requests for this model.")
        narrow.add_argument("--endpoint", type=int, metavar="ID", help="Only requests routed to this endpoint (id).")
        parser.add_argument("--concurrent", type=_count, metavar="N", help="Requests in flight at once.")
        parser.add_argument("--rpm", type=_count, metavar="N", help="Requests per minute.")
        parser.add_argument("--tpm", type=_count, metavar="N", help="Tokens per minute.")
        parser.add_argument("--tokens-per-day", type=_count, metavar="N", help="Tokens per UTC day.")
        parser.add_argument("--tokens-per-month", type=_count, metavar="N", help="Tokens per UTC calendar month.")
        parser.add_argument(
            "--allocation-tokens", type=_count, metavar="N", help="Tokens for the allocation period (0 removes it)."
        )
        parser.add_argument("--allocation-starts", type=_moment, metavar="DATE", help="e.g. 2026-01-01 (UTC).")
        parser.add_argument("--allocation-ends", type=_moment, metavar="DATE", help="e.g. 2026-07-01 (UTC).")
        parser.add_argument("--note", help="Why: an allocation award, a ticket number.")
        exempt = parser.add_mutually_exclusive_group()
        exempt.add_argument(
            "--exempt",
            dest="exempt",
            action="store_const",
            const=True,
            help="With --user: a service account, exempt from every limit.",
        )
        exempt.add_argument("--not-exempt", dest="exempt", action="store_const", const=False)

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            change = limit_set(
                user=options["user"],
                key=options["key"],
                project=options["project"],
                project_name=options["project_name"],
                everyone=options["everyone"],
                model=options["model"],
                endpoint=options["endpoint"],
                values={field: options[dest] for dest, field in LIMIT_OPTIONS.items() if options[dest] is not None},
                allocation_starts=options["allocation_starts"],
                allocation_ends=options["allocation_ends"],
                note=options["note"],
                exempt=options["exempt"],
            )
        except ValidationError as error:
            raise CommandError(_in_words(error)) from None
        self.stdout.write(f"{change.action.capitalize()}: {change.description}")
