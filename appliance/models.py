"""The registry: model variants, their deployments, and the teams that use them."""
import hashlib
import hmac
import secrets

from django.conf import settings
from django.db import models
from django.utils import timezone

from .names import validate_node_name, validate_team_name, validate_variant_name


class VariantKind(models.TextChoices):
    MOE = "moe", "Mixture-of-Experts"
    DISTILLED = "distilled", "Distilled"
    DENSE = "dense", "Dense"


class VariantStatus(models.TextChoices):
    IMPORTING = "importing", "Importing"
    READY = "ready", "Ready"
    DEPLOYED = "deployed", "Deployed"
    FAILED = "failed", "Failed"
    QUARANTINED = "quarantined", "Quarantined"


# The lifecycle: importing → ready ⇄ deployed. A failed import may be retried;
# a quarantined variant (files no longer match the manifest) comes back only
# through a verification that passes.
VARIANT_TRANSITIONS = {
    VariantStatus.IMPORTING: {VariantStatus.READY, VariantStatus.FAILED},
    VariantStatus.READY: {VariantStatus.DEPLOYED, VariantStatus.QUARANTINED, VariantStatus.FAILED},
    VariantStatus.DEPLOYED: {VariantStatus.READY, VariantStatus.QUARANTINED},
    VariantStatus.FAILED: {VariantStatus.IMPORTING},
    VariantStatus.QUARANTINED: {VariantStatus.READY},
}


class InvalidTransition(Exception):
    pass


class Relation(models.TextChoices):
    """How a variant descends from a parent variant."""

    DISTILLED_FROM = "distilled_from", "distilled from"
    CONVERTED_FROM = "converted_from", "converted from"
    QUANTIZED_FROM = "quantized_from", "quantized from"
    FINETUNED_FROM = "finetuned_from", "fine-tuned from"


class ModelVariant(models.Model):
    # Checked by appliance.names (at most 64 characters); the column keeps room for rows written before.
    name = models.CharField(max_length=100, unique=True, validators=[validate_variant_name])
    kind = models.CharField(max_length=16, choices=VariantKind.choices)
    architecture = models.CharField(max_length=100, blank=True)
    model_type = models.CharField(max_length=50, blank=True)
    params_total = models.BigIntegerField(null=True, blank=True)
    # For MoE variants: the parameters one token passes through (shared
    # weights plus k of E routed experts per layer); equal to total otherwise.
    params_active = models.BigIntegerField(null=True, blank=True)
    dtype = models.CharField(max_length=20, blank=True)
    context_length = models.IntegerField(null=True, blank=True)
    source_path = models.CharField(max_length=1000)
    store_path = models.CharField(max_length=1000, blank=True)
    # {relative path: sha256 hex} of every file in the store copy.
    manifest = models.JSONField(default=dict, blank=True)
    size_bytes = models.BigIntegerField(default=0)
    status = models.CharField(
        max_length=16, choices=VariantStatus.choices, default=VariantStatus.IMPORTING
    )
    status_detail = models.TextField(blank=True)
    progress = models.PositiveSmallIntegerField(default=0)
    # What the running import is doing, in words: its phase, bytes done of total and rate.
    progress_detail = models.CharField(max_length=200, blank=True)
    # The import attempt that holds this variant (appliance.importer) and until when: the worker renews the
    # lease with its progress, so an expired one means the worker died and the import is reclaimed as failed.
    lease_owner = models.CharField(max_length=100, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    # Demo models have random weights; the console says so wherever they appear.
    random_weights = models.BooleanField(default=False)
    metadata = models.JSONField(default=dict, blank=True)
    # Where the files came from (appliance.provenance): path, original format and hash, upstream repository,
    # revision and license where the files state them, the importing admin.
    provenance = models.JSONField(default=dict, blank=True)
    # [{"name": parent variant, "relation": a Relation}], set at import; names, so lineage outlives a deletion.
    parents = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def can_become(self, status: str) -> bool:
        """Return whether the lifecycle allows moving to status."""
        return status in VARIANT_TRANSITIONS.get(VariantStatus(self.status), set())

    def transition(self, status: str, detail: str = "") -> None:
        """Move to status, or raise InvalidTransition naming both states."""
        if not self.can_become(status):
            raise InvalidTransition(f"variant {self.name} cannot go from {self.status} to {status}")
        self.status = status
        self.status_detail = detail

    def has_ready_copy(self, node: str | None = None) -> bool:
        """Return whether `node` (any node, for None) holds a copy of the files that matches the manifest."""
        ready = self.copies.filter(state=CopyState.READY)
        return (ready if node is None else ready.filter(node=node)).exists()

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "architecture": self.architecture,
            "params_total": self.params_total,
            "params_active": self.params_active,
            "dtype": self.dtype,
            "size_bytes": self.size_bytes,
            "status": self.status,
            "random_weights": self.random_weights,
        }


