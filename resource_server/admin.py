"""Admin pages: register clusters, endpoints, users and keys; read usage."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from resource_server.models import ApiKey, Cluster, ComputeFunction, Endpoint, RequestLog, User
from resource_server.selectors.endpoints import routing_table_forget
from resource_server.services.api_keys import api_key_create, api_key_revoke


class RoutingChangeMixin:
    """Apply routing edits at once in this process (other workers follow within ROUTING_CACHE_SECONDS)."""

    def save_model(self, request: HttpRequest, obj: Any, form: Any, change: bool) -> None:
        super().save_model(request, obj, form, change)  # type: ignore[misc]
        routing_table_forget()

    def delete_model(self, request: HttpRequest, obj: Any) -> None:
        super().delete_model(request, obj)  # type: ignore[misc]
        routing_table_forget()


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

    def save_model(self, request: HttpRequest, obj: ApiKey, form: Any, change: bool) -> None:
        if change:
            super().save_model(request, obj, form, change)
            return
        key, secret = api_key_create(owner=obj.owner, name=obj.name)
        if obj.expires_at:
            key.expires_at = obj.expires_at
            key.save(update_fields=["expires_at"])
        obj.pk = key.pk
        messages.warning(request, f"Copy this API key now; it will not be shown again: {secret}")

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
