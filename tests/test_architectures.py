"""Every BitFit behaviour on every architecture of `tests/models.py` (a table of cases x a set of behaviours).

Parity is checked against the plain transformers model wherever the contract promises it: a fresh adapter and a
disabled adapter give the base outputs bit for bit, a reloaded adapter (in a fresh process) gives the saved one's
outputs bit for bit, merged == unmerged within float rounding, and a mixed batch == one example at a time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from models import CASES_BY_NAME, PAD, TERMS, Case, expected_targets, head_param_count
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper
from safetensors import safe_open
from transformers import BertConfig, BertModel

from bitfit_peft import BitFitConfig, BitFitLayer

pytestmark = pytest.mark.usefixtures("single_thread")
REPO = Path(__file__).resolve().parents[1]
PREFIX = "base_model.model."
ADAPTER_FILE = "adapter_model.safetensors"
# Batched vs one-row matmuls and merged vs unmerged biases may differ in the last bits, nothing more.
TOL = dict(atol=1e-5, rtol=1e-4)


# --- helpers ----------------------------------------------------------------------------------------------------------


def bitfit_config(case: Case, **kwargs: Any) -> BitFitConfig:
    return BitFitConfig(task_type=case.task_type, **{**case.bitfit_kwargs, **kwargs})


def make_peft(case: Case, adapter: str = "default", dtype: torch.dtype | None = None, **kwargs: Any) -> PeftModel:
    torch.manual_seed(1234)  # init_weights=False draws deltas from the global RNG
    base = case.build(dtype, frozen=False)  # trainable, as users pass it: freezing is peft's and BitFit's job
    return get_peft_model(base, bitfit_config(case, **kwargs), adapter_name=adapter).eval()


def logits(result: Any) -> torch.Tensor:
    """`.logits`, or start and end logits stacked (question answering)."""
    if "logits" in result:
        return result.logits
    return torch.stack([result.start_logits, result.end_logits], dim=-1)


def out(model: torch.nn.Module, batch: dict[str, torch.Tensor], **kwargs: Any) -> torch.Tensor:
    with torch.no_grad():
        return logits(model(**batch, **kwargs))


def rows(batch: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    return {k: v[i : i + 1] for k, v in batch.items()}


def perturb_head(model: PeftModel, adapter: str, seed: int) -> None:
    """Give the adapter's copy of the task head its own weights, so head routing is observable."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f".modules_to_save.{adapter}." in name:
                p.add_(0.5 * torch.randn(p.shape, generator=g).to(p.dtype))


def deltas(model: torch.nn.Module, adapter: str = "default") -> dict[str, torch.nn.Parameter]:
    """Targeted module name (in the base model) -> its delta parameter."""
    suffix = f".bitfit_delta.{adapter}"
    return {n[len(PREFIX) : -len(suffix)]: p for n, p in model.named_parameters() if n.endswith(suffix)}


def bitfit_layers(model: torch.nn.Module) -> dict[str, BitFitLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, BitFitLayer)}


def base_bias(layer: BitFitLayer) -> torch.Tensor | None:
    return layer.get_base_layer().bias


def train_step(model: PeftModel, batch: dict[str, torch.Tensor]) -> None:
    model.train()
    loss = logits(model(**batch)).float().pow(2).mean()
    loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()
    model.eval()


