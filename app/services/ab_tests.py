"""A/B tests: one prompt set through two deployments, side by side, with latency, eval loss and
perplexity on a dataset's held-out split, and optionally a third deployment as judge."""

from __future__ import annotations

import asyncio
import math
import re
import time
import uuid
from typing import Any

from fastapi.concurrency import run_in_threadpool
from sqlmodel import Session, col, select

from app.core.config import Settings
from app.core.contracts.inference import ChatMessage, ScoreItem, ScoreMessage, new_request_id
from app.core.db import session_scope
from app.core.inflight import inflight_limiter
from app.core.layout import read_dataset_rows
from app.core.storage import Storage
from app.datasets.formats import to_training_record
from app.datasets.split import split_indices
from app.models import AbTest, AbTestCreate, Dataset, DatasetFormat, Deployment, DeploymentStatus, Team, utcnow
from app.services import audit
from app.services.crud import get_owned, paginate
from app.services.errors import Conflict, InvalidRequest, NotFound
from app.services.inference import InferenceFailed, cleanup, complete, generation, greedy, score, target
from app.services.principal import Principal
from app.services.teams import quota_limits

MAX_PROMPTS = 50  # generated side by side per compare
MAX_EVAL_ITEMS = 200  # scored for eval loss per side
MAX_CONCURRENT = 16  # generations of one compare in flight at once
JUDGE_PROMPT = (
    "You compare two answers to the same request.\n\nRequest:\n{prompt}\n\nAnswer A:\n{a}\n\nAnswer B:\n{b}\n\n"
    "Which answer is better? Reply with the single letter A or B."
)


def create_ab_test(*, session: Session, storage: Storage, actor: Principal, body: AbTestCreate) -> AbTest:
    for field in ("deployment_a", "deployment_b", "judge_deployment"):
        value = getattr(body, field)
        if value is not None:
            _active_deployment(session, actor.team_id, value, field)
    if body.deployment_a == body.deployment_b:
        raise InvalidRequest("deployment_b", "must differ from deployment_a")
    if not body.prompts and body.dataset_id is None:
        raise InvalidRequest("prompts", "give prompts, or a dataset_id whose eval split supplies them")
    if any(not p.strip() for p in body.prompts):
        raise InvalidRequest("prompts", "prompts must not be empty")
    if body.dataset_id is not None:
        dataset = get_owned(session=session, model=Dataset, team_id=actor.team_id, id=body.dataset_id)
        if dataset is None:
            raise NotFound("dataset_id", f"no dataset {body.dataset_id}")
        if dataset.format is DatasetFormat.preference or dataset.eval_rows == 0:
            raise InvalidRequest("dataset_id", "needs an SFT-format dataset with a non-empty eval split")
    test = AbTest(team_id=actor.team_id, **body.model_dump())
    session.add(test)
    session.flush()
    audit.record(
        session=session, actor=actor, action="ab_test.create", target_type="ab_test", target_id=test.id, name=body.name
    )
    session.commit()
    session.refresh(test)
    return test


def list_ab_tests(*, session: Session, team_id: uuid.UUID, skip: int, limit: int) -> tuple[list[AbTest], int]:
    query = select(AbTest).where(AbTest.team_id == team_id).order_by(col(AbTest.created_at).desc())
    return paginate(session=session, query=query, skip=skip, limit=limit)


