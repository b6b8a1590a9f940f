"""Named chat templates (the names mergekit accepts) and the rule for `chat_template: auto`.

The templates are ours, written for transformers' Jinja environment (trim_blocks, lstrip_blocks); each
renders the conversation format its name stands for.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

LLAMA3 = (
    "{% for message in messages %}"
    "{% if loop.first %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{ message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

MISTRAL = (
    "{% set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' else none %}"
    "{% set turns = messages[1:] if system is not none else messages %}"
    "{{ bos_token }}"
    "{% for message in turns %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('after an optional system message, roles must alternate user/assistant') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{% set text = system + '\\n\\n' + message['content'] if loop.first and system is not none "
    "else message['content'] %}"
    "{{ ' [INST] ' + text + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'] + eos_token }}"
    "{% else %}"
    "{{ raise_exception('only user and assistant roles follow the optional system message') }}"
    "{% endif %}"
    "{% endfor %}"
)

ALPACA = (
    "{% set systems = messages | selectattr('role', 'equalto', 'system') | list %}"
    "{{ (systems | last)['content'] | trim if systems else '' }}\n\n"
    "{% set headers = {'user': '### Instruction:', 'assistant': '### Response:', 'user_context': '### Input:'} %}"
    "{% for message in messages if message['role'] in headers %}"
    "{{ headers[message['role']] + '\\n' + message['content'] | trim }}"
    "{% if not loop.last %}{{ '\\n\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{ '\\n\\n### Response:\\n' }}{% endif %}"
)

EXAONE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}{{ '[|system|][|endofturn|]\\n' }}{% endif %}"
    "{{ '[|' + message['role'] + '|]' + message['content'] }}"
    "{{ '\\n' if message['role'] == 'user' else '[|endofturn|]\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
)

NAMED_TEMPLATES: dict[str, str] = {
    "alpaca": ALPACA,
    "chatml": CHATML,
    "exaone": EXAONE,
    "llama3": LLAMA3,
    "mistral": MISTRAL,
}


def check_chat_template(value: str) -> None:
    """A recipe's `chat_template` must be `auto`, a known name or a Jinja template (as mergekit tells them apart)."""
    if value == "auto" or value in NAMED_TEMPLATES:
        return
    if len(value) < 20 or "{" not in value:
        names = ", ".join(["auto", *NAMED_TEMPLATES])
        raise ValueError(f"unknown chat template {value!r}: use one of {names}, or a Jinja template string")


def most_common_template(templates: Iterable[str | dict | None]) -> str | None:
    """`auto`: the template most inputs carry (stripped; a dict counts by its 'default'); the first wins ties."""
    texts = []
    for template in templates:
        if isinstance(template, dict):
            template = template.get("default")
        if template:
            texts.append(template.strip())
    return Counter(texts).most_common(1)[0][0] if texts else None


def resolve_chat_template(value: str, input_templates: Iterable[str | dict | None]) -> str | None:
    """The template text to write for a recipe's `chat_template` (None: auto found no template among the inputs)."""
    if value == "auto":
        return most_common_template(input_templates)
    return NAMED_TEMPLATES.get(value, value)
