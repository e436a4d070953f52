"""The static decode path: KV slots (`slots.py`), stacked per-row LoRA (`lora.py`), a functional Llama-family
decode forward (`llama.py`), and `decoder.py`, which the engine's scheduler
drives instead of `runner.ModelRunner` when `decode` is "static" or "compiled" (docs/architecture.md, "Decode
path")."""