class DesiredState(models.TextChoices):
    DEPLOYED = "deployed", "Deployed"
    UNDEPLOYED = "undeployed", "Undeployed"


class ActualState(models.TextChoices):
    UNDEPLOYED = "undeployed", "Undeployed"
    LOADING = "loading", "Loading"
    DEPLOYED = "deployed", "Deployed"
    FAILED = "failed", "Failed"


class Engine(models.TextChoices):
    """Which engine serves a deployment; `auto` is resolved when the web process loads it (appliance.engines)."""

    BUILTIN = "builtin", "builtin (transformers, this project's engine)"
    VLLM = "vllm", "vLLM"
    SGLANG = "sglang", "SGLang"
    AUTO = "auto", "auto (vLLM where installed and CUDA is present, else builtin)"


class Deployment(models.Model):
    """What the administrator wants loaded (desired) and what the web process has (actual)."""

    variant = models.OneToOneField(ModelVariant, on_delete=models.CASCADE, related_name="deployment")
    desired = models.CharField(max_length=16, choices=DesiredState.choices, default=DesiredState.UNDEPLOYED)
    actual = models.CharField(max_length=16, choices=ActualState.choices, default=ActualState.UNDEPLOYED)
    device = models.CharField(max_length=100, blank=True)
    engine = models.CharField(max_length=16, choices=Engine.choices, default=Engine.BUILTIN)
    # The fit plan as the external engine's arguments (inference.fit.engine_flags), set by `deploy --plan`.
    engine_flags = models.JSONField(default=list, blank=True)
    # The node whose web process serves it (appliance.placement). Blank only on a deployment made before placement
    # existed: every node that reconciles it serves it, as then.
    node = models.CharField(max_length=64, blank=True, validators=[validate_node_name])
    # The other nodes that serve it too, each with an engine of its own (replicas; the API routes to the least
    # busy). This row's actual state, device and detail are the node's above; a replica's is its heartbeat (what
    # it serves) and its ledger events (deployment.load and .crashed, each naming the node).
    replicas = models.JSONField(default=list, blank=True)
    # The other nodes that each run a part of its one engine (vLLM's headless data-parallel ranks over several
    # boxes), in rank order; the node above is the head, which serves the API. engine_flags are then the arguments
    # every node shares, naming the head as inference.fit.engine_flags.HEAD_PLACEHOLDER.
    parts = models.JSONField(default=list, blank=True)
    # Counts the restarts of an engine over several nodes: when its head or a part ends unasked, the head and every
    # part start again together, for vLLM's ranks join one engine only when they all start (a lone new rank would
    # not rejoin the old ones).
    engine_epoch = models.PositiveIntegerField(default=0)
    detail = models.TextField(blank=True)
    # What the loaded engine really allocated (measured in its engine process, appliance.fitting.record_measurement),
    # shown next to the fit advisor's prediction.
    measured = models.JSONField(default=dict, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"{self.variant.name}: {self.actual} (wants {self.desired})"

    @property
    def converged(self) -> bool:
        return self.desired == self.actual


class FitAnalysis(models.Model):
    """The fit advisor's report on a variant for this box (or APPLIANCE_FIT_HARDWARE), from config.json alone."""

    variant = models.OneToOneField(ModelVariant, on_delete=models.CASCADE, related_name="fit")
    hardware = models.CharField(max_length=200)
    context = models.PositiveIntegerField()
    # "fits" | "fits only with expert offload" | "does not fit", as inference.fit says it.
    verdict = models.CharField(max_length=60)
    margin_gb = models.FloatField()
    max_concurrent = models.PositiveIntegerField(default=0)
    report = models.JSONField(default=dict)  # inference.fit.FitReport.to_dict()
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"{self.variant.name} on {self.hardware}: {self.verdict}"


class Limits(models.Model):
    """Rate limits and token budgets; empty means unlimited. Windows are calendar ones in UTC."""

    requests_per_minute = models.PositiveIntegerField(null=True, blank=True)
    tokens_per_minute = models.PositiveIntegerField(null=True, blank=True)
    tokens_per_day = models.PositiveBigIntegerField(null=True, blank=True)
    tokens_per_month = models.PositiveBigIntegerField(null=True, blank=True)

    LIMIT_FIELDS = ("requests_per_minute", "tokens_per_minute", "tokens_per_day", "tokens_per_month")

    class Meta:
        abstract = True

    def limits(self) -> dict:
        """Return {field: value} for every limit, None meaning unlimited."""
        return {name: getattr(self, name) for name in self.LIMIT_FIELDS}


class Team(Limits):
    name = models.CharField(max_length=100, unique=True, validators=[validate_team_name])
    # Default: every ready variant, including ones imported later.
    all_variants = models.BooleanField(
        default=True, help_text="May use every ready variant, including ones imported later.")
    variants = models.ManyToManyField(
        ModelVariant, blank=True, related_name="teams",
        help_text="Used only when 'all variants' is off: the variants this team may use.")
    # The per-user team behind the console's chat page (see appliance.console.chat).
    console_user = models.CharField(max_length=150, blank=True, editable=False)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def may_use(self, variant: ModelVariant) -> bool:
        """Return whether the team's access list includes variant."""
        return self.all_variants or self.variants.filter(pk=variant.pk).exists()


API_KEY_PREFIX = "sk-box-"


def hash_api_key(plaintext: str) -> str:
    """Return the stored form of a key: its SHA-256 (keys are random, so no salt is needed)."""
    return hashlib.sha256(plaintext.encode()).hexdigest()


class ApiKey(Limits):
    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=100, blank=True)
    # The first characters of the key, kept so administrators can tell keys apart.
    prefix = models.CharField(max_length=20, editable=False)
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField(default=timezone.now)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True, help_text="Empty: never expires.")
    variants = models.ManyToManyField(
        ModelVariant, blank=True, related_name="api_keys",
        help_text="Empty: whatever the team may use. Otherwise only these (and only if the team may too).")

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.team.name})"

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None and not self.is_expired

    @property
    def is_expired(self) -> bool:
        return self.expires_at is not None and self.expires_at <= timezone.now()

    def matches(self, plaintext: str) -> bool:
        """Return whether plaintext is this key, comparing digests in constant time."""
        return hmac.compare_digest(self.key_hash, hash_api_key(plaintext))

    def may_use(self, variant: ModelVariant) -> bool:
        """Return whether both the key's and its team's access lists include variant."""
        if not self.team.may_use(variant):
            return False
        narrowed = set(self.variants.values_list("pk", flat=True))  # one query: a key names a few variants
        return not narrowed or variant.pk in narrowed

    @classmethod
    def issue(cls, team: Team, name: str = "", expires_at=None) -> tuple["ApiKey", str]:
        """Create a key for team; return it with its plaintext, which is never stored."""
        plaintext = API_KEY_PREFIX + secrets.token_urlsafe(32)
        key = cls.objects.create(
            team=team, name=name, prefix=plaintext[: len(API_KEY_PREFIX) + 6], key_hash=hash_api_key(plaintext),
            expires_at=expires_at)
        return key, plaintext


