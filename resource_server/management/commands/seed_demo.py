"""python manage.py seed_demo --model-url http://127.0.0.1:8001/v1: a demo cluster and endpoint."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from resource_server.models import Cluster, Endpoint, Framework


class Command(BaseCommand):
    help = "Create (or update) a demo cluster with an endpoint served by the fake model server."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--model-url", default="http://127.0.0.1:8001/v1")
        parser.add_argument("--model", default="demo-model")
        parser.add_argument("--cluster", default="demo")

    def handle(self, *args: Any, **options: Any) -> None:
        cluster, _ = Cluster.objects.update_or_create(
            name=options["cluster"], defaults={"description": "Demo cluster backed by the fake model server."}
        )
        endpoint, created = Endpoint.objects.update_or_create(
            cluster=cluster,
            framework=Framework.VLLM,
            model=options["model"],
            defaults={"backend": "direct", "backend_config": {"base_url": options["model_url"]}, "enabled": True},
        )
        endpoint.full_clean()
        verb = "Created" if created else "Updated"
        self.stderr.write(f"{verb} endpoint {endpoint.model} on cluster {cluster.name} -> {options['model_url']}")
