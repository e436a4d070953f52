"""Human preferences: blind votes on A/B answers, a Bradley-Terry leaderboard, and preference datasets.

A vote names the better of the two answers a test's deployments gave to one prompt (or a tie, or both
bad), and which answer the voter saw first: ballots show them in random order, so position bias cancels
over many votes, and the order is kept to check it.

The leaderboard fits a Bradley-Terry model (each deployment a strength; P(i beats j) = s_i / (s_i + s_j))
to every vote of the team by the minorization-maximization iteration of Hunter (2004), a tie or "both
bad" counting half a win to each side. Strengths are shown on the Elo scale (400 * log10, centred on
1000), and the confidence interval is the 2.5th..97.5th percentile over bootstrap resamples of the votes.
A fit, unlike an online Elo update, does not depend on the order the votes came in.
"""

from __future__ import annotations

import math
import random
import uuid
from collections import Counter, defaultdict
from typing import Any

import numpy as np
from sqlmodel import Session, col, select

from app.core.storage import Storage
from app.datasets.readers import Limits
from app.models import (
    AbTest,
    AbVote,
    AbVoteCreate,
    Ballot,
    Dataset,
    DatasetFormat,
    Deployment,
    Leaderboard,
    LeaderboardEntry,
    VoteChoice,
    VoteSide,
)
from app.services import audit
from app.services.crud import paginate
from app.services.datasets import create_from_rows
from app.services.errors import Conflict, InvalidRequest
from app.services.principal import Principal

BOOTSTRAP_ROUNDS = 200
MM_ITERATIONS = 500
CONVERGED = 1e-7  # largest change of a log-strength between iterations that ends the fit
PRIOR_GAMES = 0.5  # each model also "plays" a virtual average model to a draw: keeps unbeaten models finite
MAX_LEADERBOARD_VOTES = 100_000  # the latest, when a team has more
MAX_DATASET_VOTES = 500_000  # api.max_dataset_rows' default


def record_vote(*, session: Session, actor: Principal, test: AbTest, body: AbVoteCreate) -> AbVote:
    vote = AbVote(
        team_id=test.team_id,
        ab_test_id=test.id,
        deployment_a=test.deployment_a,
        deployment_b=test.deployment_b,
        voter_id=actor.user_id,
        **body.model_dump(),
    )
    session.add(vote)
    session.flush()
    audit.record(
        session=session,
        actor=actor,
        action="ab_test.vote",
        target_type="ab_test",
        target_id=test.id,
        choice=body.choice,
    )
    session.commit()
    session.refresh(vote)
    return vote


def ballot(test: AbTest, rng: random.Random | None = None) -> Ballot:
    """One compared prompt whose two answers both exist, the answers in random order."""
    rows = [r for r in (test.results or {}).get("rows", []) if r["a"].get("text") and r["b"].get("text")]
    if not rows:
        raise Conflict("the test has no compared answers to vote on yet; run a compare first", field="test_id")
    rng = rng or random.SystemRandom()
    row = rng.choice(rows)
    first = rng.choice([VoteSide.a, VoteSide.b])
    second = VoteSide.b if first is VoteSide.a else VoteSide.a
    return Ballot(
        ab_test_id=test.id, prompt=row["prompt"], first=row[first]["text"], second=row[second]["text"], first_side=first
    )


def list_votes(*, session: Session, test: AbTest, skip: int, limit: int) -> tuple[list[AbVote], int]:
    query = select(AbVote).where(AbVote.ab_test_id == test.id).order_by(col(AbVote.created_at))
    return paginate(session=session, query=query, skip=skip, limit=limit)


# --- leaderboard -------------------------------------------------------------------------------------------


