"""The inference tasks' bodies: run one request on this worker's engine and send the replies back
(accepted, text deltas when streaming, then done or error). Errors are answers, never silence: the
API waits on these replies and on this worker's heartbeat."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from app.core.config import get_settings
from app.core.replies import Reply, reply_channel
from workers.inference import GenerationHandle, GenerationRequest, InferenceEngine, PromptTooLong
from workers.serving.manager import EngineManager, WorkerBusy, get_manager

log = logging.getLogger(__name__)
CANCEL_CHECK_S = 0.25
FLUSH_S = 0.02


def error(status: int, code: str, message: str, param: str | None = None) -> Reply:
    return {"type": "error", "status": status, "code": code, "message": message, "param": param}


def run_generate(request: dict[str, Any], worker: str) -> None:
    with _serving(request, worker) as (manager, send), manager.using(request["base_model"]) as engine:
        handle = engine.submit(GenerationRequest(
            prompt_ids=_prompt_ids(engine, request), max_tokens=request["max_tokens"],
            temperature=request["temperature"], top_p=request["top_p"], seed=request.get("seed"),
            stop=tuple(request.get("stop") or ()), ignore_eos=bool(request.get("ignore_eos")),
            **_adapter(manager, request), request_id=request["request_id"],
        ))  # fmt: skip
        try:
            if not _relay(handle, request, send):
                log.info("request %s cancelled by its client", request["request_id"])
                return
            result = handle.result()
        finally:
            if not handle.done():
                handle.cancel()
        usage = {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens}
        send({"type": "done", "text": result.text, "finish_reason": result.finish_reason, **usage})


def _relay(handle: GenerationHandle, request: dict[str, Any], send: Callable[[Reply], None]) -> bool:
    """Send the text as it comes (coalesced per FLUSH_S) when streaming; check every CANCEL_CHECK_S, even
    before the first token, whether the client went away. False: it did."""
    stream, replies, rid = bool(request.get("stream")), reply_channel(), request["request_id"]
    pending, flush_at, check_at = "", 0.0, time.monotonic() + CANCEL_CHECK_S  # the first text goes out at once
    while True:
        try:
            for delta in handle.stream(timeout=CANCEL_CHECK_S):
                pending += delta if stream else ""
                now = time.monotonic()
                if pending and now >= flush_at:
                    send({"type": "delta", "text": pending})
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
        send({"type": "delta", "text": pending})
    return True


def run_score(request: dict[str, Any], worker: str) -> None:
    """Teacher-forced loss of each item's completion given its prompt (A/B eval loss)."""
    with _serving(request, worker) as (manager, send), manager.using(request["base_model"]) as engine:
        items = [(_score_prompt_ids(engine, item), _completion_ids(engine, item["completion"]))
                 for item in request["items"]]  # fmt: skip
        scores = engine.score(items, **_adapter(manager, request))
        send({"type": "done", "scores": [{"nll_sum": s.nll_sum, "tokens": s.tokens} for s in scores]})


@contextmanager
def _serving(request: dict[str, Any], worker: str) -> Iterator[tuple[EngineManager, Callable[[Reply], None]]]:
    """Say the request is taken, count it as in flight, and turn any failure into an error reply."""
    rid = request["request_id"]
    replies = reply_channel()
    replies.send(rid, {"type": "accepted", "worker": worker})
    manager = get_manager(get_settings(), worker)
    manager.begin()
    try:
        yield manager, lambda reply: replies.send(rid, reply)
    except Exception as exc:
        replies.send(rid, _as_error(exc, request))
    finally:
        manager.end()


def _prompt_ids(engine: InferenceEngine, item: dict[str, Any]) -> list[int]:
    if item.get("messages") is not None:
        return engine.encode_chat(item["messages"])
    return engine.encode_prompt(item.get("prompt") or "")


def _score_prompt_ids(engine: InferenceEngine, item: dict[str, Any]) -> list[int]:
    """A plain-text row has no prompt; score it after the BOS token (the model needs one position)."""
    ids = _prompt_ids(engine, item)
    if not ids:
        start = engine.tokenizer.bos_token_id
        ids = [start if isinstance(start, int) else engine.tokenizer.eos_token_id]
    return ids


def _completion_ids(engine: InferenceEngine, text: str) -> list[int]:
    ids = list(engine.tokenizer(text, add_special_tokens=False)["input_ids"])
    eos = engine.tokenizer.eos_token_id
    return [*ids, eos] if isinstance(eos, int) else ids


def _adapter(manager: EngineManager, request: dict[str, Any]) -> dict[str, Any]:
    adapter = request.get("adapter")
    if not adapter:
        return {}
    return {"adapter": adapter, "adapter_path": manager.adapter_dir(adapter, request["adapter_prefix"])}


def _as_error(exc: Exception, request: dict[str, Any]) -> Reply:
    where = "messages" if request.get("messages") is not None else "prompt"
    if isinstance(exc, PromptTooLong):
        return error(400, "context_length_exceeded", str(exc), where)
    if isinstance(exc, WorkerBusy):
        return error(503, "worker_busy", str(exc))
    if isinstance(exc, ValueError):
        return error(400, "invalid_request_error", str(exc))
    log.exception("inference request %s failed", request.get("request_id"))  # details stay in the worker log
    return error(
        500, "inference_error", f"inference failed ({type(exc).__name__}); request {request.get('request_id')}"
    )
