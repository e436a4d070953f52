"""A/B testing: two deployments on one prompt set (or a dataset's eval split), compared side by side."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query

from app.api.deps import SessionDep, SettingsDep, StorageDep, Trainer, Viewer
from app.models import AbTest, AbTestCreate, AbTestPublic, AbTestsPublic
from app.services import ab_tests as service

router = APIRouter(prefix="/ab-testing", tags=["ab testing"])


@router.post("/", response_model=AbTestPublic, status_code=201)
def create_ab_test(session: SessionDep, storage: StorageDep, principal: Trainer, body: AbTestCreate) -> AbTestPublic:
    """Define a test: `deployment_a`, `deployment_b`, `prompts` or a `dataset_id`, optional `judge_deployment`."""
    return AbTestPublic.model_validate(service.create_ab_test(session, storage, principal, body))


@router.get("/", response_model=AbTestsPublic)
def list_ab_tests(
    session: SessionDep, principal: Viewer,
    skip: Annotated[int, Query(ge=0)] = 0, limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> AbTestsPublic:  # fmt: skip
    rows, count = service.list_ab_tests(session, principal.team_id, skip, limit)
    return AbTestsPublic(data=[AbTestPublic.model_validate(t) for t in rows], count=count)


@router.get("/{test_id}", response_model=AbTestPublic)
def read_ab_test(session: SessionDep, principal: Viewer, test_id: uuid.UUID) -> AbTestPublic:
    return AbTestPublic.model_validate(_get(session, principal.team_id, test_id))


@router.post("/{test_id}/compare", response_model=AbTestPublic)
async def compare(
    session: SessionDep, settings: SettingsDep, storage: StorageDep, principal: Trainer, test_id: uuid.UUID
) -> AbTestPublic:
    """Run it: side-by-side outputs (greedy), latency per side, eval loss and perplexity of each on the
    held-out split, and the judge's preference per prompt with win rates. Stored on the test."""
    test = _get(session, principal.team_id, test_id)
    return AbTestPublic.model_validate(await service.compare(session, settings, storage, principal, test))


def _get(session: SessionDep, team_id: uuid.UUID, test_id: uuid.UUID) -> AbTest:
    test = service.get_ab_test(session, team_id, test_id)
    if test is None:
        raise HTTPException(404, f"A/B test {test_id} not found")
    return test
