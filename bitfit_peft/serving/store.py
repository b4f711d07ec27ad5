"""`TaskStore`: many BitFit tasks served on one frozen base model, in mixed batches, safe under concurrency.

Open a base model and a directory of adapters (`<root>/<task>/adapter_config.json + adapter_model.safetensors`);
each adapter's deltas are written straight into packed per-layer tables (no peft injection per adapter), each
task's head is kept beside them, and `predict` / `generate` run one mixed forward over requests for any tasks.

Concurrency contract: `predict`, `generate`, `tasks` and `task` may be called from any number of threads at once;
`load` (add or hotswap) and `unload` may be called while they run. A change waits for the calls in flight and the
calls that come after wait for it (`routing.RWLock`, writer-preferring), so every call sees each task entirely as
it was before or after a change, never a mix of layers. Nothing switches global adapter state per request.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn
from transformers import AutoConfig, AutoTokenizer

from ..constants import BASE
from ..router import install_token_hook
from ..routing import MixedBatch, Routing, RWLock, mixed_batch
from .adapters import read_adapter, scan
from .chunks import CPU_FORWARD_COST, check_forward_cost, plan_chunks
from .errors import AdapterError, BadInputError, ServingError, TooLongError, UnknownTaskError, WrongRouteError
from .model import build_base, mean_pooling_head, wrap_heads, wrap_layers
from .pooling import Pooling
from .prepare import Preparer, TaskInfo, head_keys, task_type
from .tables import Tables

__all__ = ["EmbedItem", "GenerationRequest", "Prediction", "TaskInfo", "TaskStore"]

Inputs = str | tuple[str, str] | list[str]
# (task, inputs) or (task, inputs, truncate): truncate=False refuses an input longer than max_length (TooLongError)
Item = tuple[str, Inputs] | tuple[str, Inputs, bool]
Heads = nn.Module  # one task's copy of one base head module


@dataclass(frozen=True)
class Prediction:
    """One prediction: the label and its probabilities (classification) or the value (regression)."""

    task: str
    label: str | None
    scores: dict[str, float]
    score: float | None
    logits: list[float]


class EmbedItem(NamedTuple):
    """One text to embed with a task's deltas (`TaskStore.embed_outcomes`); queued on the batcher as one item."""

    task: str
    inputs: str
    truncate: bool = True


@dataclass(frozen=True)
class GenerationRequest:
    """One generation request with its own parameters."""

    task: str
    prompt: str
    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0


