"""Every request field of OpenAI's chat-completions reference, and what this server does with it.

The rule: a field we do not honour is a 400 that names it, never a silent 200. Three kinds of field:

    honoured   the server does what the reference says
    accepted   accepted and meaningless here, as documented (`user` labels nothing we keep, say)
    refused    a 400 with `param` set, unless the value asks for nothing (null, false, [], {}, or the one
               value that is the default behaviour: n=1, function_call "none", modalities ["text"], ...)

The README's field table is this table; tests/api/test_fields.py holds the two together. Fields that
OpenAI does not define are ignored, as OpenAI itself does; extensions we honour are listed too.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .choices import MAX_CHOICES

HONOURED, ACCEPTED, REFUSED = "honoured", "accepted", "refused"


def _nothing(value) -> bool:
    """Return True for a value that asks for nothing: null, false, an empty list/object/string."""
    return value is None or value is False or value in ([], {}, "")


@dataclass(frozen=True)
class FieldRule:
    support: str  # HONOURED | ACCEPTED | REFUSED
    note: str  # what the server does, as the README says it
    # For a REFUSED field: the values that ask for nothing we lack (besides null, false, [] and {}).
    harmless: Callable[[object], bool] = lambda value: False

    def refuses(self, value) -> bool:
        return self.support == REFUSED and not (_nothing(value) or self.harmless(value))


FIELDS: dict[str, FieldRule] = {
    "model": FieldRule(HONOURED, "a deployed variant the key's team may use"),
    "messages": FieldRule(HONOURED, "system, developer, user, assistant (with tool_calls) and tool messages, "
                                    "rendered by the variant's own chat template"),
    "max_completion_tokens": FieldRule(HONOURED, "cap on generated tokens"),
    "max_tokens": FieldRule(HONOURED, "the older name of max_completion_tokens"),
    "temperature": FieldRule(HONOURED, "0 to 2; 0 is greedy"),
    "top_p": FieldRule(HONOURED, "nucleus sampling"),
    "stop": FieldRule(HONOURED, "up to 4 stop strings, left out of the answer"),
    "seed": FieldRule(HONOURED, "a seeded answer does not depend on what else the engine runs"),
    "presence_penalty": FieldRule(HONOURED, "OpenAI's definition"),
    "frequency_penalty": FieldRule(HONOURED, "OpenAI's definition"),
    "stream": FieldRule(HONOURED, "server-sent chat.completion.chunk events, then [DONE]"),
    "stream_options": FieldRule(HONOURED, "include_usage: a last chunk with usage"),
    "response_format": FieldRule(HONOURED, "text, json_object and json_schema, enforced token by token by the "
                                           "engine's grammar (strict or not); an unsupported schema keyword is a "
                                           "400 naming it"),
    "n": FieldRule(HONOURED, f"1 to {MAX_CHOICES} choices; the prompt is computed once and its KV shared through "
                             "the team's prefix cache; with a seed, choice i uses seed + i"),
    "logprobs": FieldRule(HONOURED, "each generated token's log probability under the model's own distribution "
                                    "(before penalties, temperature and grammar)"),
    "top_logprobs": FieldRule(HONOURED, "0 to 20 most likely alternatives per token (with logprobs: true)"),
    "logit_bias": FieldRule(HONOURED, "token id → -100..100 added to its logit (before temperature and grammar)"),
    "tools": FieldRule(HONOURED, "function tools, rendered by the variant's chat template; calls come back as "
                                 "message.tool_calls (streamed as tool-call deltas)"),
    "tool_choice": FieldRule(HONOURED, "none, auto (the answer is parsed in the variant's format), required or a "
                                       "named function (enforced by the grammar; a template without tool support "
                                       "refuses these two)"),
    "parallel_tool_calls": FieldRule(HONOURED, "false: at most one call"),
    "functions": FieldRule(REFUSED, "the deprecated form of tools: refused"),
    "function_call": FieldRule(REFUSED, "the deprecated form of tool_choice: refused unless \"none\"",
                               harmless=lambda v: v == "none"),
    "audio": FieldRule(REFUSED, "no audio output"),
    "modalities": FieldRule(REFUSED, "text only: anything but [\"text\"] is refused",
                            harmless=lambda v: v == ["text"]),
    "prediction": FieldRule(REFUSED, "no predicted outputs"),
    "reasoning_effort": FieldRule(REFUSED, "the variants have no effort setting"),
    "verbosity": FieldRule(REFUSED, "the variants have no verbosity setting"),
    "web_search_options": FieldRule(REFUSED, "no web search: the box has no internet"),
    "service_tier": FieldRule(REFUSED, "one tier: \"auto\" and \"default\" are accepted, others refused",
                              harmless=lambda v: v in ("auto", "default")),
    "prompt_cache_retention": FieldRule(REFUSED, "no prompt-cache retention setting"),
    "store": FieldRule(REFUSED, "answers are not stored for OpenAI's evals or distillation; true is refused "
                                "(transcripts follow the team's own retention policy)"),
    "metadata": FieldRule(ACCEPTED, "meaningless: nothing is stored for OpenAI's dashboard"),
    "user": FieldRule(ACCEPTED, "meaningless: usage is counted per team key"),
    "safety_identifier": FieldRule(ACCEPTED, "meaningless: usage is counted per team key"),
    "prompt_cache_key": FieldRule(ACCEPTED, "meaningless: no prompt cache to route by"),
    # Extensions, as in vLLM.
    "top_k": FieldRule(HONOURED, "extension: keep the k most likely tokens; 0 or -1 turns it off"),
    "min_tokens": FieldRule(HONOURED, "extension: no end-of-sequence or stop_token_ids before this many tokens"),
    "ignore_eos": FieldRule(HONOURED, "extension: the answer runs to max_tokens (fixed lengths for benchmarks)"),
    "stop_token_ids": FieldRule(HONOURED, "extension: up to 16 token ids that end the answer"),
}


def refused_field(payload: dict, fields: dict) -> tuple[str, FieldRule] | None:
    """Return the first field of a request body that its endpoint's table refuses, or None."""
    for name, value in payload.items():
        rule = fields.get(name)
        if rule is not None and rule.refuses(value):
            return name, rule
    return None


