"""`LayerTable`, the one per-layer delta table: its write rules, and that both owners (the peft-model router and the
serving store) build exactly this type, so a mixed call reads the same thing whichever built it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from models import CASES
from peft import get_peft_model
from serving_helpers import save_adapter, save_base

from bitfit_peft import BitFitConfig
from bitfit_peft.routing import MixedBatch, Routing, route_heads
from bitfit_peft.serving import TaskStore
from bitfit_peft.tables import LayerTable

CPU = torch.device("cpu")


def test_put_clear_reuse_grow_gather() -> None:
    t = LayerTable.empty((2,), torch.float32, CPU, slots=2)
    assert t.put("a", 2, torch.tensor([1.0, 2.0])) == 1  # row 0 stays zeros
    assert t.put("b", 1, torch.tensor([3.0, 4.0])) == 2
    assert t.gather(torch.tensor([0, 1, 2, 1])).tolist() == [[0, 0], [3, 4], [1, 2], [3, 4]]
    assert t.put("a", 2, torch.tensor([5.0, 6.0])) == 1  # a replacement keeps its row
    t.clear("a", 2)
    assert t.gather(torch.tensor([2])).tolist() == [[0, 0]] and t.table[1].tolist() == [0, 0]
    t.grow_slots(3)
    assert t.put("c", 3, torch.tensor([7.0, 8.0], dtype=torch.float64)) == 1  # the freed row is reused
    assert t.table.dtype == torch.float32 and t.gather(torch.tensor([3, 1])).tolist() == [[7, 8], [3, 4]]
    t.put("d", 2, torch.ones(2))  # the table is full (3 rows): it grows, the rows it held keep their values
    assert t.table.shape[0] > 3 and t.gather(torch.tensor([3, 1, 2])).tolist() == [[7, 8], [3, 4], [1, 1]]
    t.reserve(10)
    assert t.table.shape[0] == t.next_row + 10
    assert t.nbytes() == t.table.numel() * 4 + t.lookup.numel() * 8  # type: ignore[union-attr]


def test_a_table_without_lookup_numbers_rows_by_slot() -> None:
    t = LayerTable.empty((1,), torch.float32, CPU, rows=3)
    t.put("a", 1, torch.ones(1))
    assert t.gather(torch.tensor([1, 0])).tolist() == [[1], [0]]
    with pytest.raises(RuntimeError, match="row 2, slot 1"):
        t.put("b", 1, torch.ones(1))


def test_route_heads_pads_only_when_asked() -> None:
    routing = Routing(slots={"a": 1, "b": 2})
    mixed = MixedBatch(["a", "b", "__base__", "a"], routing)
    heads = {"a": torch.nn.Linear(3, 2), "b": torch.nn.Linear(3, 4)}
    base = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3)
    with torch.no_grad():
        out = route_heads(mixed, heads, base, x, pad=True)
        assert out.shape == (4, 4) and torch.equal(out[1], heads["b"](x[1:2])[0])
        assert torch.equal(out[[0, 3], :2], heads["a"](x[[0, 3]])) and not out[[0, 2, 3], 2:].any()
        assert torch.equal(out[2, :2], base(x[2:3])[0])
        with pytest.raises(RuntimeError):
            route_heads(mixed, heads, base, x)  # without pad, widths must agree


def test_the_router_and_the_store_build_the_same_table_type(tmp_path: Path) -> None:
    case = next(c for c in CASES if c.name == "bert")
    model = get_peft_model(case.build(), BitFitConfig(task_type="SEQ_CLS", init_weights=False))
    model.add_adapter("b", BitFitConfig(task_type="SEQ_CLS", init_weights=False))
    model.eval()
    model(**case.batch(), adapter_names=["b", "default", "__base__", "b"])
    tables = model.base_model.router.routing.tables  # type: ignore[union-attr]
    assert tables and all(type(t) is LayerTable and t.lookup is None for t in tables.values())
    base = save_base(tmp_path / "base", "bert")
    save_adapter(base, tmp_path / "adapters" / "t", num_labels=2, seed=0)
    store = TaskStore.open(str(base), str(tmp_path / "adapters"))
    assert store.routing.tables and all(type(t) is LayerTable for t in store.routing.tables.values())