def safetensors_payload(path: Path) -> dict[str, tuple[str, tuple[int, ...], int]]:
    """Tensor name -> (dtype, shape, bytes), read from the safetensors header."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    header.pop("__metadata__", None)
    return {k: (v["dtype"], tuple(v["shape"]), v["data_offsets"][1] - v["data_offsets"][0]) for k, v in header.items()}


# --- fresh adapter, trainable parameters, training --------------------------------------------------------------------


def test_fresh_adapter_equals_base_bitwise(arch_case: Case) -> None:
    batch = arch_case.batch()
    expected = out(arch_case.build(), batch)
    model = make_peft(arch_case)
    assert deltas(model), "no delta was created"
    assert all(torch.count_nonzero(d) == 0 for d in deltas(model).values())
    assert torch.equal(out(model, batch), expected)


def test_trainable_params_are_exactly_deltas_and_head(arch_case: Case) -> None:
    base = arch_case.build(frozen=False)
    expected = expected_targets(base, arch_case)
    bias_shapes = {
        n: tuple(base.get_submodule(n).bias.shape) for n in expected if base.get_submodule(n).bias is not None
    }
    n_head = head_param_count(base, arch_case)
    model = get_peft_model(base, bitfit_config(arch_case))

    found = deltas(model)
    assert {n: p.numel() for n, p in found.items()} == expected
    assert all(tuple(found[n].shape) == shape for n, shape in bias_shapes.items())
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    head = {n: p for n, p in trainable.items() if ".bitfit_delta." not in n}
    assert all(".modules_to_save.default." in n for n in head), sorted(head)
    assert sum(p.numel() for p in head.values()) == n_head
    n_trainable = sum(p.numel() for p in trainable.values())
    assert n_trainable == sum(expected.values()) + n_head
    assert model.get_nb_trainable_parameters()[0] == n_trainable


def test_optimizer_step_changes_only_deltas_and_head(arch_case: Case) -> None:
    batch = arch_case.batch()
    base_out = out(arch_case.build(), batch)
    model = make_peft(arch_case)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_step(model, batch)

    params = dict(model.named_parameters())
    frozen = {n for n, p in params.items() if not p.requires_grad}
    assert all(params[n].grad is None for n in frozen)
    assert not [n for n in frozen if not torch.equal(params[n], before[n])], "a frozen base parameter was written"
    changed = {n for n, p in params.items() if not torch.equal(p, before[n])}
    assert any(".bitfit_delta.default" in n for n in changed)
    if arch_case.head:
        assert any(".modules_to_save.default." in n for n in changed)
    assert not torch.equal(out(model, batch), base_out), "trained deltas have no effect on the output"


# --- save / load in a fresh process -----------------------------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import json, sys, traceback
    import torch, transformers
    import bitfit_peft  # registers BITFIT with peft
    from peft import PeftModel

    torch.set_num_threads(1)  # as in the test process (tests/conftest.py)

    for name, e in json.load(open(sys.argv[1])).items():
        try:
            config = transformers.AutoConfig.from_pretrained(e["config_dir"])
            torch.manual_seed(e["seed"])
            base = getattr(transformers, e["auto_class"]).from_config(config, attn_implementation="eager")
            base = base.requires_grad_(False).eval()
            batch = torch.load(e["batch"])
            def logits(r):
                return r.logits if "logits" in r else torch.stack([r.start_logits, r.end_logits], dim=-1)

            with torch.no_grad():
                base_out = logits(base(**batch))
            model = PeftModel.from_pretrained(base, e["adapter_dir"]).eval()
            with torch.no_grad():
                adapter_out = logits(model(**batch))
            torch.save({"base": base_out, "adapter": adapter_out}, e["result"])
        except Exception:
            with open(e["result"] + ".err", "w") as f:
                f.write(traceback.format_exc())
    """
)


