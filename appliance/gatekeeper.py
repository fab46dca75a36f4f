"""The registry's answers to the chat API: who is calling, and which variants exist."""
from inference.gatekeeper import Admission, Caller, ModelCard, UsageReport

from .models import ApiKey, ModelVariant, VariantStatus, hash_api_key

SERVABLE = (VariantStatus.READY, VariantStatus.DEPLOYED)


class RegistryGatekeeper:
    def authenticate(self, bearer_token: str) -> Caller | None:
        # Keys are looked up by their SHA-256: the index lookup compares digests,
        # so timing reveals nothing about the plaintext.
        key = (ApiKey.objects.select_related("team")
               .filter(key_hash=hash_api_key(bearer_token), revoked_at__isnull=True).first())
        if key is None:
            return None
        return Caller(team=key.team.name, key_prefix=key.prefix)

    def models(self, caller: Caller) -> list[ModelCard]:
        return [
            ModelCard(name=v.name, created=int(v.created_at.timestamp()), owned_by="appliance",
                      kind=v.kind, random_weights=v.random_weights)
            for v in ModelVariant.objects.filter(status__in=SERVABLE)
        ]

    def exists(self, caller: Caller, name: str) -> bool:
        return ModelVariant.objects.filter(name=name).exclude(status=VariantStatus.IMPORTING).exists()

    def admit(self, caller: Caller, model: str) -> Admission:
        return Admission(allowed=True)

    def settle(self, caller: Caller, admission: Admission, report: UsageReport) -> None:
        return None