async def compare(*, session: Session, settings: Settings, storage: Storage, actor: Principal, test: AbTest) -> AbTest:
    a = await run_in_threadpool(_active_deployment, session, test.team_id, test.deployment_a, "deployment_a")
    b = await run_in_threadpool(_active_deployment, session, test.team_id, test.deployment_b, "deployment_b")
    judge = None
    if test.judge_deployment:
        judge = await run_in_threadpool(
            _active_deployment, session, test.team_id, test.judge_deployment, "judge_deployment"
        )
    eval_items = await run_in_threadpool(_eval_items, session, storage, test.dataset_id)
    limit = await run_in_threadpool(_inflight_limit, session, settings, test.team_id)
    await run_in_threadpool(session.close)  # generation takes a while: hold no connection meanwhile
    prompts = [ScoreItem(messages=[ChatMessage(role="user", content=p)], completion="") for p in test.prompts]
    prompts = (prompts or eval_items)[:MAX_PROMPTS]

    # A compare's generations count against the team's in-flight quota like /v1 requests: it takes, up
    # front, one slot per generation it runs at once (at most MAX_CONCURRENT, never more than the quota),
    # or answers 429 when the team has fewer free; everything it sends runs through a gate of that size.
    slots = max(1, min(MAX_CONCURRENT, 2 * len(prompts), limit))
    hold, limiter = new_request_id(), inflight_limiter()
    if not await limiter.acquire(test.team_id, hold, limit, slots=slots):
        raise InferenceFailed(
            429,
            "rate_limit_exceeded",
            f"the comparison runs {slots} generations at once, and your team has fewer of its {limit} in-flight "
            "requests (its max_inflight_requests quota) free; retry when some finish",
        )
    try:
        gate = asyncio.Semaphore(slots)  # a compare is one user's job: it must not take the whole fleet

        async def answer(deployment: Deployment, item: ScoreItem) -> dict[str, Any]:
            """One side's answer, or its error: one bad prompt must not sink the whole comparison."""
            async with gate:
                return await _answer(deployment, item)

        async def _answer(deployment: Deployment, item: ScoreItem) -> dict[str, Any]:
            start = time.monotonic()
            message = generation(deployment, greedy(test.max_tokens), messages=item.messages, prompt=item.prompt)
            try:
                done = await complete(settings, message)
            except InferenceFailed as exc:
                return {"text": None, "error": exc.message, "latency_s": None}
            latency = round(time.monotonic() - start, 4)
            return {"text": done.text, "latency_s": latency, "completion_tokens": done.completion_tokens}

        # All of both sides at once: they meet in the workers' batches.
        answers = await asyncio.gather(*(answer(d, p) for d in (a, b) for p in prompts))
        side_a, side_b = answers[: len(prompts)], answers[len(prompts) :]
        rows: list[dict[str, Any]] = [
            {"prompt": _display(p), "a": x, "b": y} for p, x, y in zip(prompts, side_a, side_b, strict=True)
        ]
        results: dict[str, Any] = {"rows": rows, "a": _side(a, side_a), "b": _side(b, side_b)}
        if eval_items:

            async def eval_loss(deployment: Deployment) -> float:
                async with gate:
                    return await _eval_loss(settings, deployment, eval_items)

            scored = await asyncio.gather(*(eval_loss(d) for d in (a, b)), return_exceptions=True)
            for key, loss in zip(("a", "b"), scored, strict=True):
                if isinstance(loss, InferenceFailed):
                    results[key]["eval_error"] = loss.message
                elif isinstance(loss, BaseException):
                    raise loss
                else:
                    results[key] |= {"eval_loss": loss, "perplexity": math.exp(loss), "eval_items": len(eval_items)}
        if judge is not None:

            async def judged(row: dict[str, Any]) -> str | None:
                async with gate:
                    return await _judge(settings, judge, row)

            verdicts = await asyncio.gather(*(judged(row) for row in rows))
            for row, verdict in zip(rows, verdicts, strict=True):
                row["judge"] = verdict
            decided = [v for v in verdicts if v]
            results["judge"] = {
                "deployment": str(judge.id),
                "model": judge.name,
                "undecided": len(verdicts) - len(decided),
                "ties": decided.count("tie"),  # includes the verdicts that flipped with the answers' order
                "win_rate_a": _rate(decided, "a"),
                "win_rate_b": _rate(decided, "b"),
                "order_swapped": True,
            }
    finally:
        await cleanup(limiter.release(test.team_id, hold), f"releasing the in-flight slots of compare {test.id}")

    def save() -> AbTest:
        with session_scope() as fresh:
            row = fresh.get(AbTest, test.id)
            assert row is not None
            row.results, row.compared_at = results, utcnow()
            fresh.add(row)
            audit.record(session=fresh, actor=actor, action="ab_test.compare", target_type="ab_test", target_id=row.id)
            fresh.commit()
            return row

    return await run_in_threadpool(save)