class Window(models.TextChoices):
    MINUTE = "minute", "Minute"
    DAY = "day", "Day"
    MONTH = "month", "Month"


class UsageCounter(models.Model):
    """Requests and tokens one team or key used in one calendar window: the state rate limits read.

    Kept in the database, not in process memory, so every web process of the
    box (and every box sharing the database) charges the same counters.
    """

    scope = models.CharField(max_length=8)  # "team" or "key"
    scope_id = models.BigIntegerField()
    window = models.CharField(max_length=8, choices=Window.choices)
    window_start = models.DateTimeField()
    requests = models.PositiveBigIntegerField(default=0)
    tokens = models.PositiveBigIntegerField(default=0)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["scope", "scope_id", "window", "window_start"],
                                               name="usage_counter_one_per_window")]
        # The roll-up task prunes finished windows by age.
        indexes = [models.Index(fields=["window", "window_start"])]


class Outcome(models.TextChoices):
    OK = "ok", "OK"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled"
    REFUSED = "refused", "Refused"


class UsageRecord(models.Model):
    """One request as the chat API reported it; rolled up per hour and day, then pruned."""

    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    # Names, not foreign keys: usage outlives deleted variants and must not change when rows do.
    team = models.CharField(max_length=100)
    key_prefix = models.CharField(max_length=20, blank=True)
    variant = models.CharField(max_length=100)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    latency_ms = models.PositiveIntegerField(default=0)
    ttft_ms = models.PositiveIntegerField(null=True, blank=True)
    outcome = models.CharField(max_length=16, choices=Outcome.choices)


class Period(models.TextChoices):
    HOUR = "hour", "Hour"
    DAY = "day", "Day"


