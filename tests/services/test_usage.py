"""Deployment request and token rates (app/services/usage.py), against the database: counts made in memory
reach the per-minute rows on a flush, two processes adding to one minute keep both counts, and the rates
cover only the window asked for."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest

from app.core.db import session_scope
from app.models import Deployment, DeploymentUsage, utcnow
from app.services import usage
from tests.accounts import make_team

pytestmark = pytest.mark.usefixtures("db")


def deployment() -> uuid.UUID:
    with session_scope() as session:
        row = Deployment(team_id=make_team(), name=f"d-{uuid.uuid4().hex[:8]}", base_model="/models/tiny")
        session.add(row)
        session.commit()
        return row.id


def test_counts_reach_the_rates_after_a_flush() -> None:
    target, other = deployment(), deployment()
    usage.record(target, ok=True, prompt_tokens=10, completion_tokens=30)
    usage.record(target, ok=False)
    usage.record(other, ok=True, prompt_tokens=1, completion_tokens=1)
    with session_scope() as session:
        assert usage.rates(session, target).requests == 0  # counted in memory only, until the relay flushes
        usage.flush(session)
        rates = usage.rates(session, target, window_s=300)
    assert (rates.requests, rates.errors, rates.prompt_tokens, rates.completion_tokens) == (2, 1, 10, 30)
    assert rates.requests_per_minute == pytest.approx(2 * 60 / 300)
    assert rates.completion_tokens_per_second == pytest.approx(30 / 300)


def test_flushes_of_the_same_minute_add_up() -> None:
    """Two API replicas flushing counts of one minute: the second adds to the row, never replaces it."""
    target = deployment()
    for _ in range(2):
        usage.record(target, ok=True, prompt_tokens=5, completion_tokens=7)
        with session_scope() as session:
            usage.flush(session)
    with session_scope() as session:
        rates = usage.rates(session, target)
    assert (rates.requests, rates.completion_tokens) == (2, 14)


def test_minutes_outside_the_window_do_not_count() -> None:
    target = deployment()
    with session_scope() as session:
        old = utcnow().replace(second=0, microsecond=0) - timedelta(minutes=30)
        session.add(DeploymentUsage(deployment_id=target, minute=old, requests=50, completion_tokens=500))
        session.commit()
        assert usage.rates(session, target, window_s=300).requests == 0
        assert usage.rates(session, target, window_s=3600).requests == 50
