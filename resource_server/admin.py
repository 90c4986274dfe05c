"""Admin pages: register clusters, endpoints, users and keys; read usage."""

from __future__ import annotations

from typing import Any
from weakref import WeakKeyDictionary

from django.conf import settings
from django.contrib import admin
from django.contrib.admin.forms import AdminAuthenticationForm
from django.core.exceptions import ValidationError
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.utils.cache import add_never_cache_headers

from resource_server.models import ApiKey, Cluster, ComputeFunction, Endpoint, RequestLog, User
from resource_server.services.api_keys import api_key_create, api_key_revoke


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


class EndpointInline(admin.TabularInline[Endpoint, Cluster]):
    model = Endpoint
    fields = ("model", "framework", "backend", "enabled")
    show_change_link = True
    extra = 0
    can_delete = False
    readonly_fields = ("model", "framework", "backend", "enabled")


@admin.register(Cluster)
class ClusterAdmin(RoutingChangeMixin, admin.ModelAdmin[Cluster]):
    list_display = ("name", "description", "maintenance", "updated_at")
    list_filter = ("maintenance",)
    search_fields = ("name", "description")
    inlines = [EndpointInline]


@admin.register(Endpoint)
class EndpointAdmin(RoutingChangeMixin, admin.ModelAdmin[Endpoint]):
    list_display = ("model", "cluster", "framework", "backend", "enabled", "updated_at")
    list_filter = ("enabled", "cluster", "framework", "backend")
    search_fields = ("model",)
    list_select_related = ("cluster",)


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