def leaderboard(*, session: Session, team_id: uuid.UUID, seed: int = 0) -> Leaderboard:
    votes = session.exec(
        select(AbVote.deployment_a, AbVote.deployment_b, AbVote.choice)
        .where(AbVote.team_id == team_id)
        .order_by(col(AbVote.created_at).desc())
        .limit(MAX_LEADERBOARD_VOTES)
    ).all()
    outcomes = Counter((a, b, _score(choice)) for a, b, choice in votes)  # a game type and how often it happened
    players = sorted({p for a, b, _ in outcomes for p in (a, b)})
    if not players:
        return Leaderboard(data=[], votes=0, bootstrap_rounds=0)
    ratings = fit_ratings(outcomes, players)
    # Bootstrap: resampling the votes with replacement is drawing the counts of each game type from a
    # multinomial with the observed shares (one draw per round, whatever the number of votes).
    kinds = list(outcomes)
    shares = np.array([outcomes[k] for k in kinds], dtype=float) / len(votes)
    rng = np.random.default_rng(seed)
    samples: dict[uuid.UUID, list[float]] = defaultdict(list)
    for counts in rng.multinomial(len(votes), shares, size=BOOTSTRAP_ROUNDS):
        resampled = Counter({kind: int(n) for kind, n in zip(kinds, counts, strict=True) if n})
        for player, rating in fit_ratings(resampled, players).items():
            samples[player].append(rating)
    names = dict(session.exec(select(Deployment.id, Deployment.name).where(col(Deployment.id).in_(players))).all())
    record: dict[uuid.UUID, Counter[str]] = defaultdict(Counter)
    for (a, b, score), n in outcomes.items():
        outcome = {1.0: ("wins", "losses"), 0.0: ("losses", "wins")}.get(score, ("ties", "ties"))
        record[a][outcome[0]] += n
        record[b][outcome[1]] += n
    entries = [
        LeaderboardEntry(
            deployment_id=player,
            model=names.get(player, str(player)),
            rating=round(ratings[player], 1),
            ci_low=round(float(np.percentile(samples[player], 2.5)), 1),
            ci_high=round(float(np.percentile(samples[player], 97.5)), 1),
            wins=record[player]["wins"],
            losses=record[player]["losses"],
            ties=record[player]["ties"],
            votes=sum(record[player].values()),
        )
        for player in players
    ]
    entries.sort(key=lambda e: e.rating, reverse=True)
    return Leaderboard(data=entries, votes=len(votes), bootstrap_rounds=BOOTSTRAP_ROUNDS)


def _score(choice: str) -> float:
    """Deployment a's share of the game."""
    return {VoteChoice.a: 1.0, VoteChoice.b: 0.0}.get(VoteChoice(choice), 0.5)


def fit_ratings(outcomes: Counter[tuple[Any, Any, float]], players: list[Any]) -> dict[Any, float]:
    """Bradley-Terry strengths by MM iteration, on the Elo scale (geometric mean 1000). ``outcomes`` counts
    each (a, b, a's score) game. Every player also draws ``PRIOR_GAMES`` games against a virtual player
    of strength 1, so one who never lost (or never won) gets a finite rating."""
    wins: dict[Any, float] = {p: PRIOR_GAMES / 2 for p in players}
    games: Counter[tuple[Any, Any]] = Counter()  # games between each ordered pair, both orders counted
    for (a, b, score), n in outcomes.items():
        wins[a] += score * n
        wins[b] += (1 - score) * n
        games[(a, b)] += n
        games[(b, a)] += n
    opponents: dict[Any, list[tuple[Any, int]]] = defaultdict(list)
    for (p, q), n in games.items():
        opponents[p].append((q, n))
    strength = dict.fromkeys(players, 1.0)
    for _ in range(MM_ITERATIONS):
        updated = {}
        for p in players:
            denominator = PRIOR_GAMES / (strength[p] + 1.0)
            denominator += sum(n / (strength[p] + strength[q]) for q, n in opponents[p])
            updated[p] = wins[p] / denominator
        scale = math.exp(sum(math.log(s) for s in updated.values()) / len(updated))
        updated = {p: s / scale for p, s in updated.items()}
        converged = max(abs(math.log(updated[p] / strength[p])) for p in players) < CONVERGED
        strength = updated
        if converged:
            break
    return {p: 1000 + 400 * math.log10(s) for p, s in strength.items()}


# --- preference dataset ------------------------------------------------------------------------------------


def preference_dataset(
    *, session: Session, storage: Storage, actor: Principal, test: AbTest, name: str | None, limits: Limits
) -> Dataset:
    """The test's decided votes as (prompt, chosen, rejected) rows; ties and "both bad" say nothing of
    which answer to prefer and are left out."""
    rows = [
        {"prompt": v.prompt, "chosen": v.answer_a, "rejected": v.answer_b}
        if v.choice is VoteChoice.a
        else {"prompt": v.prompt, "chosen": v.answer_b, "rejected": v.answer_a}
        for v in session.exec(
            select(AbVote).where(AbVote.ab_test_id == test.id).order_by(col(AbVote.created_at)).limit(MAX_DATASET_VOTES)
        )
        if v.choice in (VoteChoice.a, VoteChoice.b)
    ]
    if not rows:
        raise InvalidRequest("test_id", "the test has no vote for a or b yet (ties and both-bad are left out)")
    return create_from_rows(
        session=session,
        storage=storage,
        actor=actor,
        name=name or f"{test.name} preferences"[:200],
        rows=rows,
        fmt=DatasetFormat.preference,
        eval_fraction=0.0,
        limits=limits,
        origin={"ab_test": str(test.id), "deployments": [str(test.deployment_a), str(test.deployment_b)]},
    )
