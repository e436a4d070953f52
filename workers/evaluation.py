"""Evaluation after training (``studio.evaluate``, on the inference queue): the trained model answers the
held-out prompts on this worker's engine (greedy), and its answers are graded against the references:
exact match, ROUGE-L F1 (rouge-score) and corpus BLEU (sacrebleu), and optionally by a judge deployment
against a rubric (each answer scored 1-10). Results go on the experiment's evaluation row and, as a
section of the model card, into its artifacts.

The run's own answers come from its artifacts (its adapter on the base model, or its full model); the
judge's from its deployment, on this worker too.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Sequence
from typing import Any

from app.core.config import get_settings
from app.core.db import session_scope
from app.core.layout import artifact_prefix, read_dataset_rows
from app.core.storage import Storage, get_storage
from app.datasets.references import Reference, held_out_references
from app.models import Dataset, Deployment, EvalSpec, EvaluationStatus, Experiment, ExperimentEvaluation, utcnow
from workers.inference import GenerationRequest
from workers.serving.manager import EngineManager, get_manager

log = logging.getLogger(__name__)
MODEL_CARD = "README.md"
EXAMPLES = 5
JUDGE_PROMPT = (
    "Grade the answer to the request against the reference answer.\n\nRubric: {rubric}\n\nRequest:\n{question}\n\n"
    "Reference answer:\n{reference}\n\nAnswer to grade:\n{answer}\n\n"
    "Reply with one integer from 1 (worst) to 10 (best)."
)
DEFAULT_RUBRIC = "correct and as helpful as the reference"


def run_evaluation(experiment_id: uuid.UUID, worker: str) -> str:
    with session_scope() as session:
        evaluation = session.get(ExperimentEvaluation, experiment_id)
        experiment = session.get(Experiment, experiment_id)
        if evaluation is None or experiment is None or evaluation.status is not EvaluationStatus.queued:
            return "skipped"  # a redelivery, or evaluated since
        dataset = session.get(Dataset, experiment.dataset_id)
        judge = (
            session.get(Deployment, evaluation.spec["judge_deployment"])
            if evaluation.spec.get("judge_deployment")
            else None
        )
        evaluation.status = EvaluationStatus.running
        session.add(evaluation)
        session.commit()
    spec = EvalSpec.model_validate(evaluation.spec)
    storage = get_storage()
    try:
        assert dataset is not None, "the experiment's dataset is gone"
        fraction = experiment.hyperparameters.get("eval_fraction") or dataset.eval_fraction
        references = held_out_references(
            read_dataset_rows(storage, dataset.id), dataset.format, fraction, spec.max_items
        )
        if not references:
            raise ValueError("the dataset has no held-out rows with a reference answer (set an eval fraction)")
        manager = get_manager(get_settings(), worker)
        answers = _answers(manager, experiment, references, spec.max_tokens)
        results = grade(references, answers, spec.metrics)
        if judge is not None:
            results["judge"] = _judge(manager, judge, references, answers, spec.rubric or DEFAULT_RUBRIC)
        _write_model_card(storage, experiment.id, results)
        status, error = EvaluationStatus.succeeded, None
    except Exception as exc:
        log.exception("evaluation of %s failed", experiment_id)
        status, error, results = EvaluationStatus.failed, f"{type(exc).__name__}: {exc}"[:2000], None
    with session_scope() as session:
        row = session.get(ExperimentEvaluation, experiment_id)
        if row is not None:
            row.status, row.error, row.results, row.finished_at = status, error, results, utcnow()
            session.add(row)
            session.commit()
    return status.value


def _answers(manager: EngineManager, experiment: Experiment, references: list[Reference], max_tokens: int) -> list[str]:
    """The run's greedy answers, submitted together so they share the engine's batch."""
    name = str(experiment.id)  # adapter names are ids; the run's own id names its adapter in the cache
    with manager.using(experiment.base_model) as engine:
        adapter_path = manager.adapter_dir(name, artifact_prefix(experiment.id))
        handles = [
            engine.submit(
                GenerationRequest(
                    prompt_ids=_prompt_ids(engine, reference),
                    max_tokens=max_tokens,
                    temperature=0.0,
                    adapter=name,
                    adapter_path=adapter_path,
                )
            )
            for reference in references
        ]
        return [handle.result().text for handle in handles]


def _prompt_ids(engine: Any, reference: Reference) -> list[int]:
    if reference.messages is not None:
        return list(engine.encode_chat(reference.messages))
    return list(engine.encode_prompt(reference.prompt or ""))


def grade(references: list[Reference], answers: list[str], metrics: Sequence[str]) -> dict[str, Any]:
    """Mean exact match and ROUGE-L F1 over items, corpus BLEU, and the first few examples."""
    truths = [r.answer.strip() for r in references]
    outputs = [a.strip() for a in answers]
    scores: dict[str, float] = {}
    if "exact_match" in metrics:
        scores["exact_match"] = sum(o == t for o, t in zip(outputs, truths, strict=True)) / len(truths)
    if "rouge_l" in metrics:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL"])
        pairs = zip(truths, outputs, strict=True)
        scores["rouge_l"] = sum(scorer.score(t, o)["rougeL"].fmeasure for t, o in pairs) / len(truths)
    if "bleu" in metrics:
        import sacrebleu

        scores["bleu"] = sacrebleu.corpus_bleu(outputs, [truths]).score
    examples = [
        {"row": r.row, "question": r.question[:500], "reference": r.answer[:500], "answer": a[:500]}
        for r, a in list(zip(references, answers, strict=True))[:EXAMPLES]
    ]
    return {"metrics": {k: round(v, 4) for k, v in scores.items()}, "items": len(references), "examples": examples}


def _judge(
    manager: EngineManager, judge: Deployment, references: list[Reference], answers: list[str], rubric: str
) -> dict[str, Any]:
    """Each answer graded 1-10 by the judge deployment (greedy); unparseable verdicts are counted apart."""
    adapter = str(judge.id) if judge.adapter_prefix else None
    with manager.using(judge.base_model) as engine:
        path = manager.adapter_dir(str(judge.id), judge.adapter_prefix) if judge.adapter_prefix else None
        prompts = [
            JUDGE_PROMPT.format(rubric=rubric, question=r.question, reference=r.answer, answer=a)
            for r, a in zip(references, answers, strict=True)
        ]
        handles = [
            engine.submit(
                GenerationRequest(
                    prompt_ids=list(engine.encode_chat([{"role": "user", "content": p}])),
                    max_tokens=4,
                    temperature=0.0,
                    adapter=adapter,
                    adapter_path=path,
                )
            )
            for p in prompts
        ]
        verdicts = [_grade(h.result().text) for h in handles]
    graded = [v for v in verdicts if v is not None]
    return {
        "deployment": str(judge.id),
        "model": judge.name,
        "rubric": rubric,
        "mean_score": round(sum(graded) / len(graded), 3) if graded else None,
        "graded": len(graded),
        "ungraded": len(verdicts) - len(graded),
    }


def _grade(text: str) -> int | None:
    match = re.search(r"\b(10|[1-9])\b", text)
    return int(match.group(1)) if match else None


def _write_model_card(storage: Storage, experiment_id: uuid.UUID, results: dict[str, Any]) -> None:
    """Add the evaluation to the model card (README.md) and store it as evaluation.json beside it."""
    prefix = artifact_prefix(experiment_id)
    card = ""
    if storage.exists(f"{prefix}/{MODEL_CARD}"):
        with storage.open(f"{prefix}/{MODEL_CARD}") as f:
            card = f.read().decode("utf-8")
    card = card.split("\n## Evaluation\n")[0].rstrip() + "\n\n" + evaluation_section(results)
    storage.put_bytes(f"{prefix}/{MODEL_CARD}", card.encode())
    storage.put_bytes(f"{prefix}/evaluation.json", json.dumps(results, indent=2).encode())


def evaluation_section(results: dict[str, Any]) -> str:
    lines = ["## Evaluation", "", f"On {results['items']} held-out rows of the training dataset (greedy answers).", ""]
    lines += ["| metric | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in results["metrics"].items()]
    if judge := results.get("judge"):
        lines += [f"| judge ({judge['model']}) mean score, 1-10 | {judge['mean_score']} |"]
    return "\n".join(lines) + "\n"
