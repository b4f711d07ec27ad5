"""BitFit over quantized bases on CPU: bitsandbytes 4-bit (NF4) and 8-bit (LLM.int8), torchao int8 weight-only.

The quantized weights stay frozen and untouched; the deltas train in the compute dtype; merging writes `base bias +
delta` into the (unquantized) bias, so it is exact, and an added bias (`add_missing_bias`) becomes a real bias of the
quantized layer; mixed-task batches, hotswap and save/reload work on top. Each backend is skipped, with the reason,
where it is not installed (`.ci/run` installs both through the `quant` extra).
"""

from __future__ import annotations

import importlib.util
import pathlib
import warnings
from typing import Any

import pytest
import torch
import transformers
from models import PAD, VOCAB, build_model, make_batch
from peft import PeftModel, get_peft_model

import bitfit_peft
from bitfit_peft import BitFitConfig
from bitfit_peft.layer import BitFitLayer

BACKENDS = ("bnb-4bit", "bnb-8bit", "torchao-int8")
# bitsandbytes' CPU 4-bit inference kernel needs out_features % 32 == 0 and in_features >= its 64-wide blocks.
_SIZES = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
ARCHS: dict[str, tuple[str, Any, dict[str, Any]]] = {
    "llama": (
        "AutoModelForCausalLM",
        lambda: transformers.LlamaConfig(**_SIZES, num_key_value_heads=2, pad_token_id=PAD, bos_token_id=1),
        {"task_type": "CAUSAL_LM", "add_missing_bias": True},
    ),
    "bert": (
        "AutoModelForSequenceClassification",
        lambda: transformers.BertConfig(**_SIZES, pad_token_id=PAD, num_labels=3),
        {"task_type": "SEQ_CLS"},
    ),
}


def _missing(backend: str) -> str | None:
    module = "torchao" if backend.startswith("torchao") else "bitsandbytes"
    return (
        None if importlib.util.find_spec(module) else f"{module} is not installed (pip install 'bitfit-peft[quant]')"
    )


@pytest.fixture(autouse=True)
def _one_thread(single_thread: None) -> None:
    """Tiny models: one thread is faster on a shared machine, and keeps reductions in one order."""


@pytest.fixture(scope="module")
def saved_bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    """Each architecture saved once in float32: the quantized bases load from it, as a user's would."""
    root = tmp_path_factory.mktemp("quant_bases")
    out = {}
    for arch, (auto_class, config, _) in ARCHS.items():
        build_model(auto_class, config()).save_pretrained(root / arch)
        out[arch] = root / arch
    return out


def _quantization_config(backend: str) -> Any:
    if backend == "torchao-int8":
        from torchao.quantization import Int8WeightOnlyConfig

        return transformers.TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=["classifier", "lm_head"])
    return transformers.BitsAndBytesConfig(
        load_in_4bit=backend == "bnb-4bit",
        load_in_8bit=backend == "bnb-8bit",
        bnb_4bit_compute_dtype=torch.float32,
        llm_int8_skip_modules=["classifier", "lm_head"],
    )