def refusal_message(name: str, rule: FieldRule) -> str:
    return f"'{name}' is not supported by this server ({rule.note})."


# /v1/responses (OpenAI's Responses API): the same rule, its own fields. `store` and `previous_response_id`
# are honoured for a team whose transcript policy keeps transcripts and refused by name for one that keeps none.
RESPONSE_FIELDS: dict[str, FieldRule] = {
    "model": FieldRule(HONOURED, "a deployed variant the key's team may use"),
    "input": FieldRule(HONOURED, "a string, or a list of message items (user, assistant, system, developer) whose "
                                 "content is text or input_text/output_text parts"),
    "instructions": FieldRule(HONOURED, "a system message before the input (not carried to a continuation)"),
    "max_output_tokens": FieldRule(HONOURED, "cap on generated tokens; reaching it makes the response incomplete"),
    "temperature": FieldRule(HONOURED, "0 to 2; 0 is greedy"),
    "top_p": FieldRule(HONOURED, "nucleus sampling"),
    "text": FieldRule(HONOURED, "format text, json_object or json_schema (strict or not), enforced by the engine's "
                                "grammar as for chat's response_format"),
    "stream": FieldRule(HONOURED, "the typed events, in order, each with its sequence_number"),
    "store": FieldRule(HONOURED, "kept encrypted per team under its transcript policy and retention; the default "
                                 "when the team keeps transcripts, refused (true) when it keeps none"),
    "previous_response_id": FieldRule(HONOURED, "continue from a stored response of the same team (another "
                                                "team's id is a 404); refused when the team keeps nothing"),
    "tools": FieldRule(REFUSED, "no tools on /v1/responses (use /v1/chat/completions)"),
    "tool_choice": FieldRule(REFUSED, "no tools on /v1/responses: only \"none\" and \"auto\"",
                             harmless=lambda v: v in ("none", "auto")),
    "parallel_tool_calls": FieldRule(ACCEPTED, "meaningless without tools"),
    "max_tool_calls": FieldRule(REFUSED, "no tools on /v1/responses"),
    "reasoning": FieldRule(REFUSED, "the variants have no effort or summary setting"),
    "include": FieldRule(REFUSED, "no extra output data to include"),
    "top_logprobs": FieldRule(REFUSED, "no log probabilities on /v1/responses", harmless=lambda v: v == 0),
    "truncation": FieldRule(REFUSED, "no truncation: a prompt too long is a 400; only \"disabled\"",
                            harmless=lambda v: v == "disabled"),
    "background": FieldRule(REFUSED, "no background responses"),
    "conversation": FieldRule(REFUSED, "no conversation objects: use previous_response_id"),
    "prompt": FieldRule(REFUSED, "no reusable prompt templates"),
    "service_tier": FieldRule(REFUSED, "one tier: \"auto\" and \"default\" are accepted, others refused",
                              harmless=lambda v: v in ("auto", "default")),
    "prompt_cache_retention": FieldRule(REFUSED, "no prompt-cache retention setting"),
    "stream_options": FieldRule(ACCEPTED, "meaningless: events are not obfuscated on loopback or a LAN"),
    "metadata": FieldRule(ACCEPTED, "meaningless: nothing is stored for OpenAI's dashboard"),
    "user": FieldRule(ACCEPTED, "meaningless: usage is counted per team key"),
    "safety_identifier": FieldRule(ACCEPTED, "meaningless: usage is counted per team key"),
    "prompt_cache_key": FieldRule(ACCEPTED, "meaningless: the prefix cache is scoped by team"),
}
