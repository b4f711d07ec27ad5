"""Property tests over shapes: a plain module of Linear / LayerNorm / Conv1d layers adapted with `target_modules=`.

Hypothesis draws the layer widths, kernel size, whether the last Linear has a bias (`add_missing_bias` covers it
when not), batch size, sequence length and number of adapters; the parity properties must hold for all of them.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import PeftModel, get_peft_model
from torch import nn

from bitfit_peft import BitFitConfig, BitFitLayer

pytestmark = pytest.mark.usefixtures("single_thread")
TARGETS = ["lin1", "norm", "conv", "lin2"]
TOL = dict(atol=1e-5, rtol=1e-4)
SETTINGS = settings(max_examples=20, deadline=None)


class Net(nn.Module):
    def __init__(self, d_in: int, d_hid: int, d_out: int, kernel: int, bias2: bool) -> None:
        super().__init__()
        self.lin1 = nn.Linear(d_in, d_hid)
        self.norm = nn.LayerNorm(d_hid)
        self.conv = nn.Conv1d(d_hid, d_hid, kernel, padding=kernel // 2)
        self.lin2 = nn.Linear(d_hid, d_out, bias=bias2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm(self.lin1(x)))
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)  # Conv1d works on (batch, channels, length)
        return self.lin2(h)


@st.composite
def shapes(draw: st.DrawFn) -> dict:
    return dict(
        d_in=draw(st.integers(1, 12)),
        d_hid=draw(st.integers(1, 12)),
        d_out=draw(st.integers(1, 12)),
        kernel=draw(st.sampled_from([1, 3])),
        bias2=draw(st.booleans()),
        batch=draw(st.integers(1, 5)),
        seq=draw(st.integers(1, 6)),
        seed=draw(st.integers(0, 2**16)),
    )


def build(s: dict, frozen: bool = True) -> Net:
    """The seeded module; references come frozen like a base inside peft (see `models.build_model` for why)."""
    torch.manual_seed(s["seed"])
    return Net(s["d_in"], s["d_hid"], s["d_out"], s["kernel"], s["bias2"]).requires_grad_(not frozen).eval()


def inputs(s: dict) -> torch.Tensor:
    return torch.randn(s["batch"], s["seq"], s["d_in"], generator=torch.Generator().manual_seed(s["seed"] + 1))


def config(s: dict, **kwargs: object) -> BitFitConfig:
    return BitFitConfig(target_modules=TARGETS, add_missing_bias=not s["bias2"], **kwargs)


def adapted(s: dict, n_adapters: int = 1) -> PeftModel:
    torch.manual_seed(s["seed"] + 2)
    model = get_peft_model(build(s, frozen=False), config(s, init_weights=False), adapter_name="a0")
    for i in range(1, n_adapters):
        model.add_adapter(f"a{i}", config(s, init_weights=False))
    return model.eval()


def run(model: nn.Module, x: torch.Tensor, **kwargs: object) -> torch.Tensor:
    with torch.no_grad():
        return model(x, **kwargs)


@SETTINGS
@given(shapes())
def test_fresh_adapter_equals_base(s: dict) -> None:
    x = inputs(s)
    model = get_peft_model(build(s, frozen=False), config(s))
    assert sum(isinstance(m, BitFitLayer) for m in model.modules()) == len(TARGETS)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"base_model.model.{t}.bitfit_delta.default" for t in TARGETS
    }
    assert torch.equal(run(model, x), run(build(s), x))


@SETTINGS
@given(shapes())
def test_merged_equals_unmerged_and_unmerge_restores_biases(s: dict) -> None:
    x = inputs(s)
    model = adapted(s)
    layers = [m for m in model.modules() if isinstance(m, BitFitLayer)]
    originals = [None if m.get_base_layer().bias is None else m.get_base_layer().bias.detach().clone() for m in layers]
    unmerged = run(model, x)
    model.merge_adapter()
    torch.testing.assert_close(run(model, x), unmerged, **TOL)
    model.unmerge_adapter()
    for layer, original in zip(layers, originals, strict=True):
        bias = layer.get_base_layer().bias
        if original is None:
            assert bias is None or torch.count_nonzero(bias) == 0
        else:
            assert torch.equal(bias, original)
    torch.testing.assert_close(run(model, x), unmerged, **TOL)


@SETTINGS
@given(shapes(), st.integers(1, 3), st.data())
def test_mixed_batch_equals_per_example(s: dict, n_adapters: int, data: st.DataObject) -> None:
    x = inputs(s)
    model = adapted(s, n_adapters)
    choices = [f"a{i}" for i in range(n_adapters)] + ["__base__"]
    names = data.draw(st.lists(st.sampled_from(choices), min_size=s["batch"], max_size=s["batch"]))
    mixed = run(model, x, adapter_names=names)
    for i, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                expected = run(model, x[i : i + 1])
        else:
            model.set_adapter(name)
            expected = run(model, x[i : i + 1])
        torch.testing.assert_close(mixed[i : i + 1], expected, **TOL)


@SETTINGS
@given(shapes(), st.integers(1, 3))
def test_save_load_round_trip(s: dict, n_adapters: int) -> None:
    x = inputs(s)
    model = adapted(s, n_adapters)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        reloaded = PeftModel.from_pretrained(build(s), Path(tmp) / "a0", adapter_name="a0").eval()
        for i in range(1, n_adapters):
            reloaded.load_adapter(str(Path(tmp) / f"a{i}"), adapter_name=f"a{i}")
        for i in range(n_adapters):
            model.set_adapter(f"a{i}")
            reloaded.set_adapter(f"a{i}")
            assert torch.equal(run(reloaded, x), run(model, x))
