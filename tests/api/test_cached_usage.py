"""`usage.prompt_tokens_details.cached_tokens`: the team is the prefix cache's scope, end to end through the view."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from django.test import AsyncClient

from appliance import engine_client
from appliance.api.gatekeeper import Admission, Caller, Gatekeeper, gatekeeper
from inference.engine import Engine
from tests.audit.tamper import wipe_ledger
from tests.inference.conftest import run

KEYS = {"sk-box-team-a-key": "team-a", "sk-box-team-b-key": "team-b"}
SYSTEM = "You answer questions about the appliance: its ledger, its engine and its console. " * 10


class TwoTeamsGatekeeper(Gatekeeper):
    """Lets in one key per team; every variant exists and is allowed."""

    def authenticate(self, bearer_token: str) -> Caller | None:
        team = KEYS.get(bearer_token)
        return Caller(team=team, key_prefix=bearer_token[:13]) if team else None

    def models(self, caller: Caller) -> list:
        return []

    def exists(self, caller: Caller, name: str) -> bool:
        return True

    def admit(self, caller: Caller, model: str) -> Admission:
        return Admission(True)

    def settle(self, caller, admission, report) -> None:
        pass


@pytest.fixture(scope="module")
def plain_engine(demo_dir: Path):
    # Plain mode, the default: exact mode has no prefix cache.
    with Engine(demo_dir / "demo-dense", device="cpu") as engine:
        yield engine


@pytest.fixture
def cached_api(transactional_db, settings, plain_engine: Engine):
    settings.API_GATEKEEPER = f"{__name__}.TwoTeamsGatekeeper"
    gatekeeper.cache_clear()
    engine_client.register("api-cached", plain_engine)
    yield "api-cached"
    engine_client.unregister("api-cached")
    gatekeeper.cache_clear()
    wipe_ledger()


def post(body: dict, key: str) -> tuple[int, object, object]:
    """POST a chat request with `key`; return (status, response, parsed JSON or the list of SSE events)."""

    async def go():
        response = await AsyncClient().post("/v1/chat/completions", json.dumps(body), content_type="application/json",
                                            headers={"Authorization": f"Bearer {key}"})
        if response.get("Content-Type", "").startswith("text/event-stream"):
            raw = b"".join([part async for part in response.streaming_content]).decode()
            events = [line[len("data: "):] for line in raw.splitlines() if line.startswith("data: ")]
            return response.status_code, response, [e if e == "[DONE]" else json.loads(e) for e in events]
        return response.status_code, response, response.json()

    return run(go())


def test_a_teams_second_request_reports_its_cached_prompt_tokens(cached_api) -> None:
    a, b = list(KEYS)
    question = {"model": cached_api, "max_tokens": 4, "temperature": 0,
                "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}]}
    status, _, first = post(question, key=a)
    assert status == 200 and first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    status, _, again = post(question, key=a)
    prompt_tokens = again["usage"]["prompt_tokens"]
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == (prompt_tokens - 1) // 16 * 16 > 0
    status, _, other_team = post(question, key=b)
    assert other_team["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}  # never another team's KV
    status, _, events = post({**question, "stream": True, "stream_options": {"include_usage": True}}, key=b)
    usage = events[-2]["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] > 0  # team b's own first request left its prompt