class TaskStore:
    """Many BitFit tasks on one base model. Build it with `TaskStore.open`.

    Example:

    >>> store = TaskStore.open("models/minilm", "adapters/")  # doctest: +SKIP
    >>> store.predict([("sst2", "a gripping film"), ("trec", "Who wrote Hamlet?")])  # doctest: +SKIP
    """

    def __init__(
        self,
        base: str,
        model: nn.Module,
        tokenizer: Any,
        generator: bool,
        max_length: int,
        forward_cost_tokens: float | None = None,
    ) -> None:
        self.base_name = base
        self.model = model
        self.tokenizer = tokenizer
        self.kind = "generator" if generator else "classifier"
        self.max_length = max_length
        self.device = next(model.parameters()).device  # (MeanPooledSequenceClassifier has no `.device`)
        if forward_cost_tokens is None:
            forward_cost_tokens = CPU_FORWARD_COST if self.device.type == "cpu" else math.inf
        check_forward_cost(forward_cost_tokens, "forward_cost_tokens")
        self.forward_cost_tokens = forward_cost_tokens
        self.lock = RWLock()
        self.routing = Routing(slots={})
        self.refused: dict[str, str] = {}
        self._info: dict[str, TaskInfo] = {}
        self._heads = wrap_heads(model) if not generator else {}
        self._prepare = Preparer(model, self.kind, self._heads)
        self._tables: Tables | None = None
        self.pooling = Pooling.from_checkpoint(base) if os.path.isdir(base) else Pooling()
        install_token_hook(model)

    # ------------------------------------------------------------------ opening and loading
    @classmethod
    def open(
        cls,
        base: str,
        adapters: str | None = None,
        *,
        dtype: str = "float32",
        device: str = "cpu",
        max_length: int = 128,
        generator: bool | None = None,
        forward_cost_tokens: float | None = None,
    ) -> TaskStore:
        """Load `base` once and every adapter under `adapters`; adapters that cannot be served are listed in
        `refused` (name -> reason) and the rest are served.

        Args:
            base (`str`): local directory or hub id of the base model (with its tokenizer).
            adapters (`str`, *optional*): directory of `<task>/` adapter folders.
            dtype (`str`): `float32`, `bfloat16` or `float16`.
            device (`str`): where the model runs.
            max_length (`int`): longest input in tokens; longer inputs are truncated.
            generator (`bool`, *optional*): serve `generate` (a causal LM) instead of task heads; default: decided
                by the adapters' `task_type` (`CAUSAL_LM`) or the base's architecture.
            forward_cost_tokens (`float`, *optional*): what one more forward costs, in padded tokens: `predict`
                cuts each length-sorted batch where the padding saved pays for another forward
                (`serving.chunks.plan_chunks`). Default: 32 on CPU (measured), `math.inf` elsewhere (one forward
                per `batch_size` items).
        """
        paths = scan(adapters) if adapters else {}
        if generator is None:
            generator = cls.kind_of(base, paths) == "generator"
        torch_dtype = getattr(torch, dtype, None)
        if not isinstance(torch_dtype, torch.dtype):
            raise ValueError(f"Invalid dtype {dtype!r}: use float32, bfloat16 or float16.")
        heads = None if generator else head_keys(paths)
        model = build_base(base, generator, torch_dtype, device, mean_pooling_head(heads, base))
        tokenizer = AutoTokenizer.from_pretrained(base)
        if generator:
            tokenizer.padding_side = "left"
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
        store = cls(base, model, tokenizer, generator, max_length, forward_cost_tokens)
        store._load_many(paths)
        return store

    @staticmethod
    def kind_of(base: str, adapters: str | dict[str, str] | None) -> str:
        """`"generator"` if the adapters are `CAUSAL_LM` (or, without adapters, the base is a causal LM), else
        `"classifier"`: what `open` serves, decided from the config files alone (no weights are read)."""
        paths = scan(adapters) if isinstance(adapters, str) else adapters or {}
        types = {task_type(path) for path in paths.values()}
        if types:
            return "generator" if "CAUSAL_LM" in types else "classifier"
        archs = getattr(AutoConfig.from_pretrained(base), "architectures", None) or []
        return "generator" if any(a.endswith(("CausalLM", "LMHeadModel")) for a in archs) else "classifier"

    def load_dir(self, adapters: str) -> list[str]:
        """Bulk-load every `<adapters>/<task>/` adapter (no peft injection: each adapter's deltas are written into
        the tables, under the writer lock for that write only, so serving goes on meanwhile); returns the tasks
        loaded. Adapters that cannot be served are added to `refused` and skipped."""
        return self._load_many(scan(adapters))

    def _load_many(self, paths: dict[str, str]) -> list[str]:
        """Read, check and install adapters one at a time: peak memory is the tables plus one file."""
        loaded = []
        reserved = False
        for name, path in paths.items():
            try:
                rows, heads, info = self._prepare(read_adapter(name, path))
            except AdapterError as err:
                self.refused[name] = str(err)
                continue
            with self.lock.write():
                tables = self._ensure_tables(len(paths), list(rows))
                if not reserved:  # one allocation per layer for the whole directory, not repeated growth
                    tables.reserve(dict.fromkeys(rows, len(paths)))
                    reserved = True
                self._install(tables, rows, heads, info)
            loaded.append(name)
        return loaded

    def _ensure_tables(self, capacity: int, keys: Sequence[str]) -> Tables:
        """The tables, with a BitFit layer on every module in `keys` (call under the writer lock: wrapping changes
        the model's modules)."""
        new = [k for k in keys if self._tables is None or k not in self._tables.layers]
        if self._tables is None:
            dtype = next(self.model.parameters()).dtype
            self._tables = Tables(wrap_layers(self.model, new), self.routing, dtype, capacity)
        elif new:
            self._tables.layers = wrap_layers(self.model, new)
        return self._tables

    def _install(self, tables: Tables, rows: dict[str, torch.Tensor], heads: dict[str, Heads], info: TaskInfo) -> None:
        tables.put(info.name, rows)
        for name, router in self._heads.items():
            per_task = self.routing.heads.setdefault(router, {})
            if name in heads:
                per_task[info.name] = heads[name]
            else:
                per_task.pop(info.name, None)
        self._info = {**self._info, info.name: info}  # a new dict: readers take no lock (see `task`)
        self.refused.pop(info.name, None)

    def load(self, name: str, path: str) -> TaskInfo:
        """Serve the adapter in `path` as task `name`, replacing the task atomically if it exists (hotswap).

        Raises:
            AdapterError: the adapter cannot be served; the served tasks are left exactly as they were.
        """
        if not name or name == BASE or "/" in name:
            raise AdapterError(f"Invalid task name {name!r}: use a non-empty name without '/', other than {BASE!r}.")
        rows, heads, info = self._prepare(read_adapter(name, path))
        with self.lock.write():
            self._install(self._ensure_tables(1, list(rows)), rows, heads, info)
        return info

    def unload(self, name: str) -> None:
        """Stop serving task `name` (waits for calls in flight)."""
        with self.lock.write():
            if name not in self._info:
                raise UnknownTaskError(name, sorted(self._info))
            assert self._tables is not None
            self._tables.remove(name)
            for per_task in self.routing.heads.values():
                per_task.pop(name, None)
            self._info = {k: v for k, v in self._info.items() if k != name}

    # ------------------------------------------------------------------ queries
    def tasks(self) -> list[TaskInfo]:
        """The served tasks, sorted by name. Takes no lock: changes replace the whole name -> info mapping (one
        atomic reference swap), so this never waits for a forward or a hotswap and is safe on an event loop."""
        info = self._info
        return [info[n] for n in sorted(info)]

    def task(self, name: str) -> TaskInfo:
        """One served task (no lock, as `tasks`). Raises `UnknownTaskError` (a `KeyError`) if it is not served."""
        info = self._info
        if name not in info:
            raise UnknownTaskError(name, sorted(info))
        return info[name]

    def resident_bytes(self) -> int:
        """Bytes held for the served tasks: delta tables and task heads."""
        heads = sum(
            p.numel() * p.element_size()
            for per in self.routing.heads.values()
            for m in per.values()
            for p in m.parameters()
        )
        return heads + (self._tables.nbytes() if self._tables is not None else 0)

    def _encode(self, inputs: Inputs, truncate: bool = True) -> dict[str, Any]:
        """Tokenize one input once; a longer one than `max_length` is cut (`truncate`) or refused (`TooLongError`)."""
        if isinstance(inputs, str):
            pair: tuple[str, ...] = (inputs,)
        elif isinstance(inputs, (tuple, list)) and len(inputs) == 2 and all(isinstance(x, str) for x in inputs):
            pair = tuple(inputs)
        else:
            raise BadInputError(f"inputs must be a text or a pair of texts, got {inputs!r}.")
        if not any(p.strip() for p in pair):
            raise BadInputError("inputs is empty: send a non-empty text.")
        encoded = self.tokenizer(*pair)
        size = len(encoded["input_ids"])
        if size <= self.max_length:
            return encoded
        if not truncate:
            raise TooLongError(
                f"Input is {size} tokens, more than --max-length {self.max_length}: shorten it, "
                'or send "truncate": true to cut it to the first tokens.'
            )
        return self.tokenizer(*pair, truncation=True, max_length=self.max_length)

    def predict(self, items: Sequence[Item], batch_size: int = 64) -> list[Prediction]:
        """Predict each (task, text or text pair) with its task, in mixed forwards of at most `batch_size` items.

        Items are sorted by length, whatever their tasks, and cut into forwards where padding would cost more than
        another forward (`forward_cost_tokens`); results come back in the caller's order. An item may be
        `(task, inputs, truncate)`: with `truncate=False` an input longer than `max_length` raises `TooLongError`
        (default: cut it). Raises the first failing item's error, if any (`predict_outcomes` returns them instead).
        """
        outcomes = self.predict_outcomes(items, batch_size)
        for outcome in outcomes:
            if isinstance(outcome, Exception):
                raise outcome
        return outcomes  # type: ignore[return-value]

    def predict_outcomes(self, items: Sequence[Item], batch_size: int = 64) -> list[Prediction | ServingError]:
        """`predict`, but an item that cannot run (unknown task, empty or too long input) gets its error in its place
        while the others run: one bad request never fails its batch-mates, and costs no retry."""
        if self.kind != "classifier":
            raise WrongRouteError("This store serves a generator (causal LM): call generate(), not predict().")
        embedding = [i for i, (task, *_) in enumerate(items) if getattr(self._info.get(task), "problem", "") == "embedding"]  # fmt: skip
        if embedding:  # no head to predict with: those items fail alone
            outcomes = self.predict_outcomes([x for i, x in enumerate(items) if i not in embedding], batch_size)
            for i in embedding:
                outcomes.insert(i, WrongRouteError(f"Task {items[i][0]!r} is an embedding task (no head): use POST /v1/embeddings or /embed."))  # fmt: skip
            return outcomes
        return self._outcomes(items, batch_size)

    def embed_outcomes(
        self, items: Sequence[Item], batch_size: int = 64
    ) -> list[tuple[list[float], int] | ServingError]:
        """Sentence embeddings of (task, text[, truncate]) items: the encoder's token states with each item's task
        deltas, pooled as the checkpoint's sentence-transformers config says (`pooling.Pooling`); the base's name
        or `"__base__"` for no adapter. Each result is (embedding, tokens of the input); errors per item, as
        `predict_outcomes`."""
        if self.kind != "classifier":
            raise WrongRouteError("This store serves a generator (causal LM): embeddings need an encoder base.")
        return self._outcomes(items, batch_size, embed=True)

    def _outcomes(self, items: Sequence[Item], batch_size: int, embed: bool = False) -> list[Any]:
        """Tokenize each item, then under the read lock check its task (the one check against unloads: a task
        unloaded since the route looked it up fails alone) and run the rest sorted by length in mixed forwards cut by
        `plan_chunks`; an item's error goes in its place. Each result is a `Prediction` from the task head, or with
        `embed` (the base's name allowed) the pooled encoder states and the input's token count."""
        encoder: Any = (getattr(self.model, "encoder_model", None) or self.model.base_model) if embed else None
        results: list[Any] = [None] * len(items)
        encoded: dict[int, dict[str, Any]] = {}
        for i, (_, inputs, *rest) in enumerate(items):
            try:
                encoded[i] = self._encode(inputs, truncate=bool(rest[0]) if rest else True)
            except ServingError as err:
                results[i] = err
        with self.lock.read():
            info = self._info
            for i, (task, *_) in enumerate(items):
                if task not in info and not (embed and task == BASE):
                    results[i] = UnknownTaskError(task, sorted(info))
            order = sorted((i for i in encoded if results[i] is None), key=lambda i: len(encoded[i]["input_ids"]))
            lengths = [len(encoded[i]["input_ids"]) for i in order]
            plan = [(0, 1)] if len(order) == 1 else plan_chunks(lengths, batch_size, self.forward_cost_tokens)
            for start, end in plan:
                chunk = order[start:end]
                batch = self.tokenizer.pad([encoded[i] for i in chunk], return_tensors="pt")
                batch = {k: v.to(self.device) for k, v in batch.items()}
                names = [items[i][0] for i in chunk]
                with torch.inference_mode(), mixed_batch(MixedBatch(names, self.routing)):
                    if embed:
                        rows = self.pooling(encoder(**batch).last_hidden_state, batch["attention_mask"]).float()
                    else:
                        rows = self.model(**batch).logits.float()
                for j, i in enumerate(chunk):
                    tokens = len(encoded[i]["input_ids"])
                    results[i] = (rows[j].tolist(), tokens) if embed else self._prediction(info[names[j]], rows[j])
        return results

    @staticmethod
    def _prediction(info: TaskInfo, row: torch.Tensor) -> Prediction:
        if info.problem == "regression":
            return Prediction(info.name, None, {}, float(row[0]), [float(row[0])])
        width = len(info.labels)
        logits = row[:width]
        probs = logits.sigmoid() if info.problem == "multi_label_classification" else logits.softmax(-1)
        scores = {label: float(p) for label, p in zip(info.labels, probs, strict=True)}
        return Prediction(info.name, info.labels[int(logits.argmax())], scores, None, [float(x) for x in logits])

    def generate(self, requests: Sequence[GenerationRequest]) -> list[str]:
        """Generate for each request with its task, one mixed `generate` per group of requests that share sampling
        settings (each row stops at its own `max_new_tokens`). Returns the generated text only, in order."""
        if self.kind != "generator":
            raise WrongRouteError("This store serves task heads (a classifier): call predict(), not generate().")
        for r in requests:
            if not r.prompt.strip():
                raise BadInputError("prompt is empty: send a non-empty prompt.")
        out: list[str] = [""] * len(requests)
        groups: dict[tuple[bool, float, float], list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((r.do_sample, r.temperature, r.top_p), []).append(i)
        with self.lock.read():
            for r in requests:
                self.task(r.task)
            for (do_sample, temperature, top_p), idx in groups.items():
                prompts = [requests[i].prompt for i in idx]
                batch = self.tokenizer(
                    prompts, return_tensors="pt", padding=True, truncation=True, max_length=self.max_length
                )
                batch = {k: v.to(self.device) for k, v in batch.items()}
                budget = max(requests[i].max_new_tokens for i in idx)
                sampling = (
                    dict(do_sample=True, temperature=temperature, top_p=top_p) if do_sample else {"do_sample": False}
                )
                names = [requests[i].task for i in idx]
                with torch.inference_mode(), mixed_batch(MixedBatch(names, self.routing)):
                    ids = self.model.generate(  # type: ignore[operator]
                        **batch, max_new_tokens=budget, pad_token_id=self.tokenizer.pad_token_id, **sampling
                    )
                new = ids[:, batch["input_ids"].shape[1] :]
                for j, i in enumerate(idx):
                    out[i] = self.tokenizer.decode(new[j, : requests[i].max_new_tokens], skip_special_tokens=True)
        return out
