"""Reasoning variants: the <think> section is reasoning_content, whole and streamed, and counted in usage."""

from __future__ import annotations

import pytest

from appliance import engine_client
from appliance.api.reasoning import ReasoningStream, split_reasoning
from inference.engine import Engine
from tests.api.test_chat_api import api, chat, post  # noqa: F401  (api is a fixture)
from tests.api.tool_variant import write_reasoning_variant


@pytest.fixture(scope="module")
def think_engine(demo_dir, tmp_path_factory):
    engine = Engine(write_reasoning_variant(demo_dir, tmp_path_factory.mktemp("think") / "demo-think"),
                    device="cpu")
    yield engine
    engine.close()


@pytest.fixture
def thinker(api, think_engine):
    engine_client.register("api-think", think_engine)
    yield "api-think"
    engine_client.unregister("api-think")


def test_an_answer_cut_inside_the_section_is_all_reasoning(thinker) -> None:
    status, _, body = post(chat(thinker, max_tokens=12, temperature=0))
    assert status == 200
    message = body["choices"][0]["message"]
    assert message["content"] == "" and message["reasoning_content"]
    assert body["usage"]["completion_tokens_details"]["reasoning_tokens"] == body["usage"]["completion_tokens"]


def test_the_stream_sends_the_same_reasoning_as_reasoning_deltas(thinker) -> None:
    _, _, whole = post(chat(thinker, max_tokens=12, temperature=0))
    _, _, events = post(chat(thinker, max_tokens=12, temperature=0, stream=True,
                             stream_options={"include_usage": True}))
    deltas = [e["choices"][0]["delta"] for e in events if e != "[DONE]" and e["choices"]]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == (
        whole["choices"][0]["message"]["reasoning_content"])
    assert not "".join(d.get("content") or "" for d in deltas)
    assert events[-2]["usage"]["completion_tokens_details"]["reasoning_tokens"] == 12


def test_a_variant_without_a_section_has_no_reasoning(api) -> None:
    _, _, body = post(chat(api, max_tokens=4))
    assert "reasoning_content" not in body["choices"][0]["message"]
    assert "completion_tokens_details" not in body["usage"]


@pytest.mark.parametrize("text,inside,expected", [
    ("weigh it\n</think>\n\nThe answer.", True, ("weigh it\n", "The answer.")),
    ("still thinking", True, ("still thinking", "")),
    ("<think>hm</think>Yes.", False, ("hm", "Yes.")),
    ("No section.", False, (None, "No section.")),
])
def test_split_reasoning(text, inside, expected) -> None:
    assert split_reasoning(text, inside) == expected


@pytest.mark.parametrize("pieces", [["weigh it</think>The answer."], ["weigh it</th", "ink>The", " answer."],
                                    ["w", "eigh it<", "/", "think>", "The answer."]])
def test_the_stream_splitter_holds_a_marker_split_across_chunks(pieces) -> None:
    stream = ReasoningStream(starts_inside=True)
    out = [d for piece in pieces for d in stream.push(piece)] + stream.finish()
    assert "".join(t for f, t in out if f == "reasoning_content") == "weigh it"
    assert "".join(t for f, t in out if f == "content") == "The answer."


def test_the_stream_splitter_opens_on_a_leading_think_tag() -> None:
    stream = ReasoningStream(starts_inside=False)
    out = [d for piece in ["<thi", "nk>x</think>", "y"] for d in stream.push(piece)] + stream.finish()
    assert out == [("reasoning_content", "x"), ("content", "y")]
