"""Gathered per-row LoRA (BGMV) against peft, and static KV slot writes (issue 13 building blocks)."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model

from workers.inference.static.lora import StackedLora
from workers.inference.static.slots import KvSlots, write_step

# float32 on CPU: both paths do the same arithmetic in a different order.
ATOL = 1e-5


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(16, 12, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _peft_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = get_peft_model(_Tiny(), LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], init_lora_weights=False))
    model.add_adapter("b", LoraConfig(r=2, lora_alpha=6, target_modules=["proj"], init_lora_weights=False))
    return model.eval()


def test_gathered_delta_matches_peft_per_row() -> None:
    model = _peft_model()
    layer = model.base_model.model.proj
    stacked = StackedLora(slots=4, in_features=16, out_features=12, max_rank=4, dtype=torch.float32)
    for slot, name in ((1, "default"), (2, "b")):
        stacked.load(slot, layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name])
    x = torch.randn(5, 3, 16)
    names = ["default", "__base__", "b", "default", "b"]
    ids = torch.tensor([1, 0, 2, 1, 2])
    with torch.no_grad():
        expected = model(x, adapter_names=names)
        got = layer.base_layer(x) + stacked.delta(x, ids)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_gathered_delta_compiles_without_graph_break() -> None:
    stacked = StackedLora(slots=3, in_features=8, out_features=8, max_rank=2, dtype=torch.float32)
    stacked.load(1, torch.randn(2, 8), torch.randn(8, 2), 0.5)
    compiled = torch.compile(stacked.delta, fullgraph=True, backend="eager")
    x = torch.randn(4, 1, 8)
    ids = torch.tensor([0, 1, 1, 0])
    torch.testing.assert_close(compiled(x, ids), stacked.delta(x, ids))


def test_slots_write_in_place_at_row_positions() -> None:
    slots = KvSlots(layers=2, rows=3, kv_heads=2, max_len=5, head_dim=4, dtype=torch.float32)
    storage = slots.kv.data_ptr()
    rows = torch.tensor([slots.acquire(), slots.acquire()])
    keys, values = torch.randn(2, 2, 4), torch.randn(2, 2, 4)
    write_step(slots.kv, 1, rows, torch.tensor([3, 0]), keys, values)
    assert slots.kv.data_ptr() == storage
    torch.testing.assert_close(slots.kv[1, 0, rows[0], :, 3], keys[0])
    torch.testing.assert_close(slots.kv[1, 1, rows[1], :, 0], values[1])
    assert slots.kv[0].abs().sum() == 0
    slots.release(int(rows[0]))
    assert slots.free_count == 2
