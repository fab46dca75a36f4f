"""Constrained decoding in the engine: on random-weight models every answer parses and holds its schema."""

from __future__ import annotations

import asyncio
import json

import jsonschema_rs
import pytest

from inference.engine import Engine, SamplingParams
from inference.engine.grammar import ANY_OBJECT, GrammarError, json_schema_grammar
from inference.engine.sampling import apply_mask
from tests.inference.conftest import run

# Everything the issue names: nested objects, enums, integer ranges, arrays, additionalProperties false,
# required keys. Strings and arrays are bounded so a random model reaches the end within max_tokens.
SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["name", "level", "tags", "owner"],
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "level": {"type": "integer", "minimum": 1, "maximum": 5},
        "colour": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 1, "maxItems": 3},
        "owner": {"type": "object", "additionalProperties": False, "required": ["id"],
                  "properties": {"id": {"type": "integer", "minimum": -3, "maximum": 300},
                                 "ok": {"type": "boolean"}}},
    },
}
VALIDATOR = jsonschema_rs.validator_for(SCHEMA)


async def generate(engine: Engine, params: SamplingParams) -> tuple[str, str, int]:
    text, finish, tokens = [], None, 0
    async for chunk in engine.stream(engine.tokenizer("Describe the box.")["input_ids"], params):
        text.append(chunk.text)
        finish, tokens = chunk.finish_reason or finish, chunk.completion_tokens
    return "".join(text), finish, tokens


@pytest.mark.parametrize("name", ["demo-dense", "demo-distilled", "demo-moe"])
def test_sampled_answers_hold_the_schema_on_every_demo_model(engines, name) -> None:
    engine = engines[name]
    grammar = json_schema_grammar(SCHEMA)

    async def go():
        return await asyncio.gather(*[generate(engine, SamplingParams(
            max_tokens=400, temperature=1.0, seed=seed, grammar=grammar)) for seed in range(8)])

    for text, finish, _ in run(go()):
        assert finish == "stop", text
        VALIDATOR.validate(json.loads(text))


def test_greedy_json_object_is_an_object(engines) -> None:
    # ANY_OBJECT bounds no number's length, so a random model's greedy path may write one digit forever (the
    # Qwen2 demo writes {"":5555...); the grammar then still holds every token, and the answer ends at max_tokens.
    closed = 0
    for engine in engines.values():
        text, finish, tokens = run(generate(engine, SamplingParams(max_tokens=400, temperature=0,
                                                                   grammar=json_schema_grammar(ANY_OBJECT))))
        if finish == "length":
            assert tokens == 400 and text.startswith("{"), text
            continue
        assert finish == "stop"
        assert isinstance(json.loads(text), dict)
        closed += 1
    assert closed >= 2


def test_constrained_and_free_requests_share_steps(dense) -> None:
    grammar = json_schema_grammar(SCHEMA)
    before = dense.describe()

    async def go():
        constrained = [generate(dense, SamplingParams(max_tokens=400, temperature=1.0, seed=s, grammar=grammar))
                       for s in range(2)]
        free = [generate(dense, SamplingParams(max_tokens=16, temperature=1.0, seed=s)) for s in range(2)]
        return await asyncio.gather(*constrained, *free)

    results = run(go())
    after = dense.describe()
    steps = after["steps"] - before["steps"]
    generated = sum(tokens for _, _, tokens in results)
    # One request per step would take one step per generated token; sharing takes fewer.
    assert steps < generated
    for text, _, _ in results[:2]:
        VALIDATOR.validate(json.loads(text))


@pytest.mark.parametrize("keyword,schema", [
    ("uniqueItems", {"type": "array", "uniqueItems": True}),
    ("not", {"not": {"type": "string"}}),
    ("dependentRequired", {"type": "object", "dependentRequired": {"a": ["b"]}}),
])
def test_an_unsupported_schema_keyword_is_named(keyword, schema) -> None:
    with pytest.raises(GrammarError, match=keyword):
        json_schema_grammar(schema)


def test_invalid_grammar_text_is_refused_at_submit(dense) -> None:
    async def go():
        dense.submit([1, 2, 3], SamplingParams(grammar='{"grammars": "nonsense"}'))

    with pytest.raises(ValueError):
        run(go())


def test_a_mask_keeps_only_allowed_tokens() -> None:
    import torch

    allowed = torch.tensor([False, True, False, True])
    masked = apply_mask(torch.zeros(1, 4), allowed)
    assert masked[0].isinf().tolist() == [True, False, True, False]
    with pytest.raises(ValueError, match="no token"):
        apply_mask(torch.zeros(1, 4), torch.zeros(4, dtype=torch.bool))


def test_a_panic_of_the_grammar_library_is_a_grammar_error() -> None:
    from inference.engine.grammar import library_errors

    class PanicException(BaseException):  # what pyo3 raises for a Rust panic (a BaseException)
        pass

    with pytest.raises(GrammarError, match="grammar library failed"):
        with library_errors():
            raise PanicException("index out of bounds")
    with pytest.raises(KeyboardInterrupt):
        with library_errors():
            raise KeyboardInterrupt


def test_ignore_eos_runs_to_max_tokens_and_min_tokens_holds_eos_back(dense) -> None:
    async def go(**params):
        return await generate(dense, SamplingParams(max_tokens=24, temperature=0, **params))

    text, finish, tokens = run(go(ignore_eos=True))
    assert (finish, tokens) == ("length", 24)
    _, _, free = run(go())
    _, _, held = run(go(min_tokens=free + 1 if free < 24 else 24))
    assert held >= min(free + 1, 24)


def test_a_stop_token_id_ends_the_answer_before_it(dense) -> None:
    prompt = dense.tokenizer("Describe the box.")["input_ids"]

    async def output_ids(params: SamplingParams) -> tuple[list[int], str]:
        handle = dense.submit(prompt, params)
        finish = None
        async for chunk in handle:
            finish = chunk.finish_reason or finish
        return handle.state.output_ids, finish

    free, _ = run(output_ids(SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)))
    stopped, finish = run(output_ids(SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                     stop_token_ids=(free[2],))))
    assert finish == "stop"
    assert stopped == free[: free.index(free[2]) + 1]  # ends on the first occurrence of the stop id


def test_logit_bias_makes_a_token_the_greedy_choice(dense) -> None:
    token = dense.tokenizer.convert_tokens_to_ids("Ġbox")
    text, _, _ = run(generate(dense, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True,
                                                    logit_bias={token: 100})))
    assert text == " box" * 3
