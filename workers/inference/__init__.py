"""Batched text generation for the inference worker: one base model, LoRA adapters, continuous batching.

Pure torch/transformers/peft (no Celery, no database): `InferenceEngine` is what a worker process holds.
"""

from workers.inference.adapters import (
    AdapterCapacityFull,
    AdapterError,
    AdapterInUse,
    AdapterMismatch,
    AdapterNotLoaded,
)
from workers.inference.engine import InferenceEngine, StepInfo
from workers.inference.handle import GenerationHandle
from workers.inference.request import (
    EngineClosed,
    GenerationError,
    GenerationRequest,
    GenerationResult,
    PromptTooLong,
    ScoreResult,
)

__all__ = [
    "AdapterCapacityFull",
    "AdapterError",
    "AdapterInUse",
    "AdapterMismatch",
    "AdapterNotLoaded",
    "EngineClosed",
    "GenerationError",
    "GenerationHandle",
    "GenerationRequest",
    "GenerationResult",
    "InferenceEngine",
    "PromptTooLong",
    "ScoreResult",
    "StepInfo",
]
