"""A/B testing: two deployments on one prompt set (or a dataset's eval split), compared side by side."""

from __future__ import annotations

import uuid

from fastapi import APIRouter

from app.api.deps import Page, SessionDep, SettingsDep, StorageDep, Trainer, Viewer, get_owned_or_404
from app.api.idempotency import idempotent
from app.api.responses import UPSTREAM_ERRORS
from app.models import AbTest, AbTestCreate, AbTestPublic, AbTestsPublic
from app.services import ab_tests as service

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


def _get(session: SessionDep, team_id: uuid.UUID, test_id: uuid.UUID) -> AbTest:
    return get_owned_or_404(session=session, model=AbTest, team_id=team_id, id=test_id, what="A/B test")
