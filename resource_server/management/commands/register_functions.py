"""python manage.py register_functions: register the compute functions with Globus Compute (idempotent)."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from resource_server.bootstrap import runtime
from resource_server.services.compute_functions import RegistrationError, compute_functions_register


class Command(BaseCommand):
    help = (
        "Register the compute functions (inference; scheduler, for clusters' login-node endpoints) with Globus "
        "Compute for each service account in use (GLOBUS_COMPUTE_CLIENT_ID and Endpoint overrides), and point "
        "globus_compute Endpoints at the inference one. "
        "Re-running registers again only when the function changed."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--force", action="store_true", help="register again even if the function is unchanged")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            report = compute_functions_register(endpoints=runtime().compute_endpoints, force=options["force"])
        except RegistrationError as error:
            raise CommandError(str(error)) from error
        changed = False
        for registration in report:
            line = (
                f"{registration.function} for client {registration.client_id}: "
                f"{registration.outcome} {registration.function_uuid}"
            )
            if registration.outcome == "re-registered":
                line += f" (was {registration.previous_uuid})"
            self.stdout.write(line)
            for endpoint in registration.followed:
                self.stdout.write(f"  endpoint {endpoint}: now runs {registration.function_uuid}")
            for endpoint, function_id in registration.pinned:
                self.stdout.write(f"  endpoint {endpoint}: left on function {function_id} (set by hand)")
            changed = changed or registration.outcome != "unchanged"
        if changed:
            self.stdout.write(
                "Add the new function id to allowed_functions in each endpoint's config.yaml and restart the "
                "endpoint; until then it refuses the function (docs/add-a-model.md)."
            )
