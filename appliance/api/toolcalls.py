"""Function calling: which tool-call format a variant's chat template speaks, forced calls, parsing answers.

A variant's chat template decides whether tools can be offered at all (it renders `tools` and assistant
`tool_calls`) and in which format the model writes a call:

    hermes    Qwen2 / Hermes: <tool_call>{"name": ..., "arguments": {...}}</tool_call>, one block per call
    llama3    Llama 3.1+: the answer is one JSON object {"name": ..., "parameters": {...}}
    deepseek  DeepSeek-V3 / R1: <｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\n{...}\\n```<｜tool▁call▁end｜>

`tool_choice: "auto"` lets the model choose, and the answer is parsed in the variant's format. `"required"` and
a named function are enforced by the engine's grammar, in one format for every variant (as vLLM does): a
named call generates the function's arguments object itself, `required` a JSON array of
{"name", "parameters"} objects. Either way the arguments validate against the function's `parameters`.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from inference.engine.grammar import json_schema_grammar

HERMES, LLAMA3, DEEPSEEK = "hermes", "llama3", "deepseek"
# How each format shows in a template's source; checked in this order.
FORMAT_MARKERS = ((DEEPSEEK, "<｜tool▁call▁begin｜>"), (HERMES, "<tool_call>"), (LLAMA3, "<|python_tag|>"),
                  (LLAMA3, '"parameters"'))
ANY_ARGUMENTS = {"type": "object"}


def tool_format(template: str) -> str | None:
    """Return the tool-call format a chat template speaks, or None when it renders no tools."""
    if "tools" not in template:
        return None
    for name, marker in FORMAT_MARKERS:
        if marker in template:
            return name
    return None


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text
    id: str = ""

    def __post_init__(self):
        self.id = self.id or f"call_{uuid.uuid4().hex[:24]}"

    def as_openai(self, index: int | None = None) -> dict:
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


def parameters(tool) -> dict:
    return tool.function.parameters or ANY_ARGUMENTS


def forced_grammar(tools: list, choice, parallel: bool) -> str:
    """Return the grammar of a forced call: the named function's arguments, or an array of calls (`required`)."""
    if choice.named is not None:
        tool = next(t for t in tools if t.function.name == choice.named)
        return json_schema_grammar(parameters(tool))
    call = {"anyOf": [{"type": "object", "additionalProperties": False, "required": ["name", "parameters"],
                       "properties": {"name": {"const": t.function.name}, "parameters": parameters(t)}}
                      for t in tools]}
    return json_schema_grammar({"type": "array", "items": call, "minItems": 1, **({} if parallel else {"maxItems": 1})})


def forced_calls(text: str, choice) -> list[ToolCall]:
    """Return the calls of a forced answer (its grammar made it valid JSON; cut by max_tokens it is kept raw)."""
    if choice.named is not None:
        return [ToolCall(choice.named, text)]
    try:
        calls = json.loads(text)
    except ValueError:
        return []
    return [ToolCall(c["name"], json.dumps(c["parameters"], ensure_ascii=False)) for c in calls]


HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
DEEPSEEK_CALL = re.compile(r"<｜tool▁call▁begin｜>\s*function\s*<｜tool▁sep｜>\s*([^\n]+?)\s*\n```(?:json)?\s*(.*?)\s*```"
                           r"\s*<｜tool▁call▁end｜>", re.DOTALL)
DEEPSEEK_BEGIN = "<｜tool▁calls▁begin｜>"


def parse_calls(text: str, fmt: str | None, names: set[str]) -> tuple[str, list[ToolCall]]:
    """Return (content, calls) of an answer written in `fmt`; text that is not a well-formed call stays content.

    A call naming a function the request did not offer is not a call: it stays in the content, so the caller
    sees what the model wrote.
    """
    if fmt == HERMES:
        calls, kept = [], text
        for match in HERMES_CALL.finditer(text):
            call = _named_object(match.group(1), "arguments", names)
            if call is not None:
                calls.append(call)
                kept = kept.replace(match.group(0), "", 1)
        return (kept.strip() if calls else text), calls
    if fmt == LLAMA3:
        body = text.strip().removeprefix("<|python_tag|>").strip()
        call = _named_object(body, "parameters", names) or _named_object(body, "arguments", names)
        return ("", [call]) if call is not None else (text, [])
    if fmt == DEEPSEEK:
        calls = [ToolCall(name, args) for name, args in DEEPSEEK_CALL.findall(text)
                 if name in names and _is_object(args)]
        if not calls:
            return text, []
        return text.split(DEEPSEEK_BEGIN, 1)[0].strip(), calls
    return text, []


def _is_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def _named_object(text: str, arguments_key: str, names: set[str]) -> ToolCall | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not (isinstance(value, dict) and value.get("name") in names and isinstance(value.get(arguments_key), dict)):
        return None
    return ToolCall(value["name"], json.dumps(value[arguments_key], ensure_ascii=False))


def call_start(fmt: str | None) -> str | None:
    """Return the text that opens a call in `fmt`: a stream holds its content back from there on."""
    return {HERMES: "<tool_call>", DEEPSEEK: DEEPSEEK_BEGIN, LLAMA3: "{"}.get(fmt)
