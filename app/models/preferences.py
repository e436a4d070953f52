"""Human preferences: blind votes between the two sides of an A/B test, and the leaderboard they make."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Annotated

from pydantic import StringConstraints
from sqlalchemy import Column, Text
from sqlmodel import Field, SQLModel

from app.models.common import utcnow

MAX_VOTE_TEXT = 50_000
VoteText = Annotated[str, StringConstraints(min_length=1, max_length=MAX_VOTE_TEXT)]


class VoteChoice(StrEnum):
    a = "a"  # the answer of the test's deployment_a is better
    b = "b"
    tie = "tie"
    both_bad = "both_bad"


class VoteSide(StrEnum):
    a = "a"
    b = "b"


class AbVote(SQLModel, table=True):
    """One voter's verdict on one prompt. The deployments are copied from the test when the vote is cast,
    so the leaderboard and the preference dataset stay true if the test is later edited or deleted."""

    __tablename__ = "ab_vote"

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    team_id: uuid.UUID = Field(foreign_key="team.id", index=True)
    ab_test_id: uuid.UUID = Field(foreign_key="ab_test.id", index=True)
    deployment_a: uuid.UUID = Field(foreign_key="deployment.id")
    deployment_b: uuid.UUID = Field(foreign_key="deployment.id")
    prompt: str = Field(sa_column=Column(Text, nullable=False))
    answer_a: str = Field(sa_column=Column(Text, nullable=False))
    answer_b: str = Field(sa_column=Column(Text, nullable=False))
    shown_first: VoteSide
    choice: VoteChoice
    voter_id: uuid.UUID | None = Field(default=None, foreign_key="app_user.id")
    created_at: datetime = Field(default_factory=utcnow)


class AbVoteCreate(SQLModel):
    prompt: VoteText
    answer_a: VoteText = Field(description="The answer of the test's deployment_a")
    answer_b: VoteText = Field(description="The answer of the test's deployment_b")
    shown_first: VoteSide = Field(description="Which answer the voter saw first (they are shown in random order)")
    choice: VoteChoice


class AbVotePublic(SQLModel):
    id: uuid.UUID
    ab_test_id: uuid.UUID
    deployment_a: uuid.UUID
    deployment_b: uuid.UUID
    prompt: str
    shown_first: VoteSide
    choice: VoteChoice
    voter_id: uuid.UUID | None
    created_at: datetime


class AbVotesPublic(SQLModel):
    data: list[AbVotePublic]
    count: int


class Ballot(SQLModel):
    """A blind pair to vote on: the two answers of one compared prompt, in random order. The vote sends back
    which side was shown first; `first_side` is given so a client can do that without knowing the models."""

    ab_test_id: uuid.UUID
    prompt: str
    first: str
    second: str
    first_side: VoteSide


class LeaderboardEntry(SQLModel):
    deployment_id: uuid.UUID
    model: str
    rating: float = Field(description="Bradley-Terry strength on the Elo scale (1000 = the average model)")
    ci_low: float = Field(description="2.5th percentile of the rating over bootstrap resamples of the votes")
    ci_high: float = Field(description="97.5th percentile")
    wins: int
    losses: int
    ties: int
    votes: int


class Leaderboard(SQLModel):
    data: list[LeaderboardEntry]
    votes: int
    bootstrap_rounds: int
