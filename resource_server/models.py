"""Data held by the gateway: clusters, the endpoints that serve models on them, users, keys, usage."""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.db import models
from django.utils import timezone

from resource_server.backend_kinds import BACKEND_CHOICES, backend_config_errors, scheduler_config_errors


def _string_list_validator(value: object) -> None:
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise ValidationError('Enter a JSON list of non-empty strings, for example ["anl.gov"].')


class AccessRules(models.Model):
    """Who may use a cluster or endpoint: empty lists mean everyone the gateway admits."""

    allowed_groups = models.JSONField(
        default=list,
        blank=True,
        validators=[_string_list_validator],
        help_text="Globus group UUIDs; a caller in any of them is allowed. Empty: no group rule.",
    )
    allowed_domains = models.JSONField(
        default=list,
        blank=True,
        validators=[_string_list_validator],
        help_text="Identity-provider domains such as anl.gov; a caller from any of them is allowed. "
        "Empty: no domain rule.",
    )

    class Meta:
        abstract = True


class Cluster(AccessRules):
    name = models.SlugField(max_length=64, unique=True, help_text="Used in URLs: /resource_server/<name>/...")
    description = models.TextField(blank=True)
    scheduler = models.JSONField(
        default=dict,
        blank=True,
        help_text="How the gateway reads this cluster's batch jobs (a compute function on its login node); "
        "empty: no scheduler. See the admin guide.",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        super().clean()
        errors = scheduler_config_errors(self.scheduler)
        if errors:
            raise ValidationError({"scheduler": errors})


class Framework(models.TextChoices):
    VLLM = "vllm", "vLLM"
    SGLANG = "sglang", "SGLang"
    OPENAI = "openai", "OpenAI-compatible"


class Endpoint(AccessRules):
    """One model served on one cluster through one framework and one backend."""

    cluster = models.ForeignKey(Cluster, on_delete=models.PROTECT, related_name="endpoints")
    framework = models.CharField(max_length=32, choices=Framework.choices, default=Framework.VLLM)
    model = models.CharField(
        max_length=255, help_text="Exactly as researchers send it, e.g. meta-llama/Llama-3.1-8B-Instruct."
    )
    backend = models.CharField(max_length=32, choices=BACKEND_CHOICES)
    backend_config = models.JSONField(
        default=dict, help_text="Settings of the chosen backend; see the admin guide for each backend."
    )
    enabled = models.BooleanField(default=True)
    preference = models.IntegerField(
        default=0,
        help_text="Among endpoints of one model in the same state and equally loaded, the higher is chosen first.",
    )
    scheduler_job_name = models.CharField(
        max_length=255,
        blank=True,
        help_text="The name of the batch job that runs this endpoint's model server (PBS -N, Slurm --job-name), "
        "as the service account submits it: its jobs tell whether the model is queued or starting.",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["model", "cluster__name"]
        constraints = [
            models.UniqueConstraint(
                fields=["cluster", "framework", "model"], name="endpoint_unique_model_per_cluster_framework"
            )
        ]

    def __str__(self) -> str:
        return f"{self.model} ({self.framework})"

    def clean(self) -> None:
        super().clean()
        if self.model != self.model.strip() or not self.model:
            raise ValidationError({"model": "The model name must not be empty or start/end with spaces."})
        errors = backend_config_errors(self.backend, self.backend_config)
        if errors:
            raise ValidationError({"backend_config": errors})


# `User.identity_provider` of accounts an admin created on the gateway (no Globus identity behind them).
LOCAL_PROVIDER = "local"


class User(models.Model):
    """A researcher (or service client) known to the gateway by their identity."""

    identity_id = models.CharField(max_length=64, unique=True, help_text="Globus identity UUID, or a local id.")
    username = models.CharField(max_length=255, unique=True, help_text="e.g. jdoe@anl.gov")
    name = models.CharField(max_length=255, blank=True)
    identity_provider = models.CharField(max_length=255, blank=True)
    is_active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["username"]

    def __str__(self) -> str:
        return self.username


class ApiKey(models.Model):
    """A gateway API key. Only a hash of the secret is stored; the key is shown once at creation."""

    owner = models.ForeignKey(User, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=32, unique=True, editable=False, help_text="Visible part of the key.")
    secret_hash = models.CharField(max_length=64, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    # Sealed Globus Groups refresh token of the owner, so the key's group rights can be re-checked.
    groups_refresh_token = models.TextField(blank=True, editable=False)

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "API key"

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.name})"


class RequestLog(models.Model):
    """One row per inference request, success or error."""

    request_id = models.CharField(
        max_length=64, unique=True, help_text="The gateway's own id for the request (never the client's)."
    )
    client_request_id = models.CharField(
        max_length=64,
        blank=True,
        db_index=True,
        help_text="The X-Request-ID the client sent, if any: not unique, a client may reuse it.",
    )
    user = models.ForeignKey(User, on_delete=models.PROTECT, related_name="requests")
    api_key = models.ForeignKey(ApiKey, on_delete=models.SET_NULL, null=True, blank=True, related_name="requests")
    endpoint = models.ForeignKey(Endpoint, on_delete=models.SET_NULL, null=True, blank=True, related_name="requests")
    model = models.CharField(max_length=255, blank=True, help_text="Model name as the caller sent it.")
    route = models.CharField(max_length=32)
    streamed = models.BooleanField(default=False)
    status_code = models.PositiveSmallIntegerField()
    error_code = models.CharField(max_length=64, blank=True)
    prompt_tokens = models.PositiveIntegerField(null=True, blank=True)
    completion_tokens = models.PositiveIntegerField(null=True, blank=True)
    total_tokens = models.PositiveIntegerField(null=True, blank=True)
    audio_seconds = models.PositiveIntegerField(
        null=True, blank=True, help_text="The audio's duration, for a transcription that was not streamed."
    )
    gateway_route = models.CharField(
        max_length=200, blank=True, help_text="The X-Gateway-Route answer header: where the request went, and why."
    )
    latency_ms = models.FloatField()
    time_to_first_token_ms = models.FloatField(null=True, blank=True)
    request_body = models.JSONField(null=True, blank=True)
    response_body = models.JSONField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now, help_text="When the request arrived.")

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["user", "created_at"], name="requestlog_user_time"),
            models.Index(fields=["model", "created_at"], name="requestlog_model_time"),
            models.Index(fields=["created_at"], name="requestlog_time"),
        ]

    def __str__(self) -> str:
        return f"{self.request_id} {self.route} {self.status_code}"


