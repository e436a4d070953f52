"""The inference tasks' bodies: run one request on this worker's engine and send the replies back
(accepted, text deltas when streaming, then done or error). Errors are answers, never silence: the
API waits on these replies and on this worker's heartbeat."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from jinja2.exceptions import TemplateError, TemplateSyntaxError

from app.core.config import get_settings
from app.core.contracts.grammar import GrammarError
from app.core.contracts.inference import (
    Accepted,
    ChatMessage,
    Delta,
    Done,
    Error,
    GenerateMessage,
    ModelTarget,
    Reply,
    Score,
    Scored,
    ScoreMessage,
    TokenLogprob,
    TopLogprob,
)
from app.core.replies import reply_channel
from workers.inference import GenerationHandle, GenerationRequest, GenerationResult, InferenceEngine, PromptTooLong
from workers.serving.manager import EngineManager, WorkerBusy, get_manager
from workers.serving.tool_calls import parse_tool_calls

log = logging.getLogger(__name__)
CANCEL_CHECK_S = 0.25
FLUSH_S = 0.02


def run_generate(request: GenerateMessage, worker: str) -> None:
    with _serving(request, worker) as (manager, send), manager.using(request.base_model) as engine:
        handle = engine.submit(
            GenerationRequest(
                prompt_ids=_prompt_ids(engine, request.messages, request.prompt, request.max_tokens, request.tools),
                max_tokens=request.max_tokens,
                temperature=request.temperature,
                top_p=request.top_p,
                seed=request.seed,
                stop=tuple(request.stop),
                ignore_eos=request.ignore_eos,
                presence_penalty=request.presence_penalty,
                frequency_penalty=request.frequency_penalty,
                top_logprobs=request.top_logprobs if request.logprobs else 0,
                logit_bias=request.logit_bias,
                grammar=request.grammar,
                request_id=request.request_id,
                **_adapter(manager, request),
            )
        )
        try:
            if not _relay(handle, request, send):
                log.info("request %s cancelled by its client", request.request_id)
                return
            result = handle.result()
        finally:
            if not handle.done():
                handle.cancel()
        text, finish_reason, calls = result.text, str(result.finish_reason), None
        if request.parse_tool_calls and finish_reason == "stop":
            known = {str(tool["function"]["name"]) for tool in request.tools or []}
            content, found = parse_tool_calls(text, known)
            if found:
                text, finish_reason, calls = content or "", "tool_calls", found
        send(
            Done(
                text=text,
                finish_reason=finish_reason,
                prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens,
                logprobs=_logprobs(engine, result) if request.logprobs else None,
                tool_calls=calls,
            )
        )


def _logprobs(engine: InferenceEngine, result: GenerationResult) -> list[TokenLogprob]:
    """Each generated token with its text (special tokens shown), log-probability and top alternatives."""
    ids = list(result.token_ids) + [token for top in result.top_logprobs for token, _ in top]
    text = dict(zip(ids, engine.token_texts(ids), strict=True))

    def entry(token: int, logprob: float) -> TopLogprob:
        return TopLogprob(token=text[token], logprob=logprob, bytes=list(text[token].encode()))

    tops = result.top_logprobs or ((),) * len(result.token_ids)
    return [
        TokenLogprob(**entry(token, logprob).model_dump(), top_logprobs=[entry(t, lp) for t, lp in top])
        for token, logprob, top in zip(result.token_ids, result.token_logprobs, tops, strict=True)
    ]


def _relay(handle: GenerationHandle, request: GenerateMessage, send: Callable[[Reply], None]) -> bool:
    """Send the text as it comes (coalesced per FLUSH_S) when streaming; check every CANCEL_CHECK_S, even
    before the first token, whether the client went away. False: it did."""
    stream, replies, rid = request.stream, reply_channel(), request.request_id
    pending, flush_at, check_at = "", 0.0, time.monotonic() + CANCEL_CHECK_S  # the first text goes out at once
    while True:
        try:
            for delta in handle.stream(timeout=CANCEL_CHECK_S):
                pending += delta if stream else ""
                now = time.monotonic()
                if pending and now >= flush_at:
                    send(Delta(text=pending))
                    pending, flush_at = "", now + FLUSH_S
                if now >= check_at:
                    check_at = now + CANCEL_CHECK_S
                    if replies.cancelled(rid):
                        return False
            break
        except TimeoutError:  # nothing decoded lately (queued, prefill): still ask
            check_at = time.monotonic() + CANCEL_CHECK_S
            if replies.cancelled(rid):
                return False
    if pending:
        send(Delta(text=pending))
    return True


def run_score(request: ScoreMessage, worker: str) -> None:
    """Teacher-forced loss of each item's completion given its prompt (A/B eval loss)."""
    with _serving(request, worker) as (manager, send), manager.using(request.base_model) as engine:
        items = [
            (_score_prompt_ids(engine, item.messages, item.prompt), _completion_ids(engine, item.completion))
            for item in request.items
        ]
        scores = engine.score(items, **_adapter(manager, request))
        send(Scored(scores=[Score(nll_sum=s.nll_sum, tokens=s.tokens) for s in scores]))


