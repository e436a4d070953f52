"""Blind votes on A/B answers, the leaderboard they make, and the preference dataset they become."""

from __future__ import annotations

import itertools
import uuid
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.core.db import session_scope
from app.models import AbTest, Role
from app.services.preferences import fit_ratings
from tests.accounts import make_member, make_team


@pytest.fixture(scope="module")
def models(client: TestClient, tiny_model: Path) -> list[str]:
    """Three deployments of the team."""
    ids = []
    for name in ("strong", "middle", "weak"):
        r = client.post("/api/deployments/", json={"base_model": str(tiny_model), "name": f"pref-{name}"})
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    return ids


def ab_test(client: TestClient, a: str, b: str) -> str:
    body = {"name": "votes", "deployment_a": a, "deployment_b": b, "prompts": ["hi"]}
    r = client.post("/api/ab-testing/", json=body)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def vote(client: TestClient, test: str, choice: str, n: int = 1, **extra: Any) -> None:
    for i in range(n):
        body = {"prompt": f"prompt {i}", "answer_a": f"A{i}", "answer_b": f"B{i}", "shown_first": "b", "choice": choice}
        r = client.post(f"/api/ab-testing/{test}/votes", json={**body, **extra})
        assert r.status_code == 201, r.text


def test_thirty_votes_order_the_leaderboard_as_they_say(client: TestClient, models: list[str]) -> None:
    strong, middle, weak = models
    first = ab_test(client, strong, middle)
    vote(client, first, "a", 9)
    vote(client, first, "b", 1)
    vote(client, first, "tie", 2)
    second = ab_test(client, middle, weak)
    vote(client, second, "a", 8)
    vote(client, second, "both_bad", 2)
    third = ab_test(client, weak, strong)
    vote(client, third, "b", 8)

    board = client.get("/api/leaderboard").json()
    assert board["votes"] == 30 and board["bootstrap_rounds"] > 0
    assert [e["deployment_id"] for e in board["data"]] == [strong, middle, weak]
    top = board["data"][0]
    assert (top["wins"], top["losses"], top["ties"], top["votes"]) == (17, 1, 2, 20)
    assert top["model"] == "pref-strong"
    for entry in board["data"]:
        assert entry["ci_low"] <= entry["rating"] <= entry["ci_high"]
    # The leaderboard is the team's own: another team sees none of these votes.
    outsider = make_member(make_team(), Role.admin)
    assert TestClient(client.app, headers=outsider.headers).get("/api/leaderboard").json() == {
        "data": [],
        "votes": 0,
        "bootstrap_rounds": 0,
    }


def test_the_fit_is_bradley_terry() -> None:
    """Two players, 3 wins to 1: with the prior's half game drawn against an average player each, the
    fitted strengths solve the BT likelihood equations; the gap matches 400*log10(s_a/s_b)."""
    ratings = fit_ratings({("x", "y", 1.0): 3, ("x", "y", 0.0): 1}, ["x", "y"])  # type: ignore[arg-type]
    assert ratings["x"] > 1000 > ratings["y"]
    assert ratings["x"] - 1000 == pytest.approx(1000 - ratings["y"], abs=1e-6)
    # No games: everyone average.
    assert fit_ratings({}, ["p", "q"]) == {"p": pytest.approx(1000), "q": pytest.approx(1000)}  # type: ignore[arg-type]
    # Order of votes never matters (unlike online Elo).
    games = [("x", "y", 1.0), ("x", "y", 0.0), ("y", "z", 1.0)]
    results = {
        tuple(sorted(fit_ratings(_count(order), ["x", "y", "z"]).items())) for order in itertools.permutations(games)
    }
    assert len(results) == 1


def _count(games: Any) -> Any:
    from collections import Counter

    return Counter(games)


def test_votes_become_a_preference_dataset(client: TestClient, models: list[str]) -> None:
    strong, middle, _ = models
    test = ab_test(client, strong, middle)
    r = client.post(f"/api/ab-testing/{test}/preference-dataset")
    assert r.status_code == 422 and r.json()["field"] == "test_id"  # no decided vote yet
    vote(client, test, "a", 2)
    vote(client, test, "b", 1)
    vote(client, test, "tie", 1)
    listed = client.get(f"/api/ab-testing/{test}/votes").json()
    assert listed["count"] == 4 and {v["choice"] for v in listed["data"]} == {"a", "b", "tie"}

    r = client.post(f"/api/ab-testing/{test}/preference-dataset", params={"name": "prefs"})
    assert r.status_code == 201, r.text
    dataset = r.json()
    assert dataset["format"] == "preference" and dataset["row_count"] == 3 and dataset["name"] == "prefs"
    assert dataset["origin"] == {"ab_test": test, "deployments": [strong, middle]}
    rows = [line for line in client.get(f"/api/datasets/{dataset['id']}/export").text.splitlines()]
    assert rows[0] == '{"prompt": "prompt 0", "chosen": "A0", "rejected": "B0"}'
    assert rows[2] == '{"prompt": "prompt 0", "chosen": "B0", "rejected": "A0"}'


def test_ballots_are_blind_and_in_random_order(client: TestClient, models: list[str]) -> None:
    strong, middle, _ = models
    test = ab_test(client, strong, middle)
    assert client.get(f"/api/ab-testing/{test}/ballot").status_code == 409  # nothing compared yet
    with session_scope() as session:
        row = session.get(AbTest, uuid.UUID(test))
        assert row is not None
        row.results = {"rows": [{"prompt": "p", "a": {"text": "from A"}, "b": {"text": "from B"}}]}
        session.add(row)
        session.commit()
    seen = set()
    for _ in range(30):
        ballot = client.get(f"/api/ab-testing/{test}/ballot").json()
        assert set(ballot) == {"ab_test_id", "prompt", "first", "second", "first_side"}
        assert ballot["first"] == ("from A" if ballot["first_side"] == "a" else "from B")
        seen.add(ballot["first_side"])
    assert seen == {"a", "b"}


def test_votes_are_checked_and_scoped(client: TestClient, anonymous: TestClient, models: list[str]) -> None:
    strong, middle, _ = models
    test = ab_test(client, strong, middle)
    base = {"prompt": "p", "answer_a": "a", "answer_b": "b", "shown_first": "a"}
    r = client.post(f"/api/ab-testing/{test}/votes", json={**base, "choice": "c"})
    assert r.status_code == 422 and "choice" in r.text
    r = client.post(f"/api/ab-testing/{test}/votes", json={**base, "choice": "a", "answer_a": ""})
    assert r.status_code == 422 and "answer_a" in r.text
    team = client.get("/api/users/me").json()["teams"][0]["id"]
    viewer = make_member(uuid.UUID(team), Role.viewer).headers
    assert (
        anonymous.post(f"/api/ab-testing/{test}/votes", json={**base, "choice": "a"}, headers=viewer).status_code == 403
    )
    assert anonymous.get(f"/api/ab-testing/{test}/votes", headers=viewer).status_code == 200
    outsider = make_member(make_team(), Role.admin).headers
    assert (
        anonymous.post(f"/api/ab-testing/{test}/votes", json={**base, "choice": "a"}, headers=outsider).status_code
        == 404
    )
