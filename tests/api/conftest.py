from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from app.models import Role
from tests.accounts import Member, make_member, make_team


@pytest.fixture(scope="session")
def team_admin() -> Member:
    """The admin of a team of its own; `client` acts as this member."""
    return make_member(make_team(), Role.admin)


@pytest.fixture(scope="module")
def anonymous() -> Iterator[TestClient]:
    from app.main import app

    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def client(team_admin: Member) -> Iterator[TestClient]:
    from app.main import app

    with TestClient(app, headers=team_admin.headers) as c:
        yield c
