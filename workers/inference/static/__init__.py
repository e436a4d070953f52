"""Fixed-shape decode path: static KV slots (`slots.py`) and gathered per-row LoRA (`lora.py`).

Only these building blocks exist so far, each tested against the eager path; the engine does not use
them yet (docs/architecture.md, "Decode path").
"""
