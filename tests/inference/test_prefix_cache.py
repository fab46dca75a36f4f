"""The prefix cache on the demo models (CPU): reuse within a scope, never across scopes, eviction, counts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from inference.demo_models import DEMO_SPECS
from inference.engine import Engine, SamplingParams
from inference.engine.cache import KVStore
from tests.inference.conftest import run
from tests.inference.test_engine_chunked import collect, long_prompt

SYSTEM = "You answer questions about the appliance: its ledger, its engine and its console. " * 12
GREEDY = SamplingParams(max_tokens=8, temperature=0)


def chat(engine: Engine, *turns: str) -> list[int]:
    """Return the prompt of a chat with the shared system prompt, alternating user and assistant turns."""
    messages = [{"role": "system", "content": SYSTEM}]
    for i, text in enumerate(turns):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return engine.encode_chat(messages)


@pytest.fixture(scope="module")
def engine(demo_dir: Path):
    with Engine(demo_dir / "demo-dense", device="cpu") as served:
        served.eos_token_ids = set()
        yield served


@pytest.mark.parametrize("name", DEMO_SPECS)
def test_a_loaded_prefix_computes_what_the_whole_prompt_does(demo_dir: Path, name: str) -> None:
    with Engine(demo_dir / name, device="cpu") as served:
        prompt = long_prompt(served, 200)
        with torch.inference_mode():
            whole_store = KVStore(256, 256)
            whole = served.runner.step([whole_store], [prompt])[0]
            blocks = [whole_store.copy_out(start, start + 16) for start in range(0, 192, 16)]
            reused = KVStore(256, 256)
            reused.load_prefix(blocks)
            assert reused.length == 192
            rest = served.runner.step([reused], [prompt[192:]])[0]
        torch.testing.assert_close(rest, whole, rtol=1e-4, atol=1e-4)


def test_a_second_request_of_the_scope_reuses_the_prompt_and_answers_the_same(engine: Engine) -> None:
    prompt = chat(engine, "What does the ledger keep?")
    uncached = run(collect(engine, prompt, GREEDY))[1]
    first_chunks, first = run(collect(engine, prompt, GREEDY, cache_scope="team-a"))
    second_chunks, second = run(collect(engine, prompt, GREEDY, cache_scope="team-a"))
    assert uncached.cached_tokens == first.cached_tokens == 0
    assert second.cached_tokens == (len(prompt) - 1) // 16 * 16 > 0
    assert all(chunk.cached_tokens == second.cached_tokens for chunk in second_chunks)
    assert first_chunks[-1].cached_tokens == 0
    assert first.output_ids == second.output_ids == uncached.output_ids


def test_a_team_never_reuses_another_teams_prompt(engine: Engine) -> None:
    prompt = chat(engine, "Which variant should a one-GPU box serve?")
    run(collect(engine, prompt, GREEDY, cache_scope="team-a"))
    other_team = run(collect(engine, prompt, GREEDY, cache_scope="team-b"))[1]
    no_scope = run(collect(engine, prompt, GREEDY))[1]
    same_team = run(collect(engine, prompt, GREEDY, cache_scope="team-a"))[1]
    assert other_team.cached_tokens == no_scope.cached_tokens == 0
    assert same_team.cached_tokens > 0


def test_each_next_turn_of_a_chat_reuses_the_turns_before(engine: Engine) -> None:
    turns = ["hi", "", "Describe the audit ledger.", "", "And the checkpoints?"]
    prompt = chat(engine, turns[0])
    first = run(collect(engine, prompt, GREEDY, cache_scope="chat"))
    turns[1] = "".join(chunk.text for chunk in first[0])
    second_prompt = chat(engine, *turns[:3])
    assert second_prompt[: len(prompt)] == prompt
    second = run(collect(engine, second_prompt, GREEDY, cache_scope="chat"))[1]
    assert second.cached_tokens >= len(prompt) // 16 * 16  # the system prompt and the whole first turn


def test_the_cache_stays_within_the_kv_budget_by_evicting_the_least_recent(demo_dir: Path) -> None:
    probe = Engine(demo_dir / "demo-dense", device="cpu")
    per_token = probe.kv_bytes_per_token
    probe.close()
    budget = per_token * 600  # a few prompts' blocks, not all of them
    with Engine(demo_dir / "demo-dense", device="cpu", kv_budget_bytes=budget) as served:
        served.eos_token_ids = set()
        prompts = [served.encode_chat([{"role": "user", "content": f"{i} " * 150}]) for i in range(6)]
        assert all(len(p) >= 150 for p in prompts)
        for prompt in prompts:
            run(collect(served, prompt, GREEDY, cache_scope="t"))
            figures = served.describe()
            assert figures["prefix_cache_bytes"] + figures["kv_reserved_bytes"] <= budget
        assert figures["prefix_cache_evicted_blocks"] > 0
        latest = run(collect(served, prompts[-1], GREEDY, cache_scope="t"))[1]
        oldest = run(collect(served, prompts[0], GREEDY, cache_scope="t"))[1]
    assert latest.cached_tokens > 0 and oldest.cached_tokens == 0  # the oldest prompt's blocks went first


def test_a_cache_scope_must_be_a_string(engine: Engine) -> None:
    async def scenario():
        engine.submit([5, 6], GREEDY, cache_scope=7)

    with pytest.raises(TypeError, match="cache_scope"):
        run(scenario())


def test_the_cache_can_be_turned_off(demo_dir: Path) -> None:
    with Engine(demo_dir / "demo-dense", device="cpu", prefix_cache=False) as served:
        prompt = chat(served, "hi")
        run(collect(served, prompt, GREEDY, cache_scope="t"))
        again = run(collect(served, prompt, GREEDY, cache_scope="t"))[1]
        assert again.cached_tokens == 0 and served.describe()["prefix_cache"] is False
