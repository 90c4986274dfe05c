"""python manage.py fake_vllm --port 8001: run the fake vLLM server for the demo and benchmarks."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from resource_server.fakes import model_server


class Command(BaseCommand):
    help = "Serve a fast, deterministic fake of vLLM's OpenAI-compatible API."

    def add_arguments(self, parser: CommandParser) -> None:
        # The options live in the fake's module so `python -m` and this command stay identical.
        model_server.add_arguments(parser)

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            config = model_server.config_from_options(options)
        except ValueError as error:
            raise CommandError(str(error)) from error
        model_server.serve(config, host=options["host"], port=options["port"])