@contextmanager
def _serving(
    request: GenerateMessage | ScoreMessage, worker: str
) -> Iterator[tuple[EngineManager, Callable[[Reply], None]]]:
    """Say the request is taken, count it as in flight, and turn any failure into an error reply."""
    rid = request.request_id
    replies = reply_channel()
    replies.send(rid, Accepted(worker=worker))
    manager = get_manager(get_settings(), worker)
    manager.begin()
    try:
        yield manager, lambda reply: replies.send(rid, reply)
    except Exception as exc:
        replies.send(rid, _as_error(exc, request))
    finally:
        manager.end()


def _prompt_ids(
    engine: InferenceEngine,
    messages: list[ChatMessage] | None,
    prompt: str | None,
    max_tokens: int | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> list[int]:
    """The prompt's token ids. With `max_tokens` (a generation), a prompt that cannot fit beside it raises
    `PromptTooLong` having tokenized only a bounded prefix (scoring passes none: it cuts prompts to fit)."""
    if messages is not None:
        return engine.encode_chat([m.for_template() for m in messages], max_tokens=max_tokens, tools=tools)
    return engine.encode_prompt(prompt or "", max_tokens=max_tokens)


def _score_prompt_ids(engine: InferenceEngine, messages: list[ChatMessage] | None, prompt: str | None) -> list[int]:
    """A plain-text row has no prompt; score it after the BOS token (the model needs one position)."""
    ids = _prompt_ids(engine, messages, prompt)
    if not ids:
        start = engine.tokenizer.bos_token_id
        ids = [start if isinstance(start, int) else engine.tokenizer.eos_token_id]
    return ids


def _completion_ids(engine: InferenceEngine, text: str) -> list[int]:
    ids = list(engine.tokenizer(text, add_special_tokens=False)["input_ids"])
    eos = engine.tokenizer.eos_token_id
    return [*ids, eos] if isinstance(eos, int) else ids


def _adapter(manager: EngineManager, target: ModelTarget) -> dict[str, Any]:
    if not target.adapter or not target.adapter_prefix:
        return {}
    return {"adapter": target.adapter, "adapter_path": manager.adapter_dir(target.adapter, target.adapter_prefix)}


def _as_error(exc: Exception, request: GenerateMessage | ScoreMessage) -> Error:
    chat = isinstance(request, GenerateMessage) and request.messages is not None
    if isinstance(exc, PromptTooLong):
        where = "messages" if chat else "prompt"
        return Error(status=400, code="context_length_exceeded", message=str(exc), param=where)
    if isinstance(exc, TemplateError) and not isinstance(exc, TemplateSyntaxError):
        # The model's chat template refused these messages: its sandbox (SecurityError, e.g. a hostile
        # template reaching for `__class__`) or its own `raise_exception` (roles must alternate, ...).
        # A broken template (syntax) stays a server error: no request could fix it.
        message = f"the model's chat template refused the messages: {exc}"
        return Error(status=400, code="invalid_request_error", message=message, param="messages")
    if isinstance(exc, WorkerBusy):
        return Error(status=503, code="worker_busy", message=str(exc))
    if isinstance(exc, GrammarError):
        return Error(status=400, code="invalid_request_error", message=str(exc), param="response_format")
    if isinstance(exc, ValueError):
        param = next((p for p in ("logit_bias", "tools") if str(exc).startswith(p)), None)
        return Error(status=400, code="invalid_request_error", message=str(exc), param=param)
    log.exception("inference request %s failed", request.request_id)  # details stay in the worker log
    message = f"inference failed ({type(exc).__name__}); request {request.request_id}"
    return Error(status=500, code="inference_error", message=message)
