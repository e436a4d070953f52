"""Static checks over the product's source: no pickle, no remote code, no unsafe torch.load.

User data (datasets, adapters, model weights) is read with JSON, Arrow and safetensors only; these
checks keep it so when someone adds code later.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for d in ("app", "workers") for p in (REPO / d).rglob("*.py"))
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "shelve", "marshal"}


def _calls(tree: ast.AST) -> Iterator[ast.Call]:
    return (node for node in ast.walk(tree) if isinstance(node, ast.Call))


def _name(func: ast.expr) -> str:
    return ast.unparse(func)


def test_sources_exist() -> None:
    assert len(SOURCES) > 40


def test_no_pickle_modules() -> None:
    found = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            found += [f"{path.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] in UNSAFE_MODULES]
    assert not found


def test_trust_remote_code_is_never_true() -> None:
    found = []
    for path in SOURCES:
        for call in _calls(ast.parse(path.read_text())):
            for kw in call.keywords:
                if kw.arg == "trust_remote_code" and not (
                    isinstance(kw.value, ast.Constant) and kw.value.value is False
                ):
                    found.append(f"{path.relative_to(REPO)}:{call.lineno}")
    assert not found


def test_torch_load_only_with_weights_only() -> None:
    found = []
    for path in SOURCES:
        for call in _calls(ast.parse(path.read_text())):
            if _name(call.func).endswith("torch.load"):
                safe = any(
                    kw.arg == "weights_only" and isinstance(kw.value, ast.Constant) and kw.value.value is True
                    for kw in call.keywords
                )
                if not safe:
                    found.append(f"{path.relative_to(REPO)}:{call.lineno}")
    assert not found


def test_celery_accepts_json_only() -> None:
    from app.core.celery_app import celery_app

    assert celery_app.conf.accept_content == ["json"]
    assert celery_app.conf.task_serializer == "json" and celery_app.conf.result_serializer == "json"
