"""Admin pages: register clusters, endpoints, users and keys; read usage."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime
from typing import Any
from weakref import WeakKeyDictionary

from django import forms
from django.conf import settings
from django.contrib import admin
from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.admin.options import IncorrectLookupParameters
from django.core.exceptions import ValidationError
from django.core.paginator import Paginator
from django.db import connections
from django.db.models import Exists, OuterRef, Q, QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.cache import add_never_cache_headers
from django.utils.functional import cached_property
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from resource_server.admin_usage import UsageDailyAdmin, UsageRecordsReadOnly
from resource_server.models import (
    ApiKey,
    Cluster,
    ComputeFunction,
    Endpoint,
    EndpointStart,
    Limit,
    MaintenanceWindow,
    Project,
    RequestLog,
    UsageDaily,
    User,
)
from resource_server.routes import Route
from resource_server.services.api_keys import api_key_create, api_key_revoke
from resource_server.services.limits import LIMIT_FIELDS, limit_describe
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
    list_display = (
        "model",
        "cluster",
        "framework",
        "backend",
        "context_length",
        "enabled",
        "state",
        "state_since",
        "updated_at",
    )
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
    list_display = ("username", "name", "identity_provider", "is_active", "limits_exempt", "limits", "created_at")
    list_filter = ("is_active", "limits_exempt", "identity_provider")
    search_fields = ("username", "name", "identity_id")

    @admin.display(description="limits")
    def limits(self, user: User) -> SafeString:
        return _limits_link("user", user.pk)


class WideChangelist:
    """A list of many columns: they fit a 1400 px window beside the filters only without the admin's navigation
    sidebar (the breadcrumbs still lead back)."""

    def changelist_view(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> HttpResponse:
        context = {"is_nav_sidebar_enabled": False, **(extra_context or {})}
        return super().changelist_view(request, context)  # type: ignore[misc, no-any-return]


# --- limits and budgets (services/limits.py sets the same rows from `python manage.py set_limit`)


def _limits_link(scope: str, pk: int) -> SafeString:
    return format_html(
        '<a href="{}?{}__id__exact={}">limits</a>', reverse("admin:resource_server_limit_changelist"), scope, pk
    )


@admin.register(Project)
class ProjectAdmin(admin.ModelAdmin[Project]):
    list_display = ("name", "globus_group", "description", "limits", "created_at")
    search_fields = ("name", "description")
    fields = ("name", "globus_group", "description", "limits_in_words")
    readonly_fields = ("limits_in_words",)

    @admin.display(description="limits")
    def limits(self, project: Project) -> SafeString:
        return _limits_link("project", project.pk)

    @admin.display(description="limits")
    def limits_in_words(self, project: Project) -> SafeString | str:
        if project.pk is None:
            return "Save the project, then add its limits (Limits, Add limit)."
        rows = format_html_join(
            "",
            '<li><a href="{}">{}</a></li>',
            (
                (reverse("admin:resource_server_limit_change", args=[limit.pk]), limit_describe(limit))
                for limit in project.limits.select_related("endpoint")
            ),
        )
        add = reverse("admin:resource_server_limit_add")
        return format_html('<ul>{}</ul><a href="{}?project={}">Add a limit</a>', rows, add, project.pk)


def _positive_or_empty(value: int | None) -> int | None:
    if value is not None and value < 1:
        raise ValidationError("Enter 1 or more, or leave it empty for no limit of this kind.")
    return value


class LimitForm(forms.ModelForm[Limit]):
    """Refuses a limit the gateway could not apply, naming the field: the model's own checks (one scope, a model
    or an endpoint, an allocation with its period ending after it starts) and these."""

    class Meta:
        model = Limit
        fields = (
            "user",
            "api_key",
            "project",
            "everyone",
            "model",
            "endpoint",
            *LIMIT_FIELDS,
            "allocation_starts",
            "allocation_ends",
            "note",
        )

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        chosen = [name for name in ("user", "api_key", "project", "everyone") if data.get(name)]
        if len(chosen) > 1:
            for name in chosen:
                others = ", ".join(str(self.fields[other].label or other) for other in chosen if other != name)
                self.add_error(name, f"Only one scope per limit; {others} is chosen too.")
        for name in LIMIT_FIELDS:
            if name in data:
                try:
                    _positive_or_empty(data[name])
                except ValidationError as error:
                    self.add_error(name, error)
        if not any(data.get(name) is not None for name in LIMIT_FIELDS) and not self.errors:
            raise ValidationError("Set at least one limit or budget (a limit with none limits nothing).")
        if data.get("allocation_tokens") is None and (data.get("allocation_starts") or data.get("allocation_ends")):
            self.add_error("allocation_tokens", "An allocation period needs its tokens (or clear the period).")
        model = (data.get("model") or "").strip()
        if model and not Endpoint.objects.filter(model=model).exists():
            self.add_error(
                "model", f"No endpoint serves the model {model!r}: register it first, or check the spelling."
            )
        return data


def _number(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


@admin.register(Limit)
class LimitAdmin(WideChangelist, admin.ModelAdmin[Limit]):
    """Every limit that applies to a request is checked; the tightest wins (admin guide, "Limits, budgets and
    allocations")."""

    form = LimitForm
    list_display = (
        "scope",
        "narrowing",
        "concurrent_",
        "rpm",
        "tpm",
        "per_day",
        "per_month",
        "allocation",
        "note",
    )
    list_display_links = ("scope",)
    list_filter = ("everyone", "project")
    search_fields = ("user__username", "api_key__prefix", "project__name", "model", "note")
    list_select_related = ("user", "api_key", "project", "endpoint__cluster")
    autocomplete_fields = ("user", "api_key", "project")
    fieldsets = (
        (
            "Scope: choose one",
            {
                "fields": ("user", "api_key", "project", "everyone"),
                "description": "A user's or a key's limits count their own requests; a project's, every request "
                "charged to it; everyone's, each user's requests separately (a default for every user).",
            },
        ),
        (
            "Narrowing (optional): a model or an endpoint",
            {"fields": ("model", "endpoint"), "description": "Empty: the limit counts requests for every model."},
        ),
        (
            "Rate limits",
            {
                "fields": ("concurrent", "requests_per_minute", "tokens_per_minute"),
                "description": "Empty: no limit of that kind. Tokens are reserved at admission (prompt estimate plus "
                "max_tokens, or the endpoint's context length) and settled to the real usage.",
            },
        ),
        ("Budgets", {"fields": ("tokens_per_day", "tokens_per_month")}),
        (
            "Allocation",
            {
                "fields": ("allocation_tokens", "allocation_starts", "allocation_ends"),
                "description": "Tokens for one period (times in UTC): the requests made between its start and its "
                "end count against it.",
            },
        ),
        (None, {"fields": ("note",)}),
    )

    @admin.display(description="scope")
    def scope(self, limit: Limit) -> str:
        if limit.everyone:
            return "everyone (each user)"
        if limit.project is not None:
            return f"project {limit.project.name}"
        if limit.api_key is not None:
            return f"key {limit.api_key.prefix}"
        return f"user {limit.user}"

    @admin.display(description="narrowed to")
    def narrowing(self, limit: Limit) -> str:
        if limit.model:
            return f"model {limit.model}"
        if limit.endpoint is not None:
            return f"endpoint #{limit.endpoint.pk} ({limit.endpoint.model} on {limit.endpoint.cluster.name})"
        return "-"

    @admin.display(description="concurrent", ordering="concurrent")
    def concurrent_(self, limit: Limit) -> str:
        return _number(limit.concurrent)

    @admin.display(description="requests / min", ordering="requests_per_minute")
    def rpm(self, limit: Limit) -> str:
        return _number(limit.requests_per_minute)

    @admin.display(description="tokens / min", ordering="tokens_per_minute")
    def tpm(self, limit: Limit) -> str:
        return _number(limit.tokens_per_minute)

    @admin.display(description="tokens / day", ordering="tokens_per_day")
    def per_day(self, limit: Limit) -> str:
        return _number(limit.tokens_per_day)

    @admin.display(description="tokens / month", ordering="tokens_per_month")
    def per_month(self, limit: Limit) -> str:
        return _number(limit.tokens_per_month)

    @admin.display(description="allocation")
    def allocation(self, limit: Limit) -> str:
        if limit.allocation_tokens is None or limit.allocation_starts is None or limit.allocation_ends is None:
            return "-"
        period = f"{limit.allocation_starts:%Y-%m-%d} to {limit.allocation_ends:%Y-%m-%d}"
        return f"{limit.allocation_tokens:,} ({period})"


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


# --- usage rows: read-only accounting records, listed fast at millions of rows


# Filtered lists whose planner estimate is above this are shown with the estimate, not counted: counting every
# matching row of a large table reads them all (the unfiltered list at 300,000 rows took seconds).
EXACT_COUNT_UP_TO = 10_000


class EstimatedCountPaginator(Paginator[Any]):
    """Counts exactly when few rows match; on PostgreSQL, past EXACT_COUNT_UP_TO, takes the planner's estimate
    (its statistics, kept by autovacuum's ANALYZE), which costs a plan instead of a scan."""

    @cached_property
    def count(self) -> int:
        queryset = self.object_list
        if not isinstance(queryset, QuerySet) or connections[queryset.db].vendor != "postgresql":
            return super().count
        plan = json.loads(queryset.order_by().explain(format="json"))
        estimate = int(plan[0]["Plan"]["Plan Rows"])
        return estimate if estimate > EXACT_COUNT_UP_TO else super().count


class ChoicesFilter(admin.SimpleListFilter):
    """A filter whose choices are a fixed or small list (never the distinct values of the log, which takes a
    scan of every row and makes each misspelling a permanent entry); an unknown value is refused."""

    def choices_of(self) -> list[tuple[str, str]]:
        raise NotImplementedError

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return self.choices_of()

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        if value is None:
            return queryset
        if value not in dict(self.lookup_choices):
            raise IncorrectLookupParameters(f"{self.title}: no choice {value!r}")
        return self.filtered(queryset, value)

    def filtered(self, queryset: QuerySet[Any], value: str) -> QuerySet[Any]:
        raise NotImplementedError


class StatusClassFilter(ChoicesFilter):
    title = "status"
    parameter_name = "status"

    def choices_of(self) -> list[tuple[str, str]]:
        return [("2", "2xx success"), ("4", "4xx refused"), ("5", "5xx failed")]

    def filtered(self, queryset: QuerySet[Any], value: str) -> QuerySet[Any]:
        low = int(value) * 100
        return queryset.filter(status_code__gte=low, status_code__lt=low + 100)


class RouteFilter(ChoicesFilter):
    title = "route"
    parameter_name = "route"

    def choices_of(self) -> list[tuple[str, str]]:
        return [(route.value, route.value) for route in Route]

    def filtered(self, queryset: QuerySet[Any], value: str) -> QuerySet[Any]:
        return queryset.filter(route=value)


class ModelFilter(ChoicesFilter):
    """The registered endpoints' models; the search box finds a model by any name, registered or not."""

    title = "model"
    parameter_name = "model"

    def choices_of(self) -> list[tuple[str, str]]:
        names = Endpoint.objects.order_by("model").values_list("model", flat=True).distinct()
        return [(name, name) for name in names]

    def filtered(self, queryset: QuerySet[Any], value: str) -> QuerySet[Any]:
        return queryset.filter(model=value)


class ClusterFilter(ChoicesFilter):
    """By the endpoint's cluster, as its endpoints' ids: the log's endpoint index answers it, with no join."""

    title = "cluster"
    parameter_name = "cluster"

    def choices_of(self) -> list[tuple[str, str]]:
        return [(str(pk), name) for pk, name in Cluster.objects.values_list("pk", "name")]

    def filtered(self, queryset: QuerySet[Any], value: str) -> QuerySet[Any]:
        endpoints = list(Endpoint.objects.filter(cluster_id=int(value)).values_list("pk", flat=True))
        return queryset.filter(endpoint_id__in=endpoints)


class EndpointFilter(ChoicesFilter):
    title = "endpoint"
    parameter_name = "endpoint"

    def choices_of(self) -> list[tuple[str, str]]:
        return [
            (str(endpoint.pk), f"{endpoint.model} on {endpoint.cluster.name} ({endpoint.framework}, #{endpoint.pk})")
            for endpoint in Endpoint.objects.select_related("cluster")
        ]

    def filtered(self, queryset: QuerySet[Any], value: str) -> QuerySet[Any]:
        return queryset.filter(endpoint_id=int(value))


def _milliseconds(value: float | None) -> str:
    """85 ms, 1.2 s, 14 s, 3.5 min: two significant figures or so, never 15 decimals."""
    if value is None:
        return "-"
    # A no-break space: the number and its unit stay on one line.
    if value < 10:
        return f"{value:.1f}\u00a0ms"
    if value < 1000:
        return f"{value:.0f}\u00a0ms"
    if value < 10_000:
        return f"{value / 1000:.1f}\u00a0s"
    if value < 120_000:
        return f"{value / 1000:.0f}\u00a0s"
    return f"{value / 60_000:.1f}\u00a0min"


# The part of a long model name shown in the list (the whole name is its tooltip and on the row's page).
MODEL_SHOWN = 24


@admin.register(RequestLog)
class RequestLogAdmin(UsageRecordsReadOnly, WideChangelist, admin.ModelAdmin[RequestLog]):
    """Usage rows are accounting records: listed and shown, never added, changed or deleted here (`prune_usage`
    deletes rows past the retention, their totals kept in the daily rollup)."""

    list_display = (
        "time",
        "username",
        "key",
        "project_name",
        "model_name",
        "cluster",
        "endpoint_number",
        "status",
        "tokens",
        "latency",
        "ttft",
        "streamed",
    )
    list_display_links = ("time",)
    list_filter = (
        StatusClassFilter,
        RouteFilter,
        ModelFilter,
        ClusterFilter,
        EndpointFilter,
        "project",
        "streamed",
        "created_at",
    )
    search_help_text = (
        "An exact request id, client request id (X-Request-ID), key prefix or model name; or part of a username, "
        "or of a registered model's name."
    )
    search_fields = ("request_id",)  # shows the search box; get_search_results says what it matches
    list_select_related = ("user", "project", "endpoint__cluster")
    show_full_result_count = False
    paginator = EstimatedCountPaginator
    list_per_page = 50

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[RequestLog], search_term: str
    ) -> tuple[QuerySet[RequestLog], bool]:
        """Equality on indexed columns only: a substring search would read every row of the log."""
        term = search_term.strip()
        if not term:
            return queryset, False
        match = Q(request_id=term) | Q(client_request_id=term) | Q(api_key_prefix=term) | Q(model=term)
        users = list(User.objects.filter(username__icontains=term).values_list("pk", flat=True)[:100])
        if users:
            match |= Q(user_id__in=users)
        models = list(Endpoint.objects.filter(model__icontains=term).values_list("model", flat=True).distinct())
        if models:
            match |= Q(model__in=models)
        return queryset.filter(match), False

    @admin.display(description="time (UTC)", ordering="created_at")
    def time(self, row: RequestLog) -> str:
        return row.created_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")

    @admin.display(description="user", ordering="user__username")
    def username(self, row: RequestLog) -> SafeString:
        # A long address may wrap before its @, not widen the column.
        name, at, domain = row.user.username.partition("@")
        return format_html("{}<wbr>{}{}", name, at, domain)

    @admin.display(description="key")
    def key(self, row: RequestLog) -> str:
        return row.api_key_prefix or "-"

    @admin.display(description="project")
    def project_name(self, row: RequestLog) -> str:
        return row.project.name if row.project is not None else "-"

    @admin.display(description="model")
    def model_name(self, row: RequestLog) -> SafeString:
        # Without its organisation (the filter and the tooltip name it in full): meta-llama/Llama-3.1-8B-Instruct
        # reads Llama-3.1-8B-Instruct.
        name = row.model.rsplit("/", 1)[-1] or row.model
        shown = name if len(name) <= MODEL_SHOWN else name[: MODEL_SHOWN - 1] + "…"
        return format_html('<span title="{}">{}</span>', row.model, shown)

    @admin.display(description="cluster")
    def cluster(self, row: RequestLog) -> str:
        return row.endpoint.cluster.name if row.endpoint is not None else "-"

    @admin.display(description="endpoint")
    def endpoint_number(self, row: RequestLog) -> str:
        return f"#{row.endpoint_id} {row.endpoint.framework}" if row.endpoint is not None else "-"

    @admin.display(description="status", ordering="status_code")
    def status(self, row: RequestLog) -> SafeString:
        return format_html('<span title="{}">{}</span>', row.error_code, row.status_code)

    @admin.display(description="tokens in / out")
    def tokens(self, row: RequestLog) -> str:
        if row.audio_seconds is not None:
            return f"{row.audio_seconds} s audio"
        if row.prompt_tokens is None and row.completion_tokens is None:
            return "-"
        prompt = "-" if row.prompt_tokens is None else f"{row.prompt_tokens:,}"
        completion = "-" if row.completion_tokens is None else f"{row.completion_tokens:,}"
        return f"{prompt} / {completion}"

    @admin.display(description="latency", ordering="latency_ms")
    def latency(self, row: RequestLog) -> str:
        return _milliseconds(row.latency_ms)

    @admin.display(description="TTFT")
    def ttft(self, row: RequestLog) -> str:
        return _milliseconds(row.time_to_first_token_ms)


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
