"""Data held by the gateway: clusters, the endpoints that serve models on them, users, keys, usage."""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.db import models
from django.db.models.functions import Coalesce
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
    context_length = models.PositiveIntegerField(
        null=True,
        blank=True,
        help_text="The model's context length in tokens (vLLM's --max-model-len). Token limits reserve this much for "
        "a request that sets no max_tokens. Empty: the LIMITS_DEFAULT_CONTEXT_TOKENS setting.",
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
    limits_exempt = models.BooleanField(
        default=False,
        help_text="A service account: no limit or budget applies to its requests (their usage is still recorded).",
    )
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


class Project(models.Model):
    """A project with an allocation: the members of one Globus group, whose requests are charged to it."""

    name = models.SlugField(
        max_length=64,
        unique=True,
        help_text="How researchers name it: the OpenAI client's project= (the OpenAI-Project header) charges a "
        "request to it.",
    )
    globus_group = models.UUIDField(unique=True, help_text="The Globus group whose members belong to the project.")
    description = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Limit(models.Model):
    """Limits and budgets for one scope (a user, an API key, a project, or every user), optionally narrowed to
    one model or one endpoint. Every limit that applies to a request is checked: the tightest wins.

    An empty field sets no limit of its kind. Counting: a user's and a key's limits count their own requests, a
    project's every request charged to the project, and an `everyone` limit each user's requests separately (a
    default for every user)."""

    user = models.ForeignKey(User, on_delete=models.CASCADE, null=True, blank=True, related_name="limits")
    api_key = models.ForeignKey(ApiKey, on_delete=models.CASCADE, null=True, blank=True, related_name="limits")
    project = models.ForeignKey(Project, on_delete=models.CASCADE, null=True, blank=True, related_name="limits")
    everyone = models.BooleanField(default=False, help_text="Applies to every user, each counted separately.")
    model = models.CharField(max_length=255, blank=True, help_text="Only requests for this model. Empty: all models.")
    endpoint = models.ForeignKey(
        Endpoint,
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="limits",
        help_text="Only requests routed first to this endpoint. Empty: all endpoints.",
    )
    concurrent = models.PositiveIntegerField(null=True, blank=True, help_text="Requests in flight at once.")
    requests_per_minute = models.PositiveIntegerField(null=True, blank=True)
    tokens_per_minute = models.PositiveBigIntegerField(null=True, blank=True)
    tokens_per_day = models.PositiveBigIntegerField(null=True, blank=True, help_text="Per UTC day.")
    tokens_per_month = models.PositiveBigIntegerField(null=True, blank=True, help_text="Per UTC calendar month.")
    allocation_tokens = models.PositiveBigIntegerField(
        null=True, blank=True, help_text="Tokens for the whole allocation period (its start and end below)."
    )
    allocation_starts = models.DateTimeField(null=True, blank=True)
    allocation_ends = models.DateTimeField(null=True, blank=True)
    note = models.CharField(max_length=255, blank=True, help_text="Why: an allocation award, a ticket number.")
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-everyone", "project__name", "user__username", "api_key__prefix", "model"]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(user__isnull=False, api_key__isnull=True, project__isnull=True, everyone=False)
                | models.Q(user__isnull=True, api_key__isnull=False, project__isnull=True, everyone=False)
                | models.Q(user__isnull=True, api_key__isnull=True, project__isnull=False, everyone=False)
                | models.Q(user__isnull=True, api_key__isnull=True, project__isnull=True, everyone=True),
                name="limit_one_scope",
            ),
            models.CheckConstraint(
                condition=models.Q(model="") | models.Q(endpoint__isnull=True), name="limit_model_or_endpoint"
            ),
            models.CheckConstraint(
                condition=models.Q(allocation_tokens__isnull=True)
                | models.Q(
                    allocation_starts__isnull=False,
                    allocation_ends__isnull=False,
                    allocation_ends__gt=models.F("allocation_starts"),
                ),
                name="limit_allocation_has_period",
            ),
            # One row per scope and narrowing, so that `set_limit` has one row to change and the admin refuses a
            # second. Coalesce: a NULL would make every row with it distinct.
            models.UniqueConstraint(
                Coalesce("user", 0),
                Coalesce("api_key", 0),
                Coalesce("project", 0),
                "everyone",
                "model",
                Coalesce("endpoint", 0),
                name="limit_one_per_scope_and_narrowing",
                violation_error_message="A limit for this scope and narrowing exists already: change that one.",
            ),
        ]

    def __str__(self) -> str:
        scope = (
            "everyone"
            if self.everyone
            else f"project {self.project}"
            if self.project_id
            else f"key {self.api_key}"
            if self.api_key_id
            else f"user {self.user}"
        )
        narrowed = f" on {self.model}" if self.model else f" on endpoint {self.endpoint}" if self.endpoint_id else ""
        return scope + narrowed

    def clean(self) -> None:
        super().clean()
        scopes = [self.user_id is not None, self.api_key_id is not None, self.project_id is not None, self.everyone]
        if sum(scopes) != 1:
            raise ValidationError("Choose one scope: a user, an API key, a project, or everyone.")
        if self.model and self.endpoint_id is not None:
            raise ValidationError({"endpoint": "Narrow the limit to a model or to an endpoint, not both."})
        if self.allocation_tokens is not None:
            if self.allocation_starts is None or self.allocation_ends is None:
                raise ValidationError({"allocation_ends": "An allocation needs the start and end of its period."})
            if self.allocation_ends <= self.allocation_starts:
                raise ValidationError({"allocation_ends": "The allocation must end after it starts."})