@pytest.fixture(scope="module")
def fresh_process_reload(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Save one adapter per architecture, reload all of them in one fresh python process (one interpreter start)."""
    from models import CASES, SEED

    root = tmp_path_factory.mktemp("fresh_process")
    manifest, saved = {}, {}
    for case in CASES:
        d = root / case.name
        try:  # a failure here belongs to this architecture's test, not to every architecture's
            batch = case.batch()
            base = case.build()
            base.config.save_pretrained(d / "config")
            base_out = out(base, batch)
            model = make_peft(case, init_weights=False)
            perturb_head(model, "default", seed=7)
            model.save_pretrained(d / "adapter")
            torch.save(batch, d / "batch.pt")
        except Exception as e:
            saved[case.name] = {"save_error": e}
            continue
        saved[case.name] = {"base": base_out, "adapter": out(model, batch), "result": d / "result.pt"}
        manifest[case.name] = {
            "config_dir": str(d / "config"),
            "auto_class": case.auto_class,
            "seed": SEED,
            "batch": str(d / "batch.pt"),
            "adapter_dir": str(d / "adapter"),
            "result": str(d / "result.pt"),
        }
    (root / "manifest.json").write_text(json.dumps(manifest))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(root / "manifest.json")], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return saved


def test_save_load_fresh_process_identical(arch_case: Case, fresh_process_reload: dict[str, dict[str, Any]]) -> None:
    saved = fresh_process_reload[arch_case.name]
    if "save_error" in saved:
        raise saved["save_error"]
    err = Path(str(saved["result"]) + ".err")
    assert not err.exists(), err.read_text() if err.exists() else ""
    result = torch.load(saved["result"])
    assert torch.equal(result["base"], saved["base"]), "the fresh process did not rebuild the same base model"
    assert not torch.equal(saved["adapter"], saved["base"])
    assert torch.equal(result["adapter"], saved["adapter"])


# --- merge ------------------------------------------------------------------------------------------------------------


def test_merge_unmerge_round_trip(arch_case: Case) -> None:
    batch = arch_case.batch()
    model = make_peft(arch_case, init_weights=False)
    perturb_head(model, "default", seed=3)
    layers = bitfit_layers(model)
    originals = {n: None if base_bias(m) is None else base_bias(m).detach().clone() for n, m in layers.items()}
    unmerged = out(model, batch)

    model.merge_adapter()
    assert all(m.merged for m in layers.values())
    assert all(base_bias(m) is not None for m in layers.values()), "merging must create missing biases"
    torch.testing.assert_close(out(model, batch), unmerged, **TOL)

    model.unmerge_adapter()
    assert not any(m.merged for m in layers.values())
    for name, m in layers.items():
        if originals[name] is not None:
            assert torch.equal(base_bias(m), originals[name]), f"unmerge did not restore the bias of {name}"
        else:
            assert base_bias(m) is None or torch.count_nonzero(base_bias(m)) == 0, name
    torch.testing.assert_close(out(model, batch), unmerged, **TOL)


def test_merge_and_unload_gives_plain_model(arch_case: Case) -> None:
    batch = arch_case.batch()
    reference = arch_case.build()
    base_keys = set(reference.state_dict())
    biasless = {n for n in expected_targets(reference, arch_case) if reference.get_submodule(n).bias is None}
    model = make_peft(arch_case, init_weights=False)
    perturb_head(model, "default", seed=5)
    expected = out(model, batch)

    merged = model.merge_and_unload()
    assert type(merged) is type(reference)
    assert not [n for n, m in merged.named_modules() if isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper))]
    keys = set(merged.state_dict())
    assert not [k for k in keys if "bitfit_" in k]
    assert base_keys <= keys
    assert {k.removesuffix(".bias") for k in keys - base_keys} == biasless
    assert all(k.endswith(".bias") for k in keys - base_keys)
    torch.testing.assert_close(out(merged, batch), expected, **TOL)


# --- disable, several adapters ----------------------------------------------------------------------------------------


def test_disable_adapter_equals_base(arch_case: Case) -> None:
    batch = arch_case.batch()
    base_out = out(arch_case.build(), batch)
    model = make_peft(arch_case, init_weights=False)
    perturb_head(model, "default", seed=2)
    adapted = out(model, batch)
    assert not torch.equal(adapted, base_out)
    with model.disable_adapter():
        assert torch.equal(out(model, batch), base_out)
    assert torch.equal(out(model, batch), adapted)


def test_two_adapters_set_adapter_delete_adapter(arch_case: Case) -> None:
    batch = arch_case.batch()
    model = make_peft(arch_case, adapter="a", init_weights=False)
    perturb_head(model, "a", seed=11)
    out_a = out(model, batch)
    model.add_adapter("b", bitfit_config(arch_case, init_weights=False))
    perturb_head(model, "b", seed=12)
    assert torch.equal(out(model, batch), out_a), "adding an adapter changed the active one's outputs"
    assert deltas(model, "b").keys() == deltas(model, "a").keys()

    model.set_adapter("b")
    out_b = out(model, batch)
    assert not torch.equal(out_b, out_a)
    assert all(p.requires_grad for p in deltas(model, "b").values())
    assert not any(p.requires_grad for p in deltas(model, "a").values())

    model.set_adapter("a")
    assert torch.equal(out(model, batch), out_a)
    model.delete_adapter("a")
    model.set_adapter("b")
    assert not deltas(model, "a")
    assert not [n for n, _ in model.named_parameters() if n.endswith(".a") or ".a." in n]
    assert torch.equal(out(model, batch), out_b)


# --- mixed-task batches -----------------------------------------------------------------------------------------------


def two_adapter_model(case: Case) -> PeftModel:
    model = make_peft(case, adapter="a", init_weights=False)
    perturb_head(model, "a", seed=21)
    model.add_adapter("b", bitfit_config(case, init_weights=False))
    perturb_head(model, "b", seed=22)
    return model.eval()


def reference_row(model: PeftModel, row: dict[str, torch.Tensor], name: str, fn: Any) -> torch.Tensor:
    """`fn(model, row)` with the adapter `name` active ("__base__": adapters disabled)."""
    if name == "__base__":
        with model.disable_adapter():
            return fn(model, row)
    model.set_adapter(name)
    return fn(model, row)


def test_mixed_batch_equals_per_example(arch_case: Case) -> None:
    batch = arch_case.batch()
    names = ["a", "__base__", "b", "a"]
    model = two_adapter_model(arch_case)
    if arch_case.name == "deberta_v2":
        # relative-position embeddings go through the attention projections once for the whole batch: refused
        with pytest.raises(ValueError, match="not supported on DeBERTa with relative attention"):
            out(model, batch, adapter_names=names)
        return
    mixed = out(model, batch, adapter_names=names)
    per_example = torch.cat([reference_row(model, rows(batch, i), n, out) for i, n in enumerate(names)])
    # the rows really differ by adapter (otherwise the test proves nothing)
    assert not torch.allclose(per_example[0], reference_row(model, rows(batch, 0), "b", out)[0])
    torch.testing.assert_close(mixed, per_example, **TOL)


GENERATE_CASES = [c for c in CASES_BY_NAME.values() if c.kind in ("decoder", "seq2seq")]


@pytest.mark.parametrize("num_beams", [1, 2])
@pytest.mark.parametrize("case", GENERATE_CASES, ids=[c.name for c in GENERATE_CASES])
def test_mixed_batch_generate_equals_per_example(case: Case, num_beams: int) -> None:
    batch = case.batch()
    batch.pop("decoder_input_ids", None)
    if case.kind == "decoder":  # decoder-only generation needs left padding: move each row's padding to the front
        n_pad = (batch["attention_mask"] == 0).sum(-1).tolist()
        for key in ("input_ids", "attention_mask"):
            batch[key] = torch.stack([row.roll(n, -1) for row, n in zip(batch[key], n_pad, strict=True)])
    names = ["b", "a", "__base__", "a"]
    model = two_adapter_model(case)

    def generate(m: PeftModel, b: dict[str, torch.Tensor], **kwargs: Any) -> torch.Tensor:
        with torch.no_grad():
            # min_new_tokens: no row stops early, so a row of the batch and the row alone have the same length
            return m.generate(
                **b,
                max_new_tokens=4,
                min_new_tokens=4,
                num_beams=num_beams,
                do_sample=False,
                pad_token_id=PAD,
                **kwargs,
            )

    mixed = generate(model, batch, adapter_names=names)
    for i, name in enumerate(names):
        assert torch.equal(mixed[i : i + 1], reference_row(model, rows(batch, i), name, generate)), (i, name)


def test_mixed_batch_errors() -> None:
    case = CASES_BY_NAME["bert"]
    batch = case.batch()
    model = two_adapter_model(case)
    with pytest.raises(ValueError, match="nope"):
        model(**batch, adapter_names=["a", "nope", "b", "a"])
    with pytest.raises(ValueError, match=r"3.*4|4.*3"):
        model(**batch, adapter_names=["a", "b", "a"])
    model.train()
    with pytest.raises(ValueError, match=r"(?i)train|eval"):
        model(**batch, adapter_names=["a", "b", "a", "b"])
    model.eval()
    model.merge_adapter()
    with pytest.raises(ValueError, match=r"(?i)merge"):
        model(**batch, adapter_names=["a", "b", "a", "b"])


# --- bias_terms -------------------------------------------------------------------------------------------------------


def test_bias_terms_counts(arch_case: Case) -> None:
    """Each named bias term (and the paper's query+intermediate) trains exactly the config-derived number of biases."""
    sizes = arch_case.term_sizes(arch_case.config())
    wanted = {(t,): sizes[t] for t in TERMS if t in sizes}
    if "intermediate" in sizes:
        wanted[("query", "intermediate")] = sizes["query"] + sizes["intermediate"]
    found = {}
    for terms in wanted:
        model = make_peft(arch_case, bias_terms=list(terms))
        found[terms] = sum(p.numel() for p in deltas(model).values())
    assert found == wanted


def test_bert_base_query_intermediate_is_46080() -> None:
    """BitFit paper, BERT-base b_q + b_m2: L * (H + I) = 12 * (768 + 3072) = 46,080 trainable parameters."""
    config = BertConfig()  # BERT-base dimensions
    with torch.device("meta"):
        base = BertModel(config)
    model = get_peft_model(base, BitFitConfig(bias_terms=["query", "intermediate"]))
    expected = config.num_hidden_layers * (config.hidden_size + config.intermediate_size)
    assert expected == 46_080
    assert model.get_nb_trainable_parameters()[0] == expected
    assert sum(p.numel() for p in deltas(model).values()) == expected


# --- fused QKV projections --------------------------------------------------------------------------------------------

FUSED_CASES = [c for c in CASES_BY_NAME.values() if c.fused]


@pytest.mark.parametrize("case", FUSED_CASES, ids=[c.name for c in FUSED_CASES])
def test_fused_query_slice_trains_and_saves_only_the_slice(case: Case, tmp_path: Path) -> None:
    suffix, positions = case.fused
    config = case.config()
    query = positions(config, 0)
    model = make_peft(case, bias_terms=["query"])
    fused = {n: m for n, m in bitfit_layers(model).items() if n.endswith(suffix)}
    assert len(fused) == len(bitfit_layers(model)) == config.num_hidden_layers
    for layer in fused.values():
        assert layer.bitfit_delta["default"].shape == (len(query),)
        assert torch.as_tensor(layer.bitfit_index["default"]).tolist() == query

    train_step(model, case.batch())
    for name, layer in fused.items():
        base = base_bias(layer)
        rest = sorted(set(range(base.numel())) - set(query))
        assert torch.count_nonzero(layer.bitfit_delta["default"]) > 0, name
        with torch.no_grad():
            x = torch.zeros(1, 1, config.hidden_size)
            effective = layer(x)[0, 0]  # zero input: the output is the effective bias
        assert torch.equal(effective[rest], base[rest]), f"{name}: key/value slices moved off the base bias"
        torch.testing.assert_close(
            effective[query], base[query] + layer.bitfit_delta["default"].detach(), atol=0, rtol=0
        )

    model.save_pretrained(tmp_path)
    payload = safetensors_payload(tmp_path / ADAPTER_FILE)
    with safe_open(tmp_path / ADAPTER_FILE, framework="pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    delta_keys = [k for k in saved if "bitfit_delta" in k]
    assert len(delta_keys) == config.num_hidden_layers
    assert all(saved[k].shape == (len(query),) for k in delta_keys)
    assert all(3 * len(query) not in shape for _, shape, _ in payload.values())
    assert not [k for k in saved if "weight" in k or k.endswith(".bias")], "base weights leaked into the adapter"

    reloaded = PeftModel.from_pretrained(case.build(), tmp_path).eval()
    batch = case.batch()
    assert torch.equal(out(reloaded, batch), out(model, batch))


# --- dtypes -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_base_with_fp32_deltas(arch_case: Case, dtype: torch.dtype) -> None:
    batch = arch_case.batch()
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
    base_out = out(arch_case.build(dtype), batch)
    fresh = make_peft(arch_case, dtype=dtype)
    assert all(d.dtype == torch.float32 for d in deltas(fresh).values())
    assert torch.equal(out(fresh, batch), base_out)

    model = make_peft(arch_case, dtype=dtype, init_weights=False)
    adapted = out(model, batch)
    assert adapted.dtype == dtype
    assert torch.isfinite(adapted).all() and not torch.equal(adapted, base_out)
    if dtype == torch.bfloat16:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.isfinite(out(model, batch)).all()
    train_step(model, batch)
    assert all(d.dtype == torch.float32 and torch.isfinite(d).all() for d in deltas(model).values())


def test_autocast_fp32_base(arch_case: Case) -> None:
    batch = arch_case.batch()
    model = make_peft(arch_case, init_weights=False)
    full = out(model, batch)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = logits(model(**batch)).float().pow(2).mean()
    loss.backward()
    grads = [d.grad for d in deltas(model).values()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = out(model, batch)
    torch.testing.assert_close(low.float(), full, atol=0.1, rtol=0.1)


def test_save_dtype_bfloat16_halves_deltas_and_reloads_rounded(arch_case: Case, tmp_path: Path) -> None:
    batch = arch_case.batch()
    model16 = make_peft(arch_case, init_weights=False, save_dtype="bfloat16", packed=False)  # one tensor per bias
    model32 = make_peft(arch_case, init_weights=False)
    d16, d32 = deltas(model16), deltas(model32)
    assert all(torch.equal(d16[n], d32[n]) for n in d32), "the seeded deltas differ: the test setup is broken"
    model16.save_pretrained(tmp_path / "bf16")
    model32.save_pretrained(tmp_path / "fp32")

    p16 = safetensors_payload(tmp_path / "bf16" / ADAPTER_FILE)
    p32 = safetensors_payload(tmp_path / "fp32" / ADAPTER_FILE)
    assert p16.keys() == p32.keys()
    delta_keys = [k for k in p32 if "bitfit_delta" in k]
    assert len(delta_keys) == len(d32)
    assert all(p16[k][0] == "BF16" and p32[k][0] == "F32" and p16[k][1] == p32[k][1] for k in delta_keys)
    assert 2 * sum(p16[k][2] for k in delta_keys) == sum(p32[k][2] for k in delta_keys)
    size16, size32 = (os.path.getsize(tmp_path / d / ADAPTER_FILE) for d in ("bf16", "fp32"))
    assert size16 < size32

    reloaded = PeftModel.from_pretrained(arch_case.build(), tmp_path / "bf16").eval()
    r = deltas(reloaded)
    assert r.keys() == d32.keys()
    for name, d in d32.items():
        assert r[name].dtype == torch.float32
        assert torch.equal(r[name], d.detach().to(torch.bfloat16).float()), name
    torch.testing.assert_close(out(reloaded, batch), out(model32, batch), atol=1e-2, rtol=1e-2)


def test_packed_int8_sparse_checkpoint_reloads_exactly_what_the_file_holds(arch_case: Case, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from bitfit_peft import compact

    model = make_peft(arch_case, init_weights=False, save_dtype="int8", keep_fraction=0.5)
    model.save_pretrained(tmp_path)
    stored = load_file(tmp_path / ADAPTER_FILE)
    assert compact.is_packed(stored) and stored[compact.PACKED_KEY].dtype == torch.int8
    state = compact.decode(stored)
    reloaded = PeftModel.from_pretrained(arch_case.build(), tmp_path).eval()
    r = deltas(reloaded)
    assert r.keys() == deltas(model).keys()
    for name, d in r.items():
        assert d.dtype == torch.float32
        assert torch.equal(d, state[f"{PREFIX}{name}.bitfit_delta"]), name
