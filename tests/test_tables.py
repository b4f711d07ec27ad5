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
from bitfit_peft.routing import MixedBatch, Routing, check_names, route_heads
from bitfit_peft.serving import TaskStore
from bitfit_peft.serving.model import wrap_layers
from bitfit_peft.serving.tables import Tables
from bitfit_peft.tables import GROWTH, LayerTable

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


def test_route_heads_pads_token_level_heads_and_routes_extra_arguments() -> None:
    """Heads of a token-classification shape (rows, tokens, labels) pad on the label axis; extra positional and
    keyword tensors with a row per example are split with the rows, anything else is passed as it is."""

    class Head(torch.nn.Module):
        def __init__(self, labels: int) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(3, labels)

        def forward(self, x: torch.Tensor, mask: torch.Tensor, *, bias: torch.Tensor, scale: float) -> torch.Tensor:
            return self.proj(x) * mask[..., None] * scale + bias[:, None, :1]

    routing = Routing(slots={"a": 1, "b": 2})
    mixed = MixedBatch(["a", "b", "__base__", "a"], routing)
    heads = {"a": Head(2), "b": Head(4)}
    base = Head(2)
    x, mask, bias = torch.randn(4, 5, 3), torch.rand(4, 5), torch.randn(4, 1)
    with torch.no_grad():
        out = route_heads(mixed, heads, base, x, (mask,), {"bias": bias, "scale": 2.0}, pad=True)
        assert out.shape == (4, 5, 4) and not out[[0, 2, 3], :, 2:].any()
        for i, head in zip(range(4), (heads["a"], heads["b"], base, heads["a"]), strict=True):
            alone = head(x[i : i + 1], mask[i : i + 1], bias=bias[i : i + 1], scale=2.0)[0]
            assert torch.equal(out[i, :, : alone.shape[-1]], alone)


def test_route_heads_refuses_a_head_that_returns_no_tensor() -> None:
    class PairHead(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x, x

    mixed = MixedBatch(["a", "__base__"], Routing(slots={"a": 1}))
    with pytest.raises(TypeError, match="PairHead returned tuple. Group the batch by task"):
        route_heads(mixed, {"a": PairHead()}, PairHead(), torch.ones(2, 3))


def test_mixed_batch_rows_per_example_beams_and_flattened_tokens() -> None:
    """Rows are batch-major: each example's beams, and (for layers that flatten them, `rows_for`) its tokens; a
    task head (`names_for`) never sees flattened tokens."""
    mixed = MixedBatch(["a", "__base__"], Routing(slots={"a": 1}), beams=2, tokens=3)
    assert mixed.rows_for(2 * 2 * 3, CPU).tolist() == [1] * 6 + [0] * 6
    assert mixed.rows_for(2 * 3, CPU).tolist() == [1] * 3 + [0] * 3
    assert mixed.rows_for(4, CPU) is mixed.rows_for(4, CPU)  # computed once per call and shape
    assert mixed.names_for(4) == ["a", "a", "__base__", "__base__"]
    with pytest.raises(
        ValueError, match="2 entries but a layer received a batch of 6 rows. Pass one adapter name per"
    ):
        mixed.names_for(6)
    with pytest.raises(ValueError, match="name per example, with the batch in dimension 0 of the inputs"):
        mixed.rows_for(5, CPU)


def test_check_names_lists_at_most_ten_resident_adapters() -> None:
    with pytest.raises(TypeError, match="got str"):
        check_names("a", {"a": 1})
    for resident, listed in ((10, ""), (11, " ..."), (12, " ...")):
        known = {f"t{i:02d}": i for i in range(resident)}
        with pytest.raises(ValueError) as info:
            check_names(["t00", "nope"], known)
        shown = str([f"t{i:02d}" for i in range(10)])
        assert f"Resident adapters ({resident}): {shown}{listed}; use" in str(info.value)
    assert check_names(("t00", "__base__"), {"t00": 0}) == ["t00", "__base__"]


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


def test_serving_tables_number_slots_reuse_freed_ones_and_grow_every_lookup() -> None:
    """The store's `Tables`: one slot per task on every layer, slot numbers reused after a remove, every layer's
    lookup grown when the slots run out, and a replacement that no longer touches a layer leaves no row there."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 2))
    layers = wrap_layers(model, ["0", "1"])
    routing = Routing(slots={})
    tables = Tables(layers, routing, torch.float64, capacity=0)
    assert tables.capacity == 1

    def rows(key: str, slots: list[int]) -> list[list[float]]:
        return routing.tables[layers[key]].gather(torch.tensor(slots)).tolist()

    tables.put("a", {"0": torch.full((3,), 1.0), "1": torch.full((2,), 2.0)})
    tables.put("b", {"0": torch.full((3,), 3.0), "1": torch.full((2,), 7.0)})  # slot 2 > capacity 1: lookups grow
    assert routing.slots == {"a": 1, "b": 2} and tables.capacity == max(2, int(1 * GROWTH) + 1)
    assert all(t.table.dtype == torch.float64 for t in routing.tables.values())
    assert rows("0", [0, 1, 2]) == [[0] * 3, [1] * 3, [3] * 3] and rows("1", [0, 1, 2]) == [[0] * 2, [2] * 2, [7] * 2]
    tables.put("a", {"0": torch.full((3,), 4.0)})  # a replacement that no longer touches layer 1
    assert routing.slots["a"] == 1 and rows("0", [1]) == [[4] * 3] and rows("1", [1, 2]) == [[0] * 2, [7] * 2]
    assert "a" not in routing.tables[layers["1"]].rows
    tables.remove("a")
    assert routing.slots == {"b": 2} and rows("0", [1, 2]) == [[0] * 3, [3] * 3]
    tables.put("c", {"1": torch.full((2,), 5.0)})  # takes the freed slot 1 (and the freed row 1 of layer 1)
    tables.put("d", {"1": torch.full((2,), 6.0)})  # then a new slot, 3, in row 3 of layer 1
    assert routing.slots == {"b": 2, "c": 1, "d": 3} and rows("1", [1, 2, 3]) == [[5] * 2, [7] * 2, [6] * 2]
    assert tables.nbytes() == sum(entry.nbytes() for entry in routing.tables.values()) > 0

    big = Tables(layers, Routing(slots={}), torch.float32, capacity=8)
    for i in range(9):  # the ninth slot grows the capacity by a quarter, plus one
        big.put(f"t{i}", {"0": torch.full((3,), float(i))})
    assert big.capacity == int(8 * GROWTH) + 1 == 11
    assert big.routing.tables[layers["0"]].lookup.shape[0] == 12  # type: ignore[union-attr]
