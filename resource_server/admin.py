"""Admin pages: register clusters, endpoints, users and keys; read usage."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from typing import Any
from weakref import WeakKeyDictionary

from django.conf import settings
from django.contrib import admin
from django.contrib.admin.forms import AdminAuthenticationForm
from django.core.exceptions import ValidationError
from django.db.models import Exists, OuterRef, Q, QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.utils import timezone
from django.utils.cache import add_never_cache_headers
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from resource_server.admin_usage import UsageDailyAdmin
from resource_server.models import (
    ApiKey,
    Cluster,
    ComputeFunction,
    Endpoint,
    EndpointStart,
    MaintenanceWindow,
    RequestLog,
    UsageDaily,
    User,
)
from resource_server.services.api_keys import api_key_create, api_key_revoke
from resource_server.status.shared import EndpointRecord, endpoint_records, jobs_record


def login_client_address(request: HttpRequest) -> str | None:
    """The address an admin sign-in is counted against (django-axes' AXES_CLIENT_IP_CALLABLE).

    REMOTE_ADDR, never a header the client wrote: behind nginx the server has already set it from
    X-Forwarded-For, walking the chain from the right past trusted proxies only (gunicorn's
    forwarded_allow_ips, FORWARDED_ALLOW_IPS, default loopback). From anywhere else the header is ignored.
    """
    return request.META.get("REMOTE_ADDR")


def _duration(seconds: float) -> str:
    if seconds >= 120:
        return f"{round(seconds / 60)} minutes"
    return f"{round(seconds)} seconds"


class ThrottledAdminAuthenticationForm(AdminAuthenticationForm):
    """The admin sign-in form, saying so when django-axes refused a locked-out client.

    The same words whether or not the username exists: the counts are kept for any username typed.
    """

    def get_invalid_login_error(self) -> ValidationError:
        if getattr(self.request, "axes_locked_out", False):
            pause = _duration(settings.AXES_COOLOFF_TIME.total_seconds())
            return ValidationError(
                f"Too many failed sign-ins from your network address or for this username. Sign-in is paused "
                f"for {pause}: until then no password is accepted, even the right one. Try again later, or "
                "ask another administrator to lift the pause (admin guide, 'Admin sign-in throttle').",
                code="locked_out",
            )
        return super().get_invalid_login_error()


admin.site.login_form = ThrottledAdminAuthenticationForm


class RoutingChangeMixin:
    """Apply routing edits at once in this process (other workers follow within ROUTING_CACHE_SECONDS)."""

    def save_model(self, request: HttpRequest, obj: Any, form: Any, change: bool) -> None:
        super().save_model(request, obj, form, change)  # type: ignore[misc]
        _routing_forget()

    def delete_model(self, request: HttpRequest, obj: Any) -> None:
        super().delete_model(request, obj)  # type: ignore[misc]
        _routing_forget()


def _routing_forget() -> None:
    # Imported here: django.setup() imports this module, and must not load the backends the root builds.
    from resource_server.bootstrap import runtime

    runtime().routing.forget()


# --- endpoint status, as the gateway's workers share it (status/shared.py): read from the cache, never probed here


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _seconds(seconds: float) -> str:
    if seconds >= 5400:
        return f"{seconds / 3600:.1f} h"
    return _duration(seconds)


# The endpoint records read for the page this thread renders: one read of the shared cache per page, not per
# row. Reset when a page starts (the admin's display methods are called with the row only, and the ModelAdmin
# serves every thread).
_page = threading.local()


def _page_starts() -> None:
    _page.records = None


def _record_of(endpoint: Endpoint) -> EndpointRecord | None:
    records: dict[int, EndpointRecord] | None = getattr(_page, "records", None)
    if records is None:
        records = _page.records = endpoint_records(list(Endpoint.objects.values_list("pk", flat=True)))
    return records.get(endpoint.pk)


class EndpointStatusColumns:
    """Columns and fields showing an endpoint's state, from the records the workers share in the cache (so the
    admin under WSGI sees what they see), never from a probe."""

    def get_queryset(self, request: HttpRequest) -> QuerySet[Any]:
        _page_starts()
        return super().get_queryset(request)  # type: ignore[misc, no-any-return]

    @admin.display(description="state")
    def state(self, endpoint: Endpoint) -> str:
        record = _record_of(endpoint)
        if record is None:
            return "unknown (not reported yet)"
        stale = record.status(time.time()).stale_seconds
        return f"{record.state} (stale: readings {_seconds(stale)} old)" if stale is not None else str(record.state)

    @admin.display(description="since")
    def state_since(self, endpoint: Endpoint) -> str:
        record = _record_of(endpoint)
        if record is None:
            return "-"
        return f"{_when(record.since)} ({_seconds(max(0.0, time.time() - record.since))} ago)"

    @admin.display(description="detail / last error")
    def state_detail(self, endpoint: Endpoint) -> str:
        record = _record_of(endpoint)
        if record is None:
            return "-"
        if record.maintenance_message is not None:
            return f"{record.detail} (until {_when(record.maintenance_ends) if record.maintenance_ends else 'ended'})"
        return record.detail or "-"

    @admin.display(description="ETA")
    def state_eta(self, endpoint: Endpoint) -> str:
        record = _record_of(endpoint)
        eta = record.status(time.time()).eta_seconds if record is not None else None
        if record is None or record.state not in ("queued", "starting"):
            return "-"
        return "unknown" if eta is None else f"about {_seconds(eta)}"

    @admin.display(description="reported")
    def state_reported(self, endpoint: Endpoint) -> str:
        """When a worker last wrote it: an old date means no worker is checking it (the gateway is down?)."""
        record = _record_of(endpoint)
        return "-" if record is None else _when(record.updated_at)

    @admin.display(description="queue position")
    def state_queue_position(self, endpoint: Endpoint) -> str:
        record = _record_of(endpoint)
        return "-" if record is None or record.queue_position is None else str(record.queue_position)


class MaintenanceWindowInline(admin.TabularInline[MaintenanceWindow, Any]):
    """Maintenance windows of the cluster or endpoint: while one is in force its models answer 503 with the
    message, and Retry-After the seconds to its end."""

    model = MaintenanceWindow
    fields = ("starts_at", "ends_at", "message")
    extra = 0
    verbose_name_plural = "maintenance windows (times in UTC; leave the end empty for an open-ended one)"


class ClusterMaintenanceInline(MaintenanceWindowInline):
    fk_name = "cluster"


class EndpointMaintenanceInline(MaintenanceWindowInline):
    fk_name = "endpoint"


class EndpointInline(EndpointStatusColumns, admin.TabularInline[Endpoint, Cluster]):
    model = Endpoint
    fields = ("model", "framework", "backend", "enabled", "state")
    show_change_link = True
    extra = 0
    can_delete = False
    readonly_fields = ("model", "framework", "backend", "enabled", "state")


def _window_in_force(target: str) -> Exists:
    now = timezone.now()
    return Exists(
        MaintenanceWindow.objects.filter(
            Q(ends_at__isnull=True) | Q(ends_at__gt=now), **{target: OuterRef("pk")}, starts_at__lte=now
        )
    )


_JOB_COLUMNS = ("job", "name", "state", "queue", "position", "nodes", "submitted", "started / estimated", "ends")


@admin.register(Cluster)
class ClusterAdmin(RoutingChangeMixin, admin.ModelAdmin[Cluster]):
    list_display = ("name", "description", "in_maintenance", "updated_at")
    search_fields = ("name", "description")
    readonly_fields = ("jobs_read", "jobs")
    inlines = [EndpointInline, ClusterMaintenanceInline]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Cluster]:
        return super().get_queryset(request).annotate(maintenance_now=_window_in_force("cluster"))

    @admin.display(description="in maintenance", boolean=True)
    def in_maintenance(self, cluster: Cluster) -> bool:
        return bool(getattr(cluster, "maintenance_now", False))

    @admin.display(description="jobs read")
    def jobs_read(self, cluster: Cluster) -> str:
        if not cluster.pk or not cluster.scheduler:
            return "its scheduler is not read (no scheduler config)"
        record = jobs_record(cluster.name)
        if record is None:
            return "not read yet"
        read = f"last read {_when(record.read_at)}" if record.read_at is not None else "never read successfully"
        if record.error is None:
            return read
        state = "stale" if record.jobs is not None else "unknown"
        return f"{read}; jobs {state}: the latest reading ({_when(record.attempted_at)}) failed: {record.error}"

    @admin.display(description="batch jobs")
    def jobs(self, cluster: Cluster) -> SafeString | str:
        record = jobs_record(cluster.name) if cluster.pk and cluster.scheduler else None
        if record is None or record.jobs is None:
            return "unknown"
        read = record.jobs
        rows = format_html_join(
            "",
            "<tr>" + "<td>{}</td>" * len(_JOB_COLUMNS) + "</tr>",
            (
                (
                    job.id,
                    job.name,
                    f"{job.state} ({job.scheduler_state})",
                    job.queue,
                    job.queue_position if job.queue_position is not None else "-",
                    job.nodes if job.nodes is not None else "-",
                    _when(job.submitted_at),
                    _when(job.started_at if job.started_at is not None else job.estimated_start_at),
                    _when(job.ends_at),
                )
                for job in read.jobs
            ),
        )
        head = format_html_join("", "<th>{}</th>", ((column,) for column in _JOB_COLUMNS))
        errors = format_html_join("", "<li>{}</li>", ((error,) for error in read.errors))
        return format_html(
            "<p>{} jobs of {} ({}); free nodes: {}</p><table><thead><tr>{}</tr></thead><tbody>{}</tbody></table>"
            "<ul>{}</ul>",
            len(read.jobs),
            read.user,
            read.scheduler,
            read.free_nodes if read.free_nodes is not None else "unknown",
            head,
            rows,
            errors,
        )


_STATUS_FIELDS = ("state", "state_since", "state_detail", "state_eta", "state_queue_position", "state_reported")


@admin.register(Endpoint)
class EndpointAdmin(EndpointStatusColumns, RoutingChangeMixin, admin.ModelAdmin[Endpoint]):
    list_display = ("model", "cluster", "framework", "backend", "enabled", "state", "state_since", "updated_at")
    list_filter = ("enabled", "cluster", "framework", "backend")
    search_fields = ("model",)
    list_select_related = ("cluster",)
    readonly_fields = _STATUS_FIELDS
    inlines = [EndpointMaintenanceInline]

    def get_fieldsets(self, request: HttpRequest, obj: Endpoint | None = None) -> Any:
        fields = [field for field in self.get_fields(request, obj) if field not in _STATUS_FIELDS]
        if obj is None:
            return [(None, {"fields": fields})]
        return [(None, {"fields": fields}), ("Status (as the gateway's workers see it)", {"fields": _STATUS_FIELDS})]


@admin.register(MaintenanceWindow)
class MaintenanceWindowAdmin(RoutingChangeMixin, admin.ModelAdmin[MaintenanceWindow]):
    list_display = ("__str__", "cluster", "endpoint", "starts_at", "ends_at", "message")
    list_filter = ("cluster",)
    search_fields = ("message", "cluster__name", "endpoint__model")
    list_select_related = ("cluster", "endpoint")
    fields = ("cluster", "endpoint", "starts_at", "ends_at", "message")

    def get_changeform_initial_data(self, request: HttpRequest) -> dict[str, Any]:
        return {"starts_at": timezone.now(), **super().get_changeform_initial_data(request)}


@admin.register(User)
class UserAdmin(admin.ModelAdmin[User]):
    list_display = ("username", "name", "identity_provider", "is_active", "created_at")
    list_filter = ("is_active", "identity_provider")
    search_fields = ("username", "name", "identity_id")


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin[ApiKey]):
    list_display = ("prefix", "name", "owner", "created_at", "expires_at", "revoked_at", "last_used_at")
    list_filter = (("revoked_at", admin.EmptyFieldListFilter), "expires_at", "created_at")
    search_fields = ("prefix", "name", "owner__username")
    list_select_related = ("owner",)
    readonly_fields = ("prefix", "created_at", "last_used_at", "revoked_at")
    fields = ("owner", "name", "expires_at", "prefix", "created_at", "last_used_at", "revoked_at")
    actions = ["revoke"]
    created_template = "admin/resource_server/apikey/created.html"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The new key's secret, from save_model to response_add of the same request. Held in memory
        # only: never in the session, a message or any other cookie.
        self._created: WeakKeyDictionary[HttpRequest, tuple[ApiKey, str]] = WeakKeyDictionary()

    def get_readonly_fields(self, request: HttpRequest, obj: ApiKey | None = None) -> tuple[str, ...]:
        fields = tuple(super().get_readonly_fields(request, obj))
        if obj is None:
            return fields
        # The secret authenticates as whoever owns the row (and the row holds its creator's sealed Globus
        # token): moving a key to another user would hand them a secret someone else holds.
        return ("owner", *fields)

    def save_model(self, request: HttpRequest, obj: ApiKey, form: Any, change: bool) -> None:
        if change:
            super().save_model(request, obj, form, change)
            return
        key, secret = api_key_create(owner=obj.owner, name=obj.name)
        if obj.expires_at:
            key.expires_at = obj.expires_at
            key.save(update_fields=["expires_at"])
        obj.pk, obj.prefix, obj.created_at = key.pk, key.prefix, key.created_at
        self._created[request] = (key, secret)

    def response_add(self, request: HttpRequest, obj: ApiKey, post_url_continue: str | None = None) -> HttpResponse:
        """Show the new key once, in this response: it is stored nowhere it could be read back."""
        created = self._created.pop(request, None)
        if created is None:
            return super().response_add(request, obj, post_url_continue)
        key, secret = created
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": "Copy the new API key",
            "key": key,
            "secret": secret,
        }
        response = TemplateResponse(request, self.created_template, context)
        # Neither the browser nor a proxy may keep the page: Back or a cache must not show the key again.
        add_never_cache_headers(response)
        return response

    @admin.action(description="Revoke the selected keys")
    def revoke(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        for key in queryset:
            api_key_revoke(key=key)
        self.message_user(request, f"Revoked {queryset.count()} key(s).")


@admin.register(RequestLog)
class RequestLogAdmin(admin.ModelAdmin[RequestLog]):
    list_display = (
        "created_at",
        "user",
        "model",
        "route",
        "streamed",
        "status_code",
        "error_code",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "audio_seconds",
        "latency_ms",
        "time_to_first_token_ms",
    )
    list_filter = ("status_code", "route", "streamed", "model", "created_at")
    search_fields = ("request_id", "client_request_id", "user__username", "model")
    date_hierarchy = "created_at"
    list_select_related = ("user",)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(ComputeFunction)
class ComputeFunctionAdmin(admin.ModelAdmin[ComputeFunction]):
    """Read-only: rows are written by `python manage.py register_functions`."""

    list_display = ("name", "function_uuid", "client_id", "registered_at")
    search_fields = ("name", "function_uuid", "client_id")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(EndpointStart)
class EndpointStartAdmin(admin.ModelAdmin[EndpointStart]):
    """Read-only: the status board records each cold start (job start to first healthy answer); the median of an
    endpoint's last 9 is the load time in its ETAs."""

    list_display = ("endpoint", "job_id", "started_at", "live_at", "load_seconds")
    list_filter = ("endpoint",)
    list_select_related = ("endpoint",)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


admin.site.register(UsageDaily, UsageDailyAdmin)
