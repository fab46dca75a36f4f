"""Builders for the standing cast of the team tests: variants, teams and keys."""
from appliance.models import ApiKey, ModelVariant, Team, VariantStatus


def variant(name: str, status: str = VariantStatus.READY) -> ModelVariant:
    """Create a registered variant in the given state (no files: nothing loads it)."""
    return ModelVariant.objects.create(name=name, kind="dense", source_path=f"/nowhere/{name}", status=status)


def team_with_key(name: str, **limits) -> tuple[Team, ApiKey, str]:
    """Create a team with the given limits and one key; return both and the key's plaintext."""
    team = Team.objects.create(name=name, **limits)
    key, plaintext = ApiKey.issue(team, name="test")
    return team, key, plaintext


def bearer(plaintext: str) -> dict:
    """Return the Authorization header of a key, as the Django test client takes it."""
    return {"HTTP_AUTHORIZATION": f"Bearer {plaintext}"}
