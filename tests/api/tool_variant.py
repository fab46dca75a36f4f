"""A demo model whose chat template speaks tools (Qwen2.5's Hermes-style format), for the function-calling tests.

The demo models' own template renders no tools; this copy of demo-dense differs only in chat_template.jinja,
which is Qwen2.5's tool section written for the demo's <|im_start|>/<|im_end|> turn markers.
"""
from __future__ import annotations

import shutil
from pathlib import Path

HERMES_TEMPLATE = """{{ bos_token }}
{%- if tools %}<|im_start|>system
{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}

{% endif %}# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% elif messages[0]['role'] == 'system' %}<|im_start|>system
{{ messages[0]['content'] }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' and loop.first %}
{%- elif message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant
{{ message.content or '' }}
{%- for tool_call in message.tool_calls %}
<tool_call>
{"name": "{{ tool_call.function.name }}", "arguments": {{ tool_call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def write_tool_variant(demo_dir: Path, target: Path) -> Path:
    """Copy demo-dense to `target` with the tool-aware template and return it."""
    shutil.copytree(demo_dir / "demo-dense", target)
    (target / "chat_template.jinja").write_text(HERMES_TEMPLATE, encoding="utf-8")
    return target


# The demo template with a generation prompt that opens a reasoning section, as DeepSeek-R1's does.
THINK_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)


def write_reasoning_variant(demo_dir: Path, target: Path) -> Path:
    """Copy demo-distilled (Qwen2, as R1's distills are) to `target` with a template that opens <think>."""
    shutil.copytree(demo_dir / "demo-distilled", target)
    (target / "chat_template.jinja").write_text(THINK_TEMPLATE, encoding="utf-8")
    return target
