"""A/B testing: two deployments on one prompt set (or a dataset's eval split), compared side by side."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query

from app.api.deps import Page, SessionDep, SettingsDep, StorageDep, Trainer, Viewer, get_owned_or_404
from app.api.idempotency import idempotent
from app.api.responses import UPSTREAM_ERRORS
from app.models import (
    AbTest,
    AbTestCreate,
    AbTestPublic,
    AbTestsPublic,
    AbVoteCreate,
    AbVotePublic,
    AbVotesPublic,
    Ballot,
    DatasetPublic,
    Leaderboard,
)
from app.services import ab_tests as service
from app.services import preferences
from app.services.datasets import upload_limits

router = APIRouter(prefix="/ab-testing", tags=["ab testing"])


@router.post("/", response_model=AbTestPublic, status_code=201)
@idempotent
def create_ab_test(session: SessionDep, storage: StorageDep, principal: Trainer, body: AbTestCreate) -> AbTestPublic:
    """Define a test: `deployment_a`, `deployment_b`, `prompts` or a `dataset_id`, optional `judge_deployment`."""
    return AbTestPublic.model_validate(
        service.create_ab_test(session=session, storage=storage, actor=principal, body=body)
    )


@router.get("/", response_model=AbTestsPublic)
def list_ab_tests(session: SessionDep, principal: Viewer, page: Page) -> AbTestsPublic:
    rows, count = service.list_ab_tests(session=session, team_id=principal.team_id, skip=page.skip, limit=page.limit)
    return AbTestsPublic(data=[AbTestPublic.model_validate(t) for t in rows], count=count)


@router.get("/{test_id}", response_model=AbTestPublic)
def read_ab_test(session: SessionDep, principal: Viewer, test_id: uuid.UUID) -> AbTestPublic:
    return AbTestPublic.model_validate(_get(session, principal.team_id, test_id))


@router.post("/{test_id}/compare", response_model=AbTestPublic, responses=UPSTREAM_ERRORS)
async def compare(
    session: SessionDep, settings: SettingsDep, storage: StorageDep, principal: Trainer, test_id: uuid.UUID
) -> AbTestPublic:
    """Run it: side-by-side outputs (greedy), latency per side, eval loss and perplexity of each on the
    held-out split, and the judge's preference per prompt with win rates. Stored on the test."""
    test = _get(session, principal.team_id, test_id)
    compared = await service.compare(session=session, settings=settings, storage=storage, actor=principal, test=test)
    return AbTestPublic.model_validate(compared)


@router.get("/{test_id}/ballot", response_model=Ballot)
def ballot(session: SessionDep, principal: Trainer, test_id: uuid.UUID) -> Ballot:
    """A blind pair to vote on: one compared prompt's two answers in random order, without the models.
    (409 before the first compare.)"""
    return preferences.ballot(_get(session, principal.team_id, test_id))


@router.post("/{test_id}/votes", response_model=AbVotePublic, status_code=201)
@idempotent
def vote(session: SessionDep, principal: Trainer, test_id: uuid.UUID, body: AbVoteCreate) -> AbVotePublic:
    """Record which answer is better (`a`, `b`, `tie` or `both_bad`) and which one the voter saw first."""
    test = _get(session, principal.team_id, test_id)
    return AbVotePublic.model_validate(preferences.record_vote(session=session, actor=principal, test=test, body=body))


@router.get("/{test_id}/votes", response_model=AbVotesPublic)
def list_votes(session: SessionDep, principal: Viewer, test_id: uuid.UUID, page: Page) -> AbVotesPublic:
    test = _get(session, principal.team_id, test_id)
    votes, count = preferences.list_votes(session=session, test=test, skip=page.skip, limit=page.limit)
    return AbVotesPublic(data=[AbVotePublic.model_validate(v) for v in votes], count=count)


@router.post("/{test_id}/preference-dataset", response_model=DatasetPublic, status_code=201)
@idempotent
def preference_dataset(
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
    principal: Trainer,
    test_id: uuid.UUID,
    name: Annotated[str | None, Query(min_length=1, max_length=200)] = None,
) -> DatasetPublic:
    """The test's votes for `a` or `b` as a preference dataset (prompt, chosen, rejected) a DPO
    experiment trains on; its `origin` names the test and both deployments."""
    test = _get(session, principal.team_id, test_id)
    dataset = preferences.preference_dataset(
        session=session, storage=storage, actor=principal, test=test, name=name, limits=upload_limits(settings.api)
    )
    return DatasetPublic.model_validate(dataset)


leaderboard_router = APIRouter(tags=["ab testing"])


@leaderboard_router.get("/leaderboard", response_model=Leaderboard)
def leaderboard(session: SessionDep, principal: Viewer) -> Leaderboard:
    """The team's deployments ranked by every vote of its A/B tests (Bradley-Terry on the Elo scale, with
    95% bootstrap intervals)."""
    return preferences.leaderboard(session=session, team_id=principal.team_id)


def _get(session: SessionDep, team_id: uuid.UUID, test_id: uuid.UUID) -> AbTest:
    return get_owned_or_404(session=session, model=AbTest, team_id=team_id, id=test_id, what="A/B test")
