"""python manage.py seed_demo --model-url http://127.0.0.1:8001/v1: demo clusters and endpoints.

Two ways to one model server: `demo-model` on cluster `demo` over direct HTTP, and `demo-model-hpc` on
cluster `local-hpc` through the `local` backend (the compute function in a local process pool, streams
through the relay), the path a model on a Globus Compute endpoint takes.

With `--second-model-url`, `demo-model` is served by a second cluster too (`demo-b`), so the route stage
has two to choose from and fails over when one stops. With `--scheduler-commands`, cluster `demo-b` has its
batch jobs read (PBS, through the scheduler function in a local process pool, running the commands found
there) and serves `demo-model-big` from the batch job `demo-big`, at `--cold-model-url`: cold until a
job starts a server there (`python -m fakes.demo_cold_start` walks it through queued, starting, live).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from django.core.management.base import BaseCommand, CommandParser

from resource_server.models import Cluster, Endpoint, Framework


class Command(BaseCommand):
    help = "Create (or update) a demo cluster with an endpoint served by the fake model server."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--model-url", default="http://127.0.0.1:8001/v1")
        parser.add_argument("--model", default="demo-model")
        parser.add_argument("--cluster", default="demo")
        parser.add_argument("--hpc-model", default="demo-model-hpc")
        parser.add_argument("--hpc-cluster", default="local-hpc")
        parser.add_argument("--second-model-url", help="A second server of the model, on cluster demo-b.")
        parser.add_argument("--scheduler-commands", help="Absolute directory of demo-b's qstat and pbsnodes.")
        parser.add_argument("--cold-model-url", default="http://127.0.0.1:8003/v1")
        parser.add_argument("--cold-model", default="demo-model-big")

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

        server = urlsplit(options["model_url"])
        hpc_cluster, _ = Cluster.objects.update_or_create(
            name=options["hpc_cluster"],
            defaults={"description": "Demo of the compute path: the compute function in a local process pool."},
        )
        hpc_endpoint, created = Endpoint.objects.update_or_create(
            cluster=hpc_cluster,
            framework=Framework.VLLM,
            model=options["hpc_model"],
            defaults={
                "backend": "local",
                "backend_config": {"vllm": {"host": server.hostname, "port": server.port}, "workers": 8},
                "enabled": True,
            },
        )
        hpc_endpoint.full_clean()
        verb = "Created" if created else "Updated"
        self.stderr.write(
            f"{verb} endpoint {hpc_endpoint.model} on cluster {hpc_cluster.name} -> local compute function"
        )
        if options["second_model_url"]:
            self._second_cluster(options)

    def _second_cluster(self, options: dict[str, Any]) -> None:
        scheduler: dict[str, Any] = {}
        if options["scheduler_commands"]:
            scheduler = {
                "kind": "pbs",
                "backend": "local",
                "user": "demo",
                "commands_dir": options["scheduler_commands"],
                "poll_seconds": 5,
            }
        cluster, _ = Cluster.objects.update_or_create(
            name="demo-b",
            defaults={"description": "A second demo cluster, whose batch jobs are read.", "scheduler": scheduler},
        )
        cluster.full_clean()
        served = [(options["model"], options["second_model_url"], "")]
        if scheduler:
            served.append((options["cold_model"], options["cold_model_url"], "demo-big"))
        for model, url, job_name in served:
            endpoint, created = Endpoint.objects.update_or_create(
                cluster=cluster,
                framework=Framework.VLLM,
                model=model,
                defaults={
                    "backend": "direct",
                    "backend_config": {"base_url": url},
                    "enabled": True,
                    "scheduler_job_name": job_name,
                },
            )
            endpoint.full_clean()
            verb = "Created" if created else "Updated"
            self.stderr.write(f"{verb} endpoint {model} on cluster {cluster.name} -> {url}")
