"""`layer_types.register_layer_type`: one entry makes a new layer type trainable everywhere (targets, the layer's
features and bias op, mixed batches), and the parents a type must not be wrapped under come from its entry."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn

from bitfit_peft import BitFitConfig, BitFitLayer, layer_types
from bitfit_peft.layer_types import LayerType, register_layer_type, unregister_layer_type


class Scale(nn.Module):
    """y = x * w + b, a layer type BitFit does not know."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, n))
        self.bias = nn.Parameter(torch.zeros(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight + self.bias


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.scale = Scale(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.scale(self.attn(x, x, x, need_weights=False)[0]))


def test_a_registered_layer_type_is_trained_folded_and_routed() -> None:
    folds: list[int] = []

    def fold(m: Scale, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        folds.append(1)
        return x * m.weight + b

    register_layer_type(LayerType(Scale, fold, lambda m: tuple(m.bias.shape), lambda m: (4, 4)))
    try:
        torch.manual_seed(0)
        net = Net().eval()
        x = torch.randn(3, 5, 4)
        base = net(x).detach()
        config = BitFitConfig(target_modules=["scale", "fc", "out_proj"], init_weights=False)
        model = get_peft_model(net, config).eval()
        layer = model.base_model.model.scale
        assert isinstance(layer, BitFitLayer) and (layer.in_features, layer.out_features) == (4, 4)
        # MultiheadAttention reads out_proj's weight directly: the Linear entry keeps it unwrapped
        assert not isinstance(model.base_model.model.attn.out_proj, BitFitLayer)
        with torch.no_grad():
            out = model(x)
            assert folds and not torch.allclose(out, base)
            delta = layer.bitfit_delta["default"]
            fc = model.base_model.model.fc
            want = nn.functional.linear(
                Scale.forward(net.scale, net.attn(x, x, x, need_weights=False)[0]) + delta,
                fc.base_layer.weight,
                fc.base_layer.bias + fc.bitfit_delta["default"],
            )
            assert torch.allclose(out, want, atol=1e-6)
            mixed = model(x, adapter_names=["default", "__base__", "default"])
            assert torch.allclose(mixed[[0, 2]], out[[0, 2]], atol=1e-6)
            assert torch.allclose(mixed[1], base[1], atol=1e-6)
        # the error for a selection that finds nothing lists candidates of every registered type
        with pytest.raises(ValueError, match=r"Modules with a bias include \[.*'scale'"):
            get_peft_model(Net(), BitFitConfig(target_modules=["nothing"]))
    finally:
        unregister_layer_type(Scale)
    assert Scale not in layer_types.SUPPORTED_TYPES
