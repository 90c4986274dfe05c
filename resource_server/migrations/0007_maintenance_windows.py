"""A cluster's maintenance flag becomes a maintenance window: open-ended, starting when the migration runs, with the
flag's message (or the words the gateway used to say without one). Then the flag and its message go."""

from django.db import migrations
from django.utils import timezone

# What a cluster in maintenance without a message told researchers (selectors/endpoints.py before windows).
DEFAULT_MESSAGE = "The cluster is under maintenance."


def flags_to_windows(apps, schema_editor):
    Cluster = apps.get_model("resource_server", "Cluster")
    MaintenanceWindow = apps.get_model("resource_server", "MaintenanceWindow")
    now = timezone.now()
    for cluster in Cluster.objects.filter(maintenance=True):
        MaintenanceWindow.objects.create(
            cluster=cluster, starts_at=now, ends_at=None, message=cluster.maintenance_message or DEFAULT_MESSAGE
        )


def windows_to_flags(apps, schema_editor):
    """Back: a cluster with a window in force gets the flag and that window's message (windows stay)."""
    Cluster = apps.get_model("resource_server", "Cluster")
    MaintenanceWindow = apps.get_model("resource_server", "MaintenanceWindow")
    now = timezone.now()
    in_force = MaintenanceWindow.objects.filter(cluster__isnull=False, starts_at__lte=now).exclude(ends_at__lte=now)
    for window in in_force.order_by("starts_at"):
        Cluster.objects.filter(pk=window.cluster_id).update(maintenance=True, maintenance_message=window.message[:500])


class Migration(migrations.Migration):

    dependencies = [
        ("resource_server", "0006_scheduling"),
    ]

    operations = [
        migrations.RunPython(flags_to_windows, windows_to_flags),
        migrations.RemoveField(model_name="cluster", name="maintenance"),
        migrations.RemoveField(model_name="cluster", name="maintenance_message"),
    ]
