"""Request bodies of the OpenAI-compatible endpoints.

Nothing is silently ignored. A field outside OpenAI's request schema is a 400 naming it, as OpenAI answers
("Unrecognized request argument supplied"). A field OpenAI defines that this server does not honour yet
(best_of, suffix, audio, ...) is accepted only at its no-op value; any other value is a 400 naming it.
Honoured: log-probabilities (not yet when streamed: that is a 400), penalties, `logit_bias`, `n`,
`response_format` (json_object and json_schema, enforced by constrained decoding), and `tools` with
`tool_choice` where the model's chat template renders tools (else the worker answers 400 naming `tools`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

MAX_STOP = 4
MAX_STOP_CHARS = 1000
MAX_CHOICES = 16  # n: each choice is a row of the batch
MAX_LOGIT_BIAS = 300  # OpenAI's limit  # each stop string is matched against the text after every token


UNSUPPORTED = "is not supported by this server yet"


def _unsupported(value: Any) -> Any:
    raise ValueError(UNSUPPORTED)


# Chat fields OpenAI defines that this server does not honour yet, with their no-op values.
_CHAT_NO_OP: dict[str, Callable[[Any], bool]] = {
    "store": lambda v: v in (None, False),
    "functions": lambda v: not v,
    "function_call": lambda v: v in (None, "none"),
    "modalities": lambda v: v in (None, ["text"]),
    "audio": lambda v: v is None,
    "prediction": lambda v: v is None,
    "web_search_options": lambda v: v is None,
    "reasoning_effort": lambda v: v is None,
    "verbosity": lambda v: v is None,
}


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, description="Lowers a token's logit by this once it has appeared in the completion"
    )
    frequency_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, description="Lowers a token's logit by this times its count in the completion"
    )
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="Choices to sample for the prompt, side by side in the batch")
    ignore_eos: bool = Field(False, description="vLLM's extension: generate past EOS (benchmarks)")
    user: str | None = None
    # Defined by OpenAI, no effect on the answer: accepted.
    metadata: dict[str, str] | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    service_tier: Literal["auto", "default"] | None = None
    logit_bias: dict[str, float] | None = Field(
        None, description="Token id (as a string) -> bias in [-100, 100] added to its logit before sampling"
    )

    @field_validator("logit_bias")
    @classmethod
    def _token_ids_and_bounds(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not key.isdigit() or not -100 <= bias <= 100:
                raise ValueError(f"keys are token ids and biases are in [-100, 100]; got {key!r}: {bias}")
        if value and len(value) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} entries")
        return value

    @property
    def bias(self) -> dict[int, float]:
        return {int(key): value for key, value in (self.logit_bias or {}).items()}

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"at most {MAX_STOP} non-empty stop strings of at most {MAX_STOP_CHARS} characters")
        return stops

    @property
    def stops(self) -> list[str]:
        return self.stop if isinstance(self.stop, list) else []

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class FunctionCall(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    arguments: str = Field(max_length=100_000, description="The arguments as a JSON object, in a string")

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, value: str) -> str:
        try:
            parsed = json.loads(value)
        except ValueError:
            raise ValueError("must be a JSON object in a string") from None
        if not isinstance(parsed, dict):
            raise ValueError("must be a JSON object in a string")
        return value


class ToolCall(BaseModel):
    id: str = Field(min_length=1, max_length=100)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[ToolCall] | None = Field(None, max_length=64, description="An assistant turn's calls")
    tool_call_id: str | None = Field(None, max_length=100, description="A tool turn: the call it answers")
    # Defined by OpenAI, not honoured yet (participant names, refusals): no-op values only.
    name: str | None = None
    refusal: str | None = None

    @field_validator("name", "refusal")
    @classmethod
    def _no_extras(cls, value: str | None) -> str | None:
        return _unsupported(value) if value is not None else value

    @model_validator(mode="after")
    def _tool_fields_in_their_turns(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("tool_calls belong to assistant messages")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("a tool message needs tool_call_id, and only a tool message has one")
        return self

    @field_validator("content")
    @classmethod
    def _text_parts_only(cls, value: str | list[dict[str, Any]] | None) -> str | list[dict[str, Any]] | None:
        if isinstance(value, list) and any(part.get("type") != "text" for part in value):
            raise ValueError("only text content parts are supported by this server yet")
        return value

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: only text is supported
            return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")
        return self.content or ""


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = Field(None, max_length=10_000)
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str = Field(min_length=1, max_length=64)


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = Field(None, max_length=10_000)
    json_schema: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = Field(None, description="Enforced either way: every token follows the schema")


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.json_schema is not None) != (self.type == "json_schema"):
            raise ValueError("give json_schema exactly when type is json_schema")
        return self

    @property
    def schema_to_follow(self) -> dict[str, Any] | None:
        """The JSON schema the answer must follow; None for free text."""
        if self.type == "json_object":
            return {"type": "object"}
        if self.type == "json_schema" and self.json_schema is not None:
            return self.json_schema.json_schema
        return None


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, ge=1)
    store: bool | None = None
    logprobs: bool = Field(False, description="Return each generated token's log-probability")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="With logprobs: likeliest alternatives per token")
    response_format: ResponseFormat | None = Field(
        None, description="json_object or json_schema: the answer is constrained to it, token by token"
    )
    tools: list[Tool] | None = Field(None, max_length=128, description="Functions the model may call")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="auto (default with tools): the model decides; required or a named function: it must call"
    )
    parallel_tool_calls: bool | None = None
    # Not honoured yet: no-op values only.
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None

    @field_validator("logprobs")
    @classmethod
    def _not_streamed(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("stream"):
            raise ValueError(f"with stream: true {UNSUPPORTED}")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("requires logprobs: true")
        return value

    @property
    def top(self) -> int:
        return self.top_logprobs or 0

    @field_validator(*_CHAT_NO_OP)
    @classmethod
    def _no_op_values_only(cls, value: Any, info: ValidationInfo) -> Any:
        if info.field_name is not None and not _CHAT_NO_OP[info.field_name](value):
            raise ValueError(UNSUPPORTED)
        return value

    @model_validator(mode="after")
    def _tools_consistent(self) -> ChatCompletionRequest:
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) < len(names):
            raise ValueError("tools: function names must be unique")
        choice = self.tool_choice
        if choice not in (None, "none", "auto") and not names:
            raise ValueError("tool_choice: needs tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"tool_choice: no tool named {choice.function.name!r}")
        if self.calls_tools and self.stream:
            raise ValueError(f"stream: with tools {UNSUPPORTED}")
        if self.calls_tools and self.response_format is not None and self.response_format.type != "text":
            raise ValueError("response_format: cannot be combined with tools")
        return self

    @property
    def calls_tools(self) -> bool:
        """Tools are offered and the model may (or must) call them."""
        return bool(self.tools) and self.tool_choice != "none"

    def tool_call_schema(self) -> dict[str, Any] | None:
        """For `required` or a named function: the JSON schema the answer must follow (one call). None when
        the model decides (auto) whether to call."""
        if not self.tools or self.tool_choice in (None, "none", "auto"):
            return None
        tools = [t.function for t in self.tools]
        if isinstance(self.tool_choice, NamedToolChoice):
            tools = [f for f in tools if f.name == self.tool_choice.function.name]
        shapes = [
            {
                "type": "object",
                "properties": {"name": {"const": f.name}, "arguments": f.parameters},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for f in tools
        ]
        return shapes[0] if len(shapes) == 1 else {"anyOf": shapes}

    @field_validator("messages")
    @classmethod
    def _not_empty(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        if not value:
            raise ValueError("must contain at least one message")
        return value

    @property
    def prompt_chars(self) -> int:
        """Characters of all messages' text together: what `inference.max_prompt_chars` caps (the route
        checks it, and `inference.max_messages`, before the request goes anywhere)."""
        return sum(len(m.text()) for m in self.messages)


class CompletionRequest(_Common):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    echo: bool = False
    logprobs: int | None = Field(
        None, ge=0, le=5, description="Return each token's log-probability and this many likeliest alternatives"
    )
    # Not honoured yet: no-op values only.
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("logprobs")
    @classmethod
    def _not_streamed(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("stream"):
            raise ValueError(f"with stream: true {UNSUPPORTED}")
        return value

    @property
    def top(self) -> int:
        return self.logprobs or 0

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, value: int | None) -> int | None:
        return _unsupported(value) if value not in (None, 1) else value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        return _unsupported(value) if value else value

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("send one prompt per request")
        return value

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]