class ComputeFunction(models.Model):
    """A compute function as registered with Globus Compute by one service account (register_functions).

    Functions belong to the account that registered them, so each account has its own id. The digest of
    the registered code makes re-running registration a no-op until the function's source changes.
    """

    name = models.CharField(max_length=100, help_text="The function in compute_functions, e.g. inference.")
    client_id = models.CharField(max_length=64, help_text="The service account (Globus client id) that owns it.")
    function_uuid = models.UUIDField(help_text="Goes in Endpoint backend configs and endpoints' allowed_functions.")
    source_sha256 = models.CharField(max_length=64, help_text="SHA-256 of the code as registered.")
    registered_at = models.DateTimeField()

    class Meta:
        ordering = ["name", "client_id"]
        constraints = [
            models.UniqueConstraint(fields=["name", "client_id"], name="compute_function_unique_per_account")
        ]

    def __str__(self) -> str:
        return f"{self.name} {self.function_uuid}"


class MaintenanceWindow(models.Model):
    """A planned outage of a cluster or of one endpoint: while it lasts, requests get 503 with its message."""

    cluster = models.ForeignKey(
        Cluster, on_delete=models.CASCADE, null=True, blank=True, related_name="maintenance_windows"
    )
    endpoint = models.ForeignKey(
        Endpoint, on_delete=models.CASCADE, null=True, blank=True, related_name="maintenance_windows"
    )
    starts_at = models.DateTimeField()
    ends_at = models.DateTimeField(null=True, blank=True, help_text="Empty: until an admin ends it.")
    message = models.CharField(max_length=500, help_text="Shown to researchers, e.g. why and until when.")

    class Meta:
        ordering = ["-starts_at"]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(cluster__isnull=False, endpoint__isnull=True)
                | models.Q(cluster__isnull=True, endpoint__isnull=False),
                name="maintenance_window_one_target",
            ),
            models.CheckConstraint(
                condition=models.Q(ends_at__isnull=True) | models.Q(ends_at__gt=models.F("starts_at")),
                name="maintenance_window_ends_after_start",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.cluster or self.endpoint} from {self.starts_at:%Y-%m-%d %H:%M}"

    def clean(self) -> None:
        super().clean()
        # A target may be assigned unsaved: the admin's inline does so on the page that adds its cluster.
        on_cluster = self.cluster_id is not None or (
            MaintenanceWindow.cluster.is_cached(self) and self.cluster is not None
        )
        on_endpoint = self.endpoint_id is not None or (
            MaintenanceWindow.endpoint.is_cached(self) and self.endpoint is not None
        )
        if on_cluster == on_endpoint:
            raise ValidationError("Choose a cluster or an endpoint (one of them).")
        if self.ends_at is not None and self.ends_at <= self.starts_at:
            raise ValidationError({"ends_at": "The window must end after it starts."})


class EndpointStart(models.Model):
    """One cold start of an endpoint's model: from its job starting to the model answering. The rolling median
    of the last ones is the load time in the ETA a cold model's 503 gives."""

    endpoint = models.ForeignKey(Endpoint, on_delete=models.CASCADE, related_name="starts")
    job_id = models.CharField(max_length=128, blank=True)
    started_at = models.DateTimeField(help_text="When the job started (the scheduler's start time).")
    live_at = models.DateTimeField(help_text="When the model first answered its health check.")
    load_seconds = models.FloatField()

    class Meta:
        ordering = ["-live_at"]
        indexes = [models.Index(fields=["endpoint", "-live_at"], name="endpointstart_recent")]

    def __str__(self) -> str:
        return f"{self.endpoint_id} loaded in {self.load_seconds:.0f} s"
