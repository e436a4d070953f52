"""Tool calls in a model's answer, as OpenAI returns them.

Chat templates that render tools teach the model one of a few ways to call them. Recognised here:
- Hermes style (Qwen2.5/3, Hermes, many fine-tunes): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
  blocks, any number, with free text around them;
- a bare JSON object (Llama 3.1/3.2's JSON calling, and what `tool_choice: required` constrains the answer
  to), or a JSON list of them: `{"name": ..., "arguments"|"parameters": {...}}`.
Text that is neither is plain content: the model chose to answer instead of calling.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def parse_tool_calls(text: str, known: set[str]) -> tuple[str | None, list[dict[str, Any]]]:
    """(the content left besides the calls, or None; the calls in OpenAI's shape). Only calls of the
    `known` function names count: anything else stays content."""
    blocks = HERMES_CALL.findall(text)
    if blocks:
        calls = [call for block in blocks if (call := _call(_json(block), known))]
        if len(calls) == len(blocks):
            rest = HERMES_CALL.sub("", text).strip()
            return rest or None, calls
        return text, []
    whole = _json(text.strip())
    candidates = whole if isinstance(whole, list) else [whole]
    calls = [call for candidate in candidates if (call := _call(candidate, known))]
    if calls and len(calls) == len(candidates):
        return None, calls
    return text, []


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _call(value: Any, known: set[str]) -> dict[str, Any] | None:
    if not isinstance(value, dict) or value.get("name") not in known:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string already
        arguments = _json(arguments)
    if not isinstance(arguments, dict):
        return None
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": value["name"], "arguments": json.dumps(arguments, ensure_ascii=False)},
    }