def load_quantized(saved: dict[str, pathlib.Path], arch: str, backend: str) -> transformers.PreTrainedModel:
    skip = _missing(backend)
    if skip:
        pytest.skip(skip)
    auto_class = ARCHS[arch][0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(transformers, auto_class).from_pretrained(
            saved[arch], quantization_config=_quantization_config(backend), device_map="cpu"
        )
    return model.eval()


def _is_quantized(layer: torch.nn.Module) -> bool:
    weight = layer.weight
    return type(weight) not in (torch.Tensor, torch.nn.Parameter) or not weight.is_floating_point()


def _stored(weight: torch.Tensor) -> torch.Tensor:
    """What a (quantized) weight stores: torchao's int8 data and scales, bitsandbytes' packed bytes, or the floats."""
    qdata = getattr(weight, "qdata", None)
    if qdata is not None:  # torchao Int8Tensor
        return torch.cat([qdata.detach().reshape(-1).float(), weight.scale.detach().reshape(-1).float()])
    return weight.detach().clone()


def _bitfit(arch: str, **kwargs: Any) -> BitFitConfig:
    return BitFitConfig(**{**ARCHS[arch][2], **kwargs})


def _inputs(arch: str, seed: int = 1) -> dict[str, torch.Tensor]:
    return make_batch("decoder" if arch == "llama" else "encoder", ARCHS[arch][1](), seed)


def _labels(arch: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return batch["input_ids"] if arch == "llama" else torch.arange(batch["input_ids"].shape[0]) % 3


def _logits(model: torch.nn.Module, batch: dict[str, torch.Tensor], **kwargs: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch, **kwargs).logits


PAIRS = [(a, b) for a in ARCHS for b in BACKENDS]
IDS = [f"{a}-{b}" for a, b in PAIRS]


@pytest.mark.parametrize(("arch", "backend"), PAIRS, ids=IDS)
def test_bitfit_trains_over_a_frozen_quantized_base(
    saved_bases: dict[str, pathlib.Path], arch: str, backend: str
) -> None:
    model = get_peft_model(load_quantized(saved_bases, arch, backend), _bitfit(arch))
    layers = [m for m in model.modules() if isinstance(m, BitFitLayer)]
    quantized = [m for m in layers if isinstance(m.base_layer, torch.nn.Linear) and _is_quantized(m.base_layer)]
    assert quantized, "the quantized backend left every targeted Linear in float"
    frozen = {n: _stored(p) for n, p in model.named_parameters() if "weight" in n and not p.requires_grad}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    deltas = [n for n in trainable if "bitfit_delta" in n]
    assert deltas and all(n in deltas or "classifier" in n for n in trainable), sorted(trainable)
    # The deltas are in the compute dtype (float32 here), never in the storage dtype of the weights.
    assert {trainable[n].dtype for n in deltas} == {torch.float32}
    batch = _inputs(arch)
    labels = _labels(arch, batch)
    optimizer = torch.optim.AdamW(trainable.values(), lr=3e-2)
    model.train()
    losses = []
    for _ in range(4):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        missing = [n for n in deltas if trainable[n].grad is None]
        assert not missing, f"no gradient through the quantized layers for {missing[:3]}"
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3, losses
    for name, before in frozen.items():
        after = dict(model.named_parameters())[name]
        assert torch.equal(_stored(after), before), f"{name}: a frozen (quantized) weight changed"


def _random_adapters(model: torch.nn.Module, arch: str, names: tuple[str, ...]) -> PeftModel:
    torch.manual_seed(0)
    peft_model = get_peft_model(model, _bitfit(arch, init_weights=False), adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, _bitfit(arch, init_weights=False))
    return peft_model.eval()


@pytest.mark.parametrize(("arch", "backend"), PAIRS, ids=IDS)
def test_merge_into_a_quantized_base_is_exact(saved_bases: dict[str, pathlib.Path], arch: str, backend: str) -> None:
    model = _random_adapters(load_quantized(saved_bases, arch, backend), arch, ("a",))
    batch = _inputs(arch)
    unmerged = _logits(model, batch)
    layers = {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, BitFitLayer)}
    expected, created = {}, set()
    for name, layer in layers.items():
        if layer.base_layer.bias is None:
            created.add(name)
        bias = layer.base_layer.bias
        delta = layer.full_delta("a").detach()
        expected[name] = delta.clone() if bias is None else (bias.detach().to(delta.dtype) + delta)
    weights = {n: m.base_layer.weight for n, m in layers.items()}
    merged = model.merge_and_unload()
    for name, want in expected.items():
        layer = merged.get_submodule(name)
        assert type(layer) is type(layers[name].base_layer), f"{name} was replaced by {type(layer).__name__}"
        assert layer.weight is weights[name], f"{name}: merging touched the (quantized) weight"
        assert layer.bias is not None, f"{name}: the added bias was not created"
        assert torch.equal(layer.bias.detach().to(want.dtype), want), f"{name}: merged bias != base bias + delta"
        assert name not in created or isinstance(layer.bias, torch.nn.Parameter), f"{name}: created bias {layer.bias}"
    assert created if arch == "llama" else not created  # Llama's projections had no bias: merging created them
    # The merged quantized model gives the adapter's outputs (same quantized matmul, bias in its epilogue).
    torch.testing.assert_close(_logits(merged, batch), unmerged, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("arch", "backend"), PAIRS, ids=IDS)
def test_mixed_batch_hotswap_and_reload_over_a_quantized_base(
    saved_bases: dict[str, pathlib.Path], arch: str, backend: str, tmp_path: pathlib.Path
) -> None:
    model = _random_adapters(load_quantized(saved_bases, arch, backend), arch, ("a", "b"))
    # Saved before any forward: on CPU, bitsandbytes repacks 4-bit weights at the first no-grad forward, and a later
    # `state_dict()` (which peft's save_pretrained takes) unpacks them, after which the same model's outputs move by
    # ~1e-2 (bitsandbytes 0.50.2; a plain quantized model without BitFit does the same).
    model.save_pretrained(tmp_path, selected_adapters=["b"])
    batch = _inputs(arch)
    single = {}
    for name in ("a", "b"):
        model.set_adapter(name)
        single[name] = _logits(model, batch)
    with model.disable_adapter():
        single["__base__"] = _logits(model, batch)
    names = ["a", "b", "__base__", "a"][: batch["input_ids"].shape[0]]
    mixed = _logits(model, batch, adapter_names=names)
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], single[name][row], rtol=1e-4, atol=1e-4)
    # Hotswap the saved b into a's slot: a now answers as b did.
    model.set_adapter("a")
    bitfit_peft.hotswap_adapter(model, str(tmp_path / "b"), adapter_name="a")
    torch.testing.assert_close(_logits(model, batch), single["b"], rtol=1e-4, atol=1e-4)
    # And b reloads onto a fresh quantized base with the same outputs, without a fingerprint warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        reloaded = PeftModel.from_pretrained(load_quantized(saved_bases, arch, backend), str(tmp_path / "b"))
    torch.testing.assert_close(_logits(reloaded.eval(), batch), single["b"], rtol=1e-4, atol=1e-4)


def test_delta_of_a_bias_free_4bit_layer_is_in_its_compute_dtype() -> None:
    """No float parameter to copy from: the delta takes Linear4bit's compute dtype, not the uint8 storage's."""
    skip = _missing("bnb-4bit")
    if skip:
        pytest.skip(skip)
    import bitsandbytes as bnb

    base = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.bfloat16).to("cpu")  # .to quantizes
    assert base.weight.dtype == torch.uint8
    layer = BitFitLayer(base, "default")
    assert layer.bitfit_delta["default"].dtype == torch.bfloat16
    assert layer.bitfit_delta["default"].device == layer.base_layer.weight.device
