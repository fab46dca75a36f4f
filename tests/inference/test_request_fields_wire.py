"""The sampling fields of structured output, logprobs and the extensions cross the engine process's wire intact."""

from inference.engine import wire
from inference.engine.grammar import json_schema_grammar
from inference.engine.request import Chunk, SamplingParams


def test_sampling_params_with_every_new_field_round_trip() -> None:
    params = SamplingParams(max_tokens=9, grammar=json_schema_grammar({"type": "object"}), logprobs=3,
                            logit_bias={5: -100.0, 7: 2.5}, min_tokens=2, ignore_eos=True, stop_token_ids=(4, 6))
    fields = wire.message(wire.frame(["submit", "id", [1], wire.params_fields(params), {}])[4:])[3]
    assert wire.params_from(fields) == params


def test_a_chunk_with_logprobs_round_trips() -> None:
    chunk = Chunk("ab", None, 3, 2, None, [{"token": "a", "logprob": -0.5, "top": [["a", -0.5], ["b", -1.0]]}])
    fields = wire.message(wire.frame(["chunks", [wire.chunk_fields("id", chunk)]])[4:])[1][0]
    assert wire.chunk_from(fields) == ("id", chunk)