def _inflight_limit(session: Session, settings: Settings, team_id: uuid.UUID) -> int:
    team = session.get(Team, team_id)
    return quota_limits(team=team, settings=settings)["max_inflight_requests"] if team else 0


def _active_deployment(session: Session, team_id: uuid.UUID, deployment_id: uuid.UUID, field: str) -> Deployment:
    deployment = get_owned(session=session, model=Deployment, team_id=team_id, id=deployment_id)
    if deployment is None:
        raise NotFound(field, f"no deployment {deployment_id}")
    if deployment.status is not DeploymentStatus.active:
        raise Conflict(f"deployment {deployment.name} is retired", field=field)
    return deployment


def _eval_items(session: Session, storage: Storage, dataset_id: uuid.UUID | None) -> list[ScoreItem]:
    """The dataset's held-out rows as (prompt, completion) items, the same split training used."""
    dataset = session.get(Dataset, dataset_id) if dataset_id else None
    if dataset is None:
        return []
    rows = read_dataset_rows(storage, dataset.id)
    _, held_out = split_indices(rows, dataset.eval_fraction)
    items = []
    for i in held_out[:MAX_EVAL_ITEMS]:
        record = to_training_record(rows[i], dataset.format)
        if "messages" in record and record["messages"][-1]["role"] == "assistant":
            history = [ChatMessage.model_validate(m) for m in record["messages"][:-1]]
            items.append(ScoreItem(messages=history, completion=record["messages"][-1]["content"]))
        elif "prompt" in record:
            items.append(ScoreItem(prompt=record["prompt"], completion=record["completion"]))
        elif "text" in record:
            items.append(ScoreItem(prompt="", completion=record["text"]))
    return items


async def _eval_loss(settings: Settings, deployment: Deployment, items: list[ScoreItem]) -> float:
    scored = await score(settings, ScoreMessage(**target(deployment).model_dump(), items=items))
    nll = sum(s.nll_sum for s in scored.scores)
    tokens = sum(s.tokens for s in scored.scores)
    return nll / max(tokens, 1)


async def _judge(settings: Settings, judge: Deployment, row: dict[str, Any]) -> str | None:
    """The judge's verdict ("a", "b" or "tie"), asked twice with the answers in both orders: a judge that
    prefers whichever answer comes first (position bias) contradicts itself, and that is a tie. None
    when neither order gave a verdict."""
    a, b = row["a"]["text"], row["b"]["text"]
    if a is None or b is None:
        return None
    # One after the other: the compare's gate gave this verdict one in-flight slot.
    as_shown = await _ask_judge(settings, judge, row["prompt"], a, b)
    swapped = {"a": "b", "b": "a"}.get(await _ask_judge(settings, judge, row["prompt"], b, a) or "")
    if as_shown is None or swapped is None:
        return as_shown or swapped
    return as_shown if as_shown == swapped else "tie"


async def _ask_judge(settings: Settings, judge: Deployment, prompt: str, first: str, second: str) -> str | None:
    """Which of the two answers, in the order shown, the judge picks: "a" (first) or "b"."""
    text = JUDGE_PROMPT.format(prompt=prompt, a=first, b=second)
    message = generation(judge, greedy(4), messages=[ChatMessage(role="user", content=text)])
    try:
        done = await complete(settings, message)
    except InferenceFailed:
        return None
    match = re.search(r"\b([AB])\b", done.text.strip().upper())
    return match.group(1).lower() if match else None


def _side(deployment: Deployment, answers: list[dict[str, Any]]) -> dict[str, Any]:
    latencies = [x["latency_s"] for x in answers if x["latency_s"] is not None]
    return {
        "deployment": str(deployment.id),
        "model": deployment.name,
        "errors": len(answers) - len(latencies),
        "mean_latency_s": round(sum(latencies) / max(len(latencies), 1), 4),
    }


def _rate(verdicts: list[str], side: str) -> float | None:
    return round(verdicts.count(side) / len(verdicts), 4) if verdicts else None


def _display(item: ScoreItem) -> str:
    if item.messages is not None:
        return next((m.content for m in reversed(item.messages) if m.role == "user"), "")
    return item.prompt or ""
