"""The registry: model variants, their deployments, and the teams that use them."""
import hashlib
import secrets

from django.db import models
from django.utils import timezone


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


class ModelVariant(models.Model):
    name = models.SlugField(max_length=100, unique=True)
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
    # Demo models have random weights; the console says so wherever they appear.
    random_weights = models.BooleanField(default=False)
    metadata = models.JSONField(default=dict, blank=True)
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


class Deployment(models.Model):
    """What the administrator wants loaded (desired) and what the web process has (actual)."""

    variant = models.OneToOneField(ModelVariant, on_delete=models.CASCADE, related_name="deployment")
    desired = models.CharField(max_length=16, choices=DesiredState.choices, default=DesiredState.UNDEPLOYED)
    actual = models.CharField(max_length=16, choices=ActualState.choices, default=ActualState.UNDEPLOYED)
    device = models.CharField(max_length=100, blank=True)
    detail = models.TextField(blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"{self.variant.name}: {self.actual} (wants {self.desired})"

    @property
    def converged(self) -> bool:
        return self.desired == self.actual


class Team(models.Model):
    name = models.SlugField(max_length=100, unique=True)
    created_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return self.name


API_KEY_PREFIX = "sk-box-"


def hash_api_key(plaintext: str) -> str:
    """Return the stored form of a key: its SHA-256 (keys are random, so no salt is needed)."""
    return hashlib.sha256(plaintext.encode()).hexdigest()


class ApiKey(models.Model):
    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=100, blank=True)
    # The first characters of the key, kept so administrators can tell keys apart.
    prefix = models.CharField(max_length=20, editable=False)
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField(default=timezone.now)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.team.name})"

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None

    @classmethod
    def issue(cls, team: Team, name: str = "") -> tuple["ApiKey", str]:
        """Create a key for team; return it with its plaintext, which is never stored."""
        plaintext = API_KEY_PREFIX + secrets.token_urlsafe(32)
        key = cls.objects.create(
            team=team, name=name, prefix=plaintext[: len(API_KEY_PREFIX) + 6], key_hash=hash_api_key(plaintext)
        )
        return key, plaintext
