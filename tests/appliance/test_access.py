"""Who may use which variant: keys, teams, expiry, revocation, and what /v1 shows each caller.

Three standing callers: a member of `research` (alice), a member of `sales`
(bob, whose team may use only `sales-model`) and a stranger with no key.
"""
import json
from datetime import timedelta

import pytest
from django.utils import timezone

from appliance import actions
from appliance.api.admission import RegistryGatekeeper
from appliance.models import ApiKey, VariantStatus, hash_api_key
from appliance.quotas import current_usage
from appliance.api.gatekeeper import Caller

from tests.audit.tamper import wipe_ledger

from .teams import bearer, team_with_key, variant

pytestmark = pytest.mark.django_db
gk = RegistryGatekeeper()


@pytest.fixture
def cast():
    general = variant("general")
    sales_model = variant("sales-model", VariantStatus.DEPLOYED)
    variant("half-imported", VariantStatus.IMPORTING)
    research, alice_key, alice = team_with_key("research")
    sales, bob_key, bob = team_with_key("sales")
    sales.all_variants = False
    sales.save()
    sales.variants.set([sales_model])
    return {"general": general, "sales_model": sales_model, "research": research, "sales": sales,
            "alice": alice, "alice_key": alice_key, "bob": bob, "bob_key": bob_key}


def names(caller) -> list[str]:
    return sorted(card.name for card in gk.models(caller))


def test_keys_are_stored_as_hashes_with_a_visible_prefix(cast):
    key = cast["alice_key"]
    assert key.key_hash == hash_api_key(cast["alice"]) and cast["alice"] not in key.key_hash
    assert cast["alice"].startswith(key.prefix) and len(key.prefix) == len("sk-box-") + 6
    assert key.matches(cast["alice"]) and not key.matches(cast["alice"] + "x")


def test_authenticate_knows_members_and_not_strangers(cast):
    assert gk.authenticate(cast["alice"]).team == "research"
    assert gk.authenticate(cast["bob"]).team == "sales"
    assert gk.authenticate("sk-box-not-a-key") is None
    assert gk.authenticate("") is None


def test_a_team_uses_every_ready_variant_by_default(cast):
    assert names(gk.authenticate(cast["alice"])) == ["general", "sales-model"]


def test_a_restricted_team_sees_only_its_variants(cast):
    assert names(gk.authenticate(cast["bob"])) == ["sales-model"]


def test_a_key_narrows_what_its_team_may_use(cast):
    cast["alice_key"].variants.set([cast["general"]])
    caller = gk.authenticate(cast["alice"])
    assert names(caller) == ["general"]
    assert gk.admit(caller, "general").allowed
    refused = gk.admit(caller, "sales-model")
    assert (refused.allowed, refused.status, refused.code) == (False, 403, "model_not_permitted")
    assert "this API key" in refused.message


def test_a_key_cannot_widen_what_its_team_may_use(cast):
    cast["bob_key"].variants.set([cast["general"]])
    caller = gk.authenticate(cast["bob"])
    assert names(caller) == []
    refused = gk.admit(caller, "general")
    assert refused.status == 403 and "team 'sales'" in refused.message


def test_admit_refuses_a_variant_outside_the_team_in_openai_terms(cast):
    refused = gk.admit(gk.authenticate(cast["bob"]), "general")
    assert not refused.allowed and refused.status == 403
    assert "general" in refused.message and "administrator" in refused.message


def test_admit_lets_an_unknown_model_through_uncharged_so_the_api_answers_404(cast):
    admission = gk.admit(gk.authenticate(cast["alice"]), "no-such-model")
    assert admission.allowed and admission.ticket is None
    assert not gk.exists(gk.authenticate(cast["alice"]), "no-such-model")
    assert not gk.exists(gk.authenticate(cast["alice"]), "half-imported")


@pytest.mark.parametrize("model", ["a\x00b", "../general", "General", "x" * 10_000, ""])
def test_a_model_name_no_variant_can_have_is_unknown_without_a_query(cast, model, django_assert_num_queries):
    caller = gk.authenticate(cast["alice"])
    with django_assert_num_queries(1):  # the key's own read, never a lookup of the name
        admission = gk.admit(caller, model)
    assert admission.allowed and admission.ticket is None  # the API answers 404, uncharged
    with django_assert_num_queries(0):
        assert not gk.exists(caller, model)


def test_revocation_takes_effect_on_the_next_request(cast):
    caller = gk.authenticate(cast["alice"])
    assert gk.admit(caller, "general").allowed
    actions.do_revoke_api_key(cast["alice_key"], actor="admin:test")
    refused = gk.admit(caller, "general")  # the same caller object, one request later
    assert refused.status == 403 and refused.code == "key_inactive"
    assert gk.authenticate(cast["alice"]) is None


BURST = [("alice", "general"), ("bob", "general"), ("alice", "sales-model"), ("stranger", "general"),
         ("bob", "sales-model"), ("alice", "no-such-model"), ("alice", "general"), ("bob", "general")]


def test_a_burst_gets_the_answers_of_its_requests_one_by_one(cast):
    tokens = {**cast, "stranger": "sk-box-not-a-key"}
    burst = gk.authenticate_and_admit([(tokens[who], model) for who, model in BURST])
    one_by_one = []
    for who, model in BURST:
        caller = gk.authenticate(tokens[who])
        one_by_one.append((caller, None if caller is None else gk.admit(caller, model)))

    def summary(answer):
        caller, admission = answer
        return caller, admission and (admission.allowed, admission.status, admission.message, admission.code)

    assert [summary(a) for a in burst] == [summary(a) for a in one_by_one]
    assert summary(burst[3]) == (None, None)


