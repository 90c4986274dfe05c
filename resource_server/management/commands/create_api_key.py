"""python manage.py create_api_key --user NAME [--name LABEL] [--expires-days N]"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from resource_server.services.api_keys import api_key_create, user_get_or_create_local


class Command(BaseCommand):
    help = "Create a gateway API key for a user (created as a local user if unknown) and print it once."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--user", required=True, help="Username, e.g. jdoe@anl.gov")
        parser.add_argument("--name", default="cli", help="A label for the key, shown in the admin.")
        parser.add_argument("--expires-days", type=int, default=None, help="Days until the key expires.")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["expires_days"] is not None and options["expires_days"] < 1:
            raise CommandError("--expires-days must be at least 1.")
        user, created = user_get_or_create_local(username=options["user"])
        if created:
            self.stderr.write(f"Created local user {user.username}.")
        key, secret = api_key_create(owner=user, name=options["name"], expires_in_days=options["expires_days"])
        expiry = f", expires {key.expires_at:%Y-%m-%d %H:%M} UTC" if key.expires_at else ""
        self.stderr.write(f"API key {key.prefix} for {user.username}{expiry}. It is shown only once:")
        self.stdout.write(secret)
