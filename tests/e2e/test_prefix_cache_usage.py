"""The prefix cache through real processes and the official client: usage reports cached prompt tokens per team."""

import openai
import pytest

# What the API or the importer makes of a request, not what the database or broker can change: CI runs it once.
pytestmark = [pytest.mark.e2e, pytest.mark.backend_neutral]

SYSTEM = "You answer questions about the appliance: its ledger, its engine and its console. " * 10


@pytest.fixture(scope="module")
def model(box):
    box.manage("import_model", str(box.demo_dir / "demo-dense"), "--name", "cache-dense", "--kind", "dense", "--wait")
    box.manage("deploy", "cache-dense", "--wait")
    return "cache-dense"


def ask(box, key: str, model: str, question: str):
    client = openai.OpenAI(base_url=f"{box.url}/v1", api_key=key, max_retries=0, timeout=60)
    return client.chat.completions.create(
        model=model, messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
        max_tokens=4, temperature=0)


def test_a_teams_next_request_reuses_its_prompt_and_another_team_does_not(box, model):
    research, sales = box.new_key("cache-research"), box.new_key("cache-sales")
    first = ask(box, research, model, "What does the ledger keep?")
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    again = ask(box, research, model, "What does the ledger keep?")
    assert again.usage.prompt_tokens_details.cached_tokens == (again.usage.prompt_tokens - 1) // 16 * 16 > 0
    other_team = ask(box, sales, model, "What does the ledger keep?")
    assert other_team.usage.prompt_tokens_details.cached_tokens == 0
    # The same team, another question: the shared system prompt is reused.
    follow_up = ask(box, research, model, "And the console?")
    assert 0 < follow_up.usage.prompt_tokens_details.cached_tokens < follow_up.usage.prompt_tokens
