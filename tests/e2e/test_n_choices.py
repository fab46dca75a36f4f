"""`n` = 3 through real processes and the official client: three choices, streamed and not, the prompt reused."""
import json

import openai
import pytest

# What the API or the importer makes of a request, not what the database or broker can change: CI runs it once.
pytestmark = [pytest.mark.e2e, pytest.mark.backend_neutral]

SYSTEM = "You answer questions about the appliance: its ledger, its engine and its console. " * 4
MESSAGES = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What does the ledger keep?"}]


@pytest.fixture(scope="module")
def model(box):
    box.manage("import_model", str(box.demo_dir / "demo-dense"), "--name", "choices-dense", "--kind", "dense",
               "--wait")
    box.manage("deploy", "choices-dense", "--wait")
    return "choices-dense"


@pytest.fixture(scope="module")
def client(box) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{box.url}/v1", api_key=box.new_key("choices"), max_retries=0, timeout=120)


def ledger_details(box, request_id: str) -> dict:
    """Return the details of the request's ledger event, read by the box's own Django shell."""
    code = ("import json; from audit.models import AuditEvent; "
            f"print(json.dumps(AuditEvent.objects.filter(action='chat.completion', details__request_id={request_id!r})"
            ".get().details))")
    return json.loads(box.manage("shell", "-c", code).stdout.strip().splitlines()[-1])


def test_three_choices_share_one_prompt(box, model, client):
    reply = client.chat.completions.create(model=model, messages=MESSAGES, n=3, max_tokens=6, temperature=1.0,
                                           seed=21, logprobs=True)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert all(c.finish_reason in ("stop", "length") and c.logprobs.content for c in reply.choices)
    assert reply.usage.completion_tokens == sum(len(c.logprobs.content) for c in reply.choices)
    alone = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=6, temperature=1.0, seed=21)
    assert reply.usage.prompt_tokens == alone.usage.prompt_tokens  # the prompt is counted once
    assert reply.choices[0].message.content == alone.choices[0].message.content
    # The engine's child process computed the prompt for the first choice; the other two took its full blocks.
    details = ledger_details(box, reply.id)
    full_blocks = (reply.usage.prompt_tokens - 1) // 16 * 16
    assert full_blocks > 0
    assert details["choice_cached_tokens"][1:] == [full_blocks, full_blocks]
    assert len(details["choice_digests"]) == 3


def test_three_streamed_choices_arrive_under_their_indexes(model, client):
    whole = client.chat.completions.create(model=model, messages=MESSAGES, n=3, max_tokens=6, temperature=1.0,
                                           seed=8)
    texts = ["", "", ""]
    for chunk in client.chat.completions.create(model=model, messages=MESSAGES, n=3, max_tokens=6, temperature=1.0,
                                                seed=8, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == [c.message.content for c in whole.choices]


def test_the_sdks_stream_helper_assembles_three_choices(model, client):
    with client.chat.completions.stream(model=model, messages=MESSAGES, n=3, max_tokens=5, temperature=0,
                                        stream_options={"include_usage": True}) as stream:
        for _ in stream:
            pass
        # What the helper assembled (get_final_completion refuses an answer cut at max_tokens, as these are).
        final = stream.current_completion_snapshot
    assert [c.index for c in final.choices] == [0, 1, 2]
    alone = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=5, temperature=0)
    # Greedy: the three choices are the same answer, as OpenAI's are.
    assert [c.message.content for c in final.choices] == [alone.choices[0].message.content] * 3
    assert final.usage.completion_tokens == 3 * alone.usage.completion_tokens


def test_n_above_eight_is_a_400_naming_n(model, client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=model, messages=MESSAGES, n=9, max_tokens=2)
    assert refused.value.body["param"] == "n"


def test_completions_with_two_prompts_and_n_2(model, client):
    reply = client.completions.create(model=model, prompt=["The box", "The ledger keeps"], n=2, max_tokens=4,
                                      temperature=0, echo=True)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert [c.text.startswith(p) for c, p in zip(reply.choices, ["The box"] * 2 + ["The ledger keeps"] * 2)] == [
        True] * 4
    assert reply.choices[0].text == reply.choices[1].text and reply.choices[2].text == reply.choices[3].text
