"""Inference on the queue: what the API sends (`GenerateMessage`, `ScoreMessage`) and what the worker
answers on the request's reply channel (`Accepted`, `Delta`, then `Done`/`Scored` or `Error`).

An inference request is a task, not a row: the message carries the request itself. Both sides build and
read these models only, so a field added on one side is seen (and checked) on the other.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, TypeAdapter


def new_request_id() -> str:
    return uuid.uuid4().hex


class ChatMessage(BaseModel):
    role: str
    content: str
    # Tool calling, in the shape chat templates read: [{"type": "function", "function": {"name", "arguments": {}}}]
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None  # a tool turn: the call it answers

    def for_template(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class ModelTarget(BaseModel):
    """Which weights answer: the base model, and the adapter of a deployment (name + storage prefix)."""

    base_model: str
    adapter: str | None = None
    adapter_prefix: str | None = None


class Sampling(BaseModel):
    max_tokens: int = Field(ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: list[str] = []
    seed: int | None = None
    ignore_eos: bool = False
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logprobs: bool = False  # report each generated token's log-probability (in `Done`)
    top_logprobs: int = Field(0, ge=0, le=20)  # ... and this many most likely alternatives per token
    logit_bias: dict[int, Annotated[float, Field(ge=-100, le=100)]] = {}  # token id -> added to its logit
    grammar: str | None = None  # llguidance grammar every token must follow (app.core.contracts.grammar)


class GenerateMessage(ModelTarget, Sampling):
    """`studio.generate`: one completion of a chat (``messages``, templated on the worker) or a ``prompt``."""

    request_id: str = Field(default_factory=new_request_id)
    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    stream: bool = False
    # Function definitions the chat template renders ({"type": "function", "function": {...}}); with
    # `parse_tool_calls` the answer's tool calls come back parsed in `Done.tool_calls`.
    tools: list[dict[str, Any]] | None = None
    parse_tool_calls: bool = False

    def kwargs(self) -> dict[str, Any]:
        return {"request": self.model_dump(mode="json")}


class ScoreItem(BaseModel):
    """A completion to score given its prompt (chat ``messages`` or plain ``prompt``)."""

    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    completion: str


class ScoreMessage(ModelTarget):
    """`studio.score`: teacher-forced loss of each item's completion (A/B eval loss, perplexity)."""

    request_id: str = Field(default_factory=new_request_id)
    items: list[ScoreItem]

    def kwargs(self) -> dict[str, Any]:
        return {"request": self.model_dump(mode="json")}


# ---------------------------------------------------------------- replies, worker → API


class Accepted(BaseModel):
    type: Literal["accepted"] = "accepted"
    worker: str


class Delta(BaseModel):
    type: Literal["delta"] = "delta"
    text: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    """One generated token: its text, natural-log probability under the model, and the likeliest alternatives."""

    top_logprobs: list[TopLogprob] = []


class Done(BaseModel):
    type: Literal["done"] = "done"
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None  # when the request asked for them
    tool_calls: list[dict[str, Any]] | None = None  # OpenAI's shape, arguments as a JSON string


class Score(BaseModel):
    nll_sum: float
    tokens: int


class Scored(BaseModel):
    type: Literal["scored"] = "scored"
    scores: list[Score]


class Error(BaseModel):
    type: Literal["error"] = "error"
    status: int
    code: str
    message: str
    param: str | None = None


class Cancel(BaseModel):
    """API → worker, on the same channel: the client went away."""

    type: Literal["cancel"] = "cancel"


Reply = Annotated[Accepted | Delta | Done | Scored | Error | Cancel, Field(discriminator="type")]
_REPLY = TypeAdapter(Reply)


def parse_reply(data: dict[str, Any] | str | bytes) -> Reply:
    if isinstance(data, dict):
        return _REPLY.validate_python(data)
    return _REPLY.validate_json(data)


def dump_reply(reply: Reply) -> dict[str, Any]:
    return reply.model_dump(mode="json")