class RequestLog(models.Model):
    """One row per inference request, success or error: an accounting record, never edited or deleted by hand
    (`prune_usage` deletes rows older than the retention setting; the daily rollup keeps their totals)."""

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
    api_key_prefix = models.CharField(
        max_length=32, blank=True, help_text="The key's visible prefix: kept when the key is deleted."
    )
    project = models.ForeignKey(
        Project, on_delete=models.PROTECT, null=True, blank=True, related_name="requests", help_text="Charged to."
    )
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
            models.Index(fields=["api_key_prefix", "created_at"], name="requestlog_key_time"),
            models.Index(fields=["endpoint", "created_at"], name="requestlog_endpoint_time"),
            models.Index(fields=["project", "created_at"], name="requestlog_project_time"),
            # The admin's filters by status class and by route: rare values (5xx, audio) would otherwise be found
            # by reading the rows newest first until a page is full.
            models.Index(fields=["status_code", "created_at"], name="requestlog_status_time"),
            models.Index(fields=["route", "created_at"], name="requestlog_route_time"),
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


class UsageDaily(models.Model):
    """Usage per UTC day, user, project, key, model and endpoint: kept up to date as usage rows are inserted (in
    the same transaction), so reports and budgets read these instead of the raw rows. Plain ids, 0 for none, so
    that the row's key has no NULL and an insert can add to an existing row (ON CONFLICT ... DO UPDATE); the
    totals outlive the raw rows and the users, keys and endpoints they name."""

    day = models.DateField()
    user_id = models.BigIntegerField()
    project_id = models.BigIntegerField(default=0)
    api_key_prefix = models.CharField(max_length=32, default="", blank=True)
    model = models.CharField(max_length=255)
    endpoint_id = models.BigIntegerField(default=0)
    requests = models.BigIntegerField(default=0)
    errors = models.BigIntegerField(default=0, help_text="Answers with a status of 400 or above.")
    prompt_tokens = models.BigIntegerField(default=0)
    completion_tokens = models.BigIntegerField(default=0)
    total_tokens = models.BigIntegerField(default=0)
    latency_ms_sum = models.FloatField(default=0)

    class Meta:
        verbose_name = "daily usage"
        verbose_name_plural = "daily usage"
        ordering = ["-day"]
        constraints = [
            models.UniqueConstraint(
                fields=["day", "user_id", "project_id", "api_key_prefix", "model", "endpoint_id"],
                name="usagedaily_one_row_per_key",
            )
        ]
        indexes = [
            models.Index(fields=["user_id", "day"], name="usagedaily_user_day"),
            models.Index(fields=["project_id", "day"], name="usagedaily_project_day"),
        ]

    def __str__(self) -> str:
        return f"{self.day} user {self.user_id} {self.model}"


class LimitCounter(models.Model):
    """A limit's live counter when the gateway has no Redis: a token bucket's level or a budget's tokens used
    (limits/store_db.py keeps them; with REDIS_URL they live in Redis)."""

    key = models.CharField(max_length=400, primary_key=True)
    value = models.FloatField(default=0)
    stamp = models.FloatField(default=0, help_text="Bucket: when its level was computed (epoch seconds).")
    expires_at = models.FloatField(default=0, help_text="Epoch seconds after which the counter is forgotten; 0: never.")

    def __str__(self) -> str:
        return f"{self.key} = {self.value}"


class LimitLease(models.Model):
    """One request in flight, holding a slot of a concurrency limit (no-Redis store); expires unless refreshed,
    so a crashed worker's slots come back on their own."""

    key = models.CharField(max_length=400)
    reservation = models.CharField(max_length=64)
    expires_at = models.FloatField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["key", "reservation"], name="limitlease_one_per_reservation")]
        indexes = [models.Index(fields=["key", "expires_at"], name="limitlease_key_expiry")]

    def __str__(self) -> str:
        return f"{self.key} held by {self.reservation}"
