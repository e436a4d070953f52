"""The import rules of pyproject.toml's [tool.importlinter] hold: layers only point down.

api/cli → services → core (settings, db, models, storage layout, queue names, contracts); workers →
core, never services or api; the API never imports worker code or torch; the trainer child imports
only the contracts. The second test proves the check can fail: it adds one forbidden import to a
copy of the tree and expects import-linter to name the broken contract.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.fast
LINT_IMPORTS = str(Path(sys.executable).with_name("lint-imports"))  # import-linter's command, beside python


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [LINT_IMPORTS, "--no-cache", "--config", str(root / "pyproject.toml")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_import_rules_hold_on_this_tree() -> None:
    done = lint_imports(REPO)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


@pytest.mark.parametrize(
    ("module", "forbidden_import", "contract"),
    [
        ("app/core/db.py", "import app.services.relay", "API and CLI sit on services"),
        ("workers/jobs.py", "import app.services.experiments", "Workers depend on the core"),
        ("app/services/relay.py", "import workers.training.supervisor", "never import worker code"),
        ("workers/training/run.py", "import app.core.db", "trainer child runs on a bare GPU box"),
    ],
)
def test_a_forbidden_import_breaks_the_check(tmp_path: Path, module: str, forbidden_import: str, contract: str) -> None:
    for package in ("app", "workers"):
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__", "static"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{forbidden_import}  # added by the mutation test\n")
    done = lint_imports(tmp_path)
    assert done.returncode != 0, done.stdout[-4000:]
    broken = done.stdout.split("Broken contracts", 1)[-1]
    assert contract in " ".join(broken.split()), done.stdout[-4000:]