def test_a_burst_reads_each_key_once_and_charges_an_unlimited_key_at_once(cast, django_assert_max_num_queries):
    gk.authenticate_and_admit([(cast["alice"], "general")])  # creates the usage counters
    with django_assert_max_num_queries(30) as queries:
        answers = gk.authenticate_and_admit([(cast["alice"], "general")] * 5)
    assert all(admission.allowed for _, admission in answers)
    sql = [q["sql"] for q in queries.captured_queries]
    key_reads = [q for q in sql if q.startswith('SELECT "appliance_apikey"')]
    assert len(key_reads) == 1 and "key_hash" in key_reads[0]
    assert sum(q.startswith('UPDATE "appliance_usagecounter"') for q in sql) == 1
    assert current_usage("key", cast["alice_key"].pk)["requests_per_minute"] == 6


def test_a_burst_of_a_limited_key_admits_the_earliest_up_to_the_limit(cast):
    team = cast["research"]
    team.requests_per_minute = 3
    team.save()
    answers = gk.authenticate_and_admit([(cast["alice"], "general")] * 5)
    assert [a.status for _, a in answers] == [200, 200, 200, 429, 429]
    assert answers[3][1].retry_after_s >= 1 and "3 requests per minute" in answers[3][1].message
    assert current_usage("team", team.pk)["requests_per_minute"] == 3


def test_a_revoked_key_is_refused_in_a_burst(cast):
    actions.do_revoke_api_key(cast["alice_key"], actor="admin:test")
    assert gk.authenticate_and_admit([(cast["alice"], "general"), (cast["bob"], "sales-model")])[0] == (None, None)


def test_an_expired_key_no_longer_authenticates(cast):
    key = cast["alice_key"]
    key.expires_at = timezone.now() + timedelta(minutes=5)
    key.save()
    assert gk.authenticate(cast["alice"]) is not None
    key.expires_at = timezone.now() - timedelta(seconds=1)
    key.save()
    assert gk.authenticate(cast["alice"]) is None
    assert not ApiKey.objects.get(pk=key.pk).is_active


def test_a_plain_caller_is_found_by_team_and_prefix(cast):
    caller = Caller(team="research", key_prefix=cast["alice_key"].prefix)
    assert gk.admit(caller, "general").allowed
    assert gk.admit(Caller(team="sales", key_prefix=cast["alice_key"].prefix), "general").code == "key_inactive"


# --- through HTTP, as each of the three callers -------------------------------------------------

@pytest.fixture
def committed(transactional_db):
    """Let the API's ledger thread commit; empty the ledger before the flush its triggers would refuse."""
    yield
    wipe_ledger()


@pytest.fixture
def loaded(demo_dir):
    """Load one real demo engine as `general` and `sales-model`, as the reconciler would have (names only matter)."""
    from appliance import engine_client
    from inference.engine import Engine

    engine = Engine(demo_dir / "demo-dense", device="cpu")
    for name in ("general", "sales-model"):
        engine_client.register(name, engine)
    yield
    for name in ("general", "sales-model"):
        engine_client.unregister(name)
    engine.close()


def test_models_endpoint_lists_what_each_caller_may_use_now(committed, cast, client, loaded):
    variant("ready-not-loaded")
    alice = client.get("/v1/models", **bearer(cast["alice"]))
    bob = client.get("/v1/models", **bearer(cast["bob"]))
    stranger = client.get("/v1/models")
    assert sorted(m["id"] for m in alice.json()["data"]) == ["general", "sales-model"]  # not ready-not-loaded
    assert [m["id"] for m in bob.json()["data"]] == ["sales-model"]
    assert stranger.status_code == 401 and stranger.json()["error"]["code"] == "invalid_api_key"


def test_a_loaded_variant_that_is_quarantined_is_not_listed(committed, cast, client, loaded):
    cast["general"].status = VariantStatus.QUARANTINED
    cast["general"].save()
    alice = client.get("/v1/models", **bearer(cast["alice"]))
    assert [m["id"] for m in alice.json()["data"]] == ["sales-model"]


def test_a_revoked_key_is_refused_on_its_next_request(committed, cast, client, loaded):
    assert client.get("/v1/models", **bearer(cast["alice"])).status_code == 200
    actions.do_revoke_api_key(cast["alice_key"], actor="admin:test")
    assert client.get("/v1/models", **bearer(cast["alice"])).status_code == 401


# Needs the gatekeeper wired into appliance/api/views.py (admit before the engine lookup).
def test_chat_answers_each_caller_by_access(committed, cast, client):
    body = json.dumps({"model": "general", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    alice = client.post("/v1/chat/completions", body, content_type="application/json", **bearer(cast["alice"]))
    bob = client.post("/v1/chat/completions", body, content_type="application/json", **bearer(cast["bob"]))
    stranger = client.post("/v1/chat/completions", body, content_type="application/json")
    assert alice.status_code == 503  # admitted; the variant is simply not loaded in this test
    assert bob.status_code == 403
    assert bob.json()["error"]["type"] == "permission_error"
    assert bob.json()["error"]["code"] == "model_not_permitted"
    assert stranger.status_code == 401