class UsageRollup(models.Model):
    """Usage of one team on one variant in one hour or day, computed from the raw records."""

    period = models.CharField(max_length=8, choices=Period.choices)
    start = models.DateTimeField()
    team = models.CharField(max_length=100)
    variant = models.CharField(max_length=100)
    requests = models.PositiveIntegerField(default=0)
    failed = models.PositiveIntegerField(default=0)
    cancelled = models.PositiveIntegerField(default=0)
    refused = models.PositiveIntegerField(default=0)
    prompt_tokens = models.PositiveBigIntegerField(default=0)
    completion_tokens = models.PositiveBigIntegerField(default=0)
    latency_sum_ms = models.PositiveBigIntegerField(default=0)
    # Percentiles over the successful requests of the bucket; None when there were none.
    latency_p50_ms = models.PositiveIntegerField(null=True, blank=True)
    latency_p95_ms = models.PositiveIntegerField(null=True, blank=True)
    ttft_p50_ms = models.PositiveIntegerField(null=True, blank=True)
    # Counts per bound of appliance.usage.LATENCY_BUCKETS_MS, so /metrics can serve a histogram.
    latency_buckets = models.JSONField(default=list)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["period", "start", "team", "variant"],
                                               name="usage_rollup_one_per_bucket")]
        indexes = [models.Index(fields=["period", "start"])]


class ConsolePassword(models.Model):
    """When a console user last chose their own password (production mode forces this once)."""

    user = models.OneToOneField("auth.User", on_delete=models.CASCADE, related_name="console_password")
    changed_at = models.DateTimeField(default=timezone.now)


class LoginFailure(models.Model):
    """One failed console sign-in; recent ones throttle further attempts across web processes."""

    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    username = models.CharField(max_length=150, db_index=True)
    address = models.CharField(max_length=64, db_index=True)


class NodeState(models.TextChoices):
    UP = "up", "Up"
    STALE = "stale", "Stale"
    DOWN = "down", "Down"


class Node(models.Model):
    """One box of the appliance: registered by its web process at start, kept fresh by its heartbeats."""

    name = models.CharField(max_length=64, unique=True, validators=[validate_node_name])
    address = models.CharField(max_length=300)  # http://HOST:PORT of its web process, for the other nodes
    version = models.CharField(max_length=50)
    # From the box's inventory at registration: [{"name", "memory_bytes"}] per GPU, and host memory.
    gpus = models.JSONField(default=list, blank=True)
    memory_bytes = models.BigIntegerField(default=0)
    started_at = models.DateTimeField()
    last_heartbeat = models.DateTimeField()
    # As of the last heartbeat: the variants its engines serve, and requests running or waiting in them.
    serving = models.JSONField(default=list, blank=True)
    outstanding = models.PositiveIntegerField(default=0)
    # The Celery queue its worker consumes: jobs on this node's files (copies, verification) are sent there.
    queue = models.CharField(max_length=200, blank=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return f"{self.name} ({self.address})"

    def state(self, now=None) -> str:
        """Return up, stale or down from how many heartbeat intervals ago the node last spoke."""
        silent_s = ((now or timezone.now()) - self.last_heartbeat).total_seconds()
        if silent_s >= settings.NODE_DOWN_AFTER * settings.NODE_HEARTBEAT_S:
            return NodeState.DOWN
        if silent_s >= settings.NODE_STALE_AFTER * settings.NODE_HEARTBEAT_S:
            return NodeState.STALE
        return NodeState.UP


class CopyState(models.TextChoices):
    COPYING = "copying", "Copying"
    READY = "ready", "Ready"
    QUARANTINED = "quarantined", "Quarantined"
    FAILED = "failed", "Failed"


class NodeCopy(models.Model):
    """One node's copy of a variant's files, in that node's own model store, and whether it matches the manifest.

    The importing node's copy is ready when the import is; a node that is to serve the variant and has none fetches
    one from a node whose copy is ready (appliance.copies), hashing it against the one manifest. A copy found
    altered is quarantined alone: the other nodes' copies serve on, and the variant itself is quarantined only
    when no ready copy is left.
    """

    variant = models.ForeignKey(ModelVariant, on_delete=models.CASCADE, related_name="copies")
    node = models.CharField(max_length=64, validators=[validate_node_name])
    state = models.CharField(max_length=16, choices=CopyState.choices)
    detail = models.TextField(blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["variant__name", "node"]
        constraints = [models.UniqueConstraint(fields=["variant", "node"], name="one_copy_per_node")]

    def __str__(self) -> str:
        return f"{self.variant.name} on {self.node}: {self.state}"


class Lease(models.Model):
    """A job that one process of the whole appliance may run at a time (beat's schedule): who holds it, until when.

    Taken and renewed with one conditional update (appliance.actions.do_take_lease), so two contenders on two
    boxes can never both hold it; a holder that dies stops renewing, and the lease passes on once it expires.
    """

    name = models.CharField(max_length=64, unique=True)
    holder = models.CharField(max_length=200)
    expires_at = models.DateTimeField()

    def __str__(self) -> str:
        return f"{self.name} held by {self.holder} until {self.expires_at:%H:%M:%S}"
