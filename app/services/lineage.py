"""Lineage: what a run is made of, recorded when it is submitted, and the graph around it.

Recorded on the experiment at submit: the dataset version (id, content hash, parent version, origin),
the recipe, and a fingerprint of the base model (a local directory's config and weight files; a Hub id
as named). The worker that trains the run adds its library versions. The graph follows the links the
rows already hold: run → dataset → the versions it was curated from → the A/B test whose votes made it
→ the deployments (and their runs) that test compared; run → the run it was cloned from; run → its
deployments.
"""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path
from typing import Any

from sqlmodel import Session, select

from app.models import (
    AbTest,
    Dataset,
    Deployment,
    Experiment,
    Lineage,
    LineageEdge,
    LineageNode,
)

MAX_DEPTH = 20  # dataset versions and clones followed back
FINGERPRINT_BYTES = 1 << 20  # of each weight file: with its size, enough to tell weight files apart


def base_model_fingerprint(base_model: str) -> dict[str, Any]:
    """A local model directory: sha256 over its config.json and, per weight file, name, size and first MB
    (hashing whole multi-GB files at every submit would be slow). A Hub id: its name (the worker resolves
    the revision)."""
    path = Path(base_model)
    if not (path / "config.json").is_file():
        return {"name": base_model, "source": "hub"}
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for weights in sorted([*path.glob("*.safetensors"), *path.glob("*.bin")]):
        digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
        with weights.open("rb") as f:
            digest.update(f.read(FINGERPRINT_BYTES))
    return {"name": base_model, "source": "local", "fingerprint": digest.hexdigest()}


def submit_lineage(
    dataset: Dataset, *, recipe: str | None, base_model: str, parent: Experiment | None
) -> dict[str, Any]:
    return {
        "dataset": {
            "id": str(dataset.id),
            "name": dataset.name,
            "content_hash": dataset.content_hash,
            "format": dataset.format.value,
            "rows": dataset.row_count,
            "parent_id": str(dataset.parent_id) if dataset.parent_id else None,
            "origin": dataset.origin,
        },
        "recipe": recipe,
        "base_model": base_model_fingerprint(base_model),
        "parent_experiment_id": str(parent.id) if parent else None,
    }


def lineage_graph(session: Session, experiment: Experiment) -> Lineage:
    nodes: dict[str, LineageNode] = {}
    edges: list[LineageEdge] = []

    def node(kind: str, id_: Any, label: str, **data: Any) -> str:
        key = f"{kind}:{id_}"
        nodes.setdefault(key, LineageNode(id=key, kind=kind, label=label, data=data))
        return key

    def edge(source: str, target: str, relation: str) -> None:
        if not any(e.source == source and e.target == target and e.relation == relation for e in edges):
            edges.append(LineageEdge(source=source, target=target, relation=relation))

    def run(e: Experiment) -> str:
        return node("experiment", e.id, e.name, status=e.status.value, lineage=e.lineage or {})

    current: Experiment | None = experiment
    for _ in range(MAX_DEPTH):  # the run and the runs it was cloned from
        assert current is not None
        me = run(current)
        base = node("base_model", current.base_model, current.base_model)
        edge(me, base, "fine_tunes")
        _dataset_chain(session, current, me, node, edge, run)
        for deployment in session.exec(select(Deployment).where(Deployment.experiment_id == current.id)):
            edge(me, node("deployment", deployment.id, deployment.name, status=deployment.status.value), "deployed_as")
        parent = session.get(Experiment, current.parent_experiment_id) if current.parent_experiment_id else None
        if parent is None or parent.team_id != experiment.team_id:
            break
        edge(me, run(parent), "cloned_from")
        current = parent
    return Lineage(experiment_id=experiment.id, nodes=list(nodes.values()), edges=edges)


def _dataset_chain(session: Session, experiment: Experiment, me: str, node: Any, edge: Any, run: Any) -> None:
    dataset = session.get(Dataset, experiment.dataset_id)
    if dataset is None:
        return
    previous = me
    relation = "trained_on"
    for _ in range(MAX_DEPTH):
        key = node("dataset", dataset.id, dataset.name, content_hash=dataset.content_hash, rows=dataset.row_count)
        edge(previous, key, relation)
        origin = dataset.origin or {}
        if test_id := origin.get("ab_test"):
            test = session.get(AbTest, uuid.UUID(test_id))
            if test is not None and test.team_id == experiment.team_id:
                test_key = node("ab_test", test.id, test.name)
                edge(key, test_key, "votes_of")
                for deployment_id in (test.deployment_a, test.deployment_b):
                    deployment = session.get(Deployment, deployment_id)
                    if deployment is None:
                        continue
                    deployed = node("deployment", deployment.id, deployment.name, status=deployment.status.value)
                    edge(test_key, deployed, "compared")
                    served = session.get(Experiment, deployment.experiment_id) if deployment.experiment_id else None
                    if served is not None:
                        edge(run(served), deployed, "deployed_as")
        parent = session.get(Dataset, dataset.parent_id) if dataset.parent_id else None
        if parent is None or parent.team_id != experiment.team_id:
            return
        previous, relation, dataset = key, "derived_from", parent
