"""`GenerationEngine`: continuous (iteration-level) batching of generation requests for many tasks on one causal LM.

One thread owns the model. At every step it admits new requests, runs one batched decode forward for all running
rows (each row at its own position, routed to its own task's deltas) and one left-padded prefill forward for the
next prompt chunk of every joining request that fits the step's `prefill_tokens`, then samples each row with its
own parameters. A request joins at a step boundary and leaves as soon as
it ends, so a short request never waits behind a long one (no head-of-line blocking).

Every step takes the store's read lock once (`TaskStore.lock`), so adapter loads, hotswaps and unloads happen
between steps; a request whose task was unloaded fails with `UnknownTaskError` at the next step. Keys and values
live in a bounded pool of token slots (`kv.SlotCache`): a request reserves its prompt plus `max_tokens` at admission,
and one that does not fit fails at once with `OverloadedError` (429, `retry_after_s`).

Example:

>>> engine = GenerationEngine(store); engine.start()  # doctest: +SKIP
>>> engine.submit("sst2", "Review: great film. Sentiment:", SamplingParams(max_tokens=4, temperature=0)).result()  # doctest: +SKIP
Completion(text=' positive', finish_reason='stop', prompt_tokens=9, completion_tokens=2, token_ids=(...))
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any, Protocol

import torch

from ..constants import BASE
from ..routing import MixedBatch, mixed_batch
from .errors import BadInputError, DrainingError, OverloadedError, TooLongError, UnknownTaskError, WrongRouteError
from .handle import GenerationHandle, Row
from .kv import SlotCache, TokenPool, _padded, attention_mask
from .sampling import Completion, Prompt, SamplingParams, TextTracker, check_prompt, choose, prompt_ids
from .store import TaskStore

__all__ = [
    "Completion",
    "GenerationEngine",
    "GenerationObserver",
    "GenerationHandle",
    "OverloadedError",
    "SamplingParams",
]

logger = logging.getLogger(__name__)


class GenerationObserver(Protocol):
    """Told about the engine's work, on the engine's thread (must be quick; exceptions are logged and ignored):
    `"step"` (`rows` decoded, `tasks` among them, `prefill_tokens`, `seconds`), `"first_token"` (`task`,
    `seconds` since submit) and `"finish"` (`task`, `finish_reason`, `prompt_tokens`, `completion_tokens`,
    `seconds` since submit)."""

    def on_generation(self, event: str, data: dict[str, Any]) -> None: ...


class GenerationEngine:
    """Continuous batching of generation requests for the tasks of a generator `TaskStore`.

    Args:
        store (`TaskStore`): a store of a causal LM (`store.kind == "generator"`).
        max_tokens_in_flight (`int`): the KV budget: prompt + `max_tokens` of every admitted request, in tokens.
        max_running (`int`): most rows in the decode batch; admitted requests beyond it wait their turn.
        prefill_chunk (`int`): most prompt tokens of one request prefilled per step, so a long prompt does not
            stall running decodes.
        prefill_tokens (`int`, *optional*): most prompt tokens prefilled per step over all joining requests, in
            one padded forward (rows x longest chunk); default: `4 * prefill_chunk`.
        max_prompt_tokens (`int`, *optional*): longest prompt; default: the model's positions less one.
        observer (`GenerationObserver`, *optional*): told about steps, first tokens and finished requests.
    """

    def __init__(
        self,
        store: TaskStore,
        *,
        max_tokens_in_flight: int = 8192,
        max_running: int = 64,
        prefill_chunk: int = 128,
        prefill_tokens: int | None = None,
        max_prompt_tokens: int | None = None,
        observer: GenerationObserver | None = None,
    ) -> None:
        if store.kind != "generator":
            raise WrongRouteError("GenerationEngine needs a store of a causal LM (TaskStore.kind == 'generator').")
        prefill_tokens = 4 * prefill_chunk if prefill_tokens is None else prefill_tokens
        for name, value in (("max_tokens_in_flight", max_tokens_in_flight), ("max_running", max_running), ("prefill_chunk", prefill_chunk), ("prefill_tokens", prefill_tokens)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
        config: Any = store.model.config.get_text_config()  # type: ignore[operator, union-attr]
        self.max_positions: int | None = getattr(config, "max_position_embeddings", None)
        if max_prompt_tokens is None:
            max_prompt_tokens = self.max_positions - 1 if self.max_positions else max_tokens_in_flight
        if isinstance(max_prompt_tokens, bool) or not isinstance(max_prompt_tokens, int) or max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be an integer >= 1 or None, got {max_prompt_tokens!r}.")
        self.store = store
        self.max_tokens_in_flight = max_tokens_in_flight
        self.max_running = max_running
        self.prefill_chunk = prefill_chunk
        self.prefill_tokens = prefill_tokens
        self.max_prompt_tokens = max_prompt_tokens
        self.observer = observer
        heads = config.num_attention_heads
        self._shape = (
            config.num_hidden_layers,
            getattr(config, "num_key_value_heads", None) or heads,
            getattr(config, "head_dim", None) or config.hidden_size // heads,
        )
        eos: Any = store.model.generation_config.eos_token_id  # type: ignore[union-attr]
        if eos is None:
            eos = store.tokenizer.eos_token_id
        self.eos: set[int] = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        self._cond = threading.Condition()
        self._inbox: deque[tuple[str, Prompt, SamplingParams, GenerationHandle, float]] = deque()
        self._cancels: set[GenerationHandle] = set()
        self._waiting: deque[Row] = deque()
        self._running: list[Row] = []
        self._pool = TokenPool(max_tokens_in_flight)
        self._cache: SlotCache | None = None
        self._thread: threading.Thread | None = None
        self._accepting = False
        self._abort = False
        self._step_s = 0.05  # running mean of one step, for `retry_after_s`

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Allocate the KV pool and start the engine's thread."""
        if self._thread is not None:
            raise RuntimeError("GenerationEngine.start() was already called; build a new engine to restart.")
        param = next(self.store.model.parameters())
        self._cache = SlotCache(self.max_tokens_in_flight, *self._shape, dtype=param.dtype, device=param.device)
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name="bitfit-generation", daemon=True)
        self._thread.start()

    def close(self, timeout: float | None = None) -> bool:
        """Stop accepting, let the admitted requests finish (at most `timeout` seconds, then they fail with
        `DrainingError`), stop the thread. True if every admitted request finished and the thread ended in time."""
        self._accepting = False
        with self._cond:
            self._cond.notify_all()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        if not self._thread.is_alive():
            return not self._abort
        self._abort = True
        with self._cond:
            self._cond.notify_all()
        self._thread.join(30)
        return False

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def accepting(self) -> bool:
        return self._accepting and self.alive

    @property
    def tokens_in_flight(self) -> int:
        """Tokens reserved by the admitted requests."""
        return self.max_tokens_in_flight - self._pool.free

    # ------------------------------------------------------------------ requests
    def submit(self, task: str, prompt: Prompt, params: SamplingParams) -> GenerationHandle:
        """Queue one request for `task` (`"__base__"`: no adapter); its `GenerationHandle` streams and returns it.

        Raises here: `UnknownTaskError`, `DrainingError`, `TypeError`/`BadInputError` for a malformed prompt.
        Through the handle, before the first token: `TooLongError` (prompt or budget), `BadInputError` (empty
        prompt, no chat template), `OverloadedError` (tokens in flight), `UnknownTaskError` (unloaded since).
        """
        if not self.accepting:
            raise DrainingError("The generation engine is not running (closed or not started): retry later.")
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}.")
        if task != BASE:
            self.store.task(task)  # lock-free; raises UnknownTaskError
        check_prompt(prompt)
        handle = GenerationHandle(self._cancel)
        with self._cond:
            self._inbox.append((task, prompt, params, handle, time.perf_counter()))
            self._cond.notify_all()
        return handle

    def _cancel(self, handle: GenerationHandle) -> None:
        with self._cond:
            self._cancels.add(handle)
            self._cond.notify_all()

    # ------------------------------------------------------------------ the engine's thread
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._inbox or self._cancels or self._running or self._waiting or self._abort):
                        if not self._accepting:
                            return
                        self._cond.wait()
                    inbox, self._inbox = self._inbox, deque()
                    cancels, self._cancels = self._cancels, set()
                if self._abort:
                    self._fail_all(inbox)
                    return
                for item in inbox:
                    self._admit(*item)
                for row in [*self._running, *self._waiting]:
                    if row.handle in cancels:
                        self._finish(row, error=DrainingError("The request was cancelled."))
                while self._waiting and len(self._running) < self.max_running:
                    self._running.append(self._waiting.popleft())
                if self._running:
                    self._step()
        except BaseException as exc:  # a bug of ours: fail every request rather than leave callers hanging
            logger.exception("the generation engine stopped")
            self._accepting = False
            self._fail_all(self._inbox, exc)
            raise

    def _fail_all(self, inbox: deque, exc: BaseException | None = None) -> None:
        error = exc or DrainingError("The server is shutting down: retry on another replica.")
        for *_, handle, _ in inbox:
            handle._publish(error=error)
        for row in [*self._running, *self._waiting]:
            self._finish(row, error=error)

    def _admit(self, task: str, prompt: Prompt, params: SamplingParams, handle: GenerationHandle, t: float) -> None:
        """Tokenize, check and reserve the request's tokens; queue it to run, or fail its handle."""
        if handle.cancelled:
            return handle._publish(error=DrainingError("The request was cancelled."))
        try:
            ids = prompt_ids(self.store.tokenizer, prompt, self.store.base_name)
            need = len(ids) + params.max_tokens
            if len(ids) > self.max_prompt_tokens:
                raise TooLongError(f"The prompt is {len(ids)} tokens, more than this server's limit of {self.max_prompt_tokens}: shorten it.")  # fmt: skip
            if self.max_positions and need > self.max_positions:
                raise TooLongError(f"The prompt ({len(ids)} tokens) plus max_tokens ({params.max_tokens}) is {need} tokens, more than the model's {self.max_positions} positions: lower max_tokens or shorten the prompt.")  # fmt: skip
            if need > self.max_tokens_in_flight:
                raise TooLongError(f"The prompt ({len(ids)} tokens) plus max_tokens ({params.max_tokens}) needs {need} tokens in flight, more than this server's whole budget of {self.max_tokens_in_flight}: lower max_tokens or shorten the prompt.")  # fmt: skip
            if need > self._pool.free:
                error = OverloadedError(f"The server has {self._pool.free} of {self.max_tokens_in_flight} tokens in flight free and this request needs {need} (prompt + max_tokens): retry later.")  # fmt: skip
                error.retry_after_s = self._retry_after()
                raise error
        except (BadInputError, OverloadedError) as err:
            return handle._publish(error=err)
        generator = None
        if params.temperature != 0:
            generator = torch.Generator(device="cpu")
            generator.manual_seed(params.seed) if params.seed is not None else generator.seed()
        row = Row(task, params, handle, ids, self._pool.take(need), TextTracker(self.store.tokenizer, params.stop), generator, t)  # fmt: skip
        self._waiting.append(row)

    def _retry_after(self) -> float:
        """Seconds until the running request nearest its end frees its tokens (at the recent step time)."""
        left = [r.params.max_tokens - len(r.out) + len(r.prompt) - r.prefilled for r in self._running]
        return float(min(max(1.0, min(left, default=1) * self._step_s), 60.0))

    # ------------------------------------------------------------------ one step
    def _step(self) -> None:
        start = time.perf_counter()
        chunk = 0
        with self.store.lock.read():
            info = self.store._info
            for row in [r for r in self._running if r.task != BASE and r.task not in info]:
                self._finish(row, error=UnknownTaskError(row.task, sorted(info), " (unloaded while generating)"))
            decode = [r for r in self._running if r.prefilled == len(r.prompt)]
            prefill = self._prefill_batch()
            logits = last = torch.zeros(0)
            fused = bool(decode and prefill) and self._fuse(decode, prefill)
            if fused:  # one pass over the weights for both
                decode, positions = self._plan_decode(decode)
                both = self._prefill(prefill, list(zip(decode, positions, strict=True)))
                logits, last = both[: len(decode)], both[len(decode) :]
            else:
                if decode:
                    decode, positions = self._plan_decode(decode)
                    logits = self._forward(decode, [[r.out[-1]] for r in decode], positions, max(positions) + 1)
                if prefill:
                    last = self._prefill(prefill)
        for i, row in enumerate(decode):
            self._advance(row, logits[i])
        for i, (row, n) in enumerate(prefill):
            row.prefilled += n
            chunk += n
            if row.prefilled == len(row.prompt):
                self._advance(row, last[i])
        seconds = time.perf_counter() - start
        self._step_s = 0.9 * self._step_s + 0.1 * seconds
        self._observe("step", rows=len(decode), tasks=len({r.task for r in decode}), prefill_tokens=chunk, prefill_rows=len(prefill), fused=fused, seconds=seconds)  # fmt: skip

    def _prefill_batch(self) -> list[tuple[Row, int]]:
        """The rows still prefilling that this step takes, in arrival order, each with its chunk: at most
        `prefill_chunk` tokens per row and `prefill_tokens` per step (counted padded: rows x longest chunk)."""
        batch: list[tuple[Row, int]] = []
        width = 0
        for row in self._running:
            left = len(row.prompt) - row.prefilled
            if not left:
                continue
            n = min(self.prefill_chunk, left)
            if batch and max(width, n) * (len(batch) + 1) > self.prefill_tokens:
                break
            batch.append((row, n))
            width = max(width, n)
        return batch

    def _fuse(self, decode: list[Row], prefill: list[tuple[Row, int]]) -> bool:
        """Whether this step's decode rows run in the prefill's forward, each left-padded to the chunk width (one
        pass over the weights instead of two): when that padded forward stays within `prefill_tokens` and the
        decode rows' keys/values, gathered from the slots for it, within 4x that (a short prompt joining a few
        decoding rows; not a long chunk beside a big batch)."""
        width = max(n for _, n in prefill)
        longest = max(len(r.prompt) + len(r.out) for r in decode)
        padded = (len(decode) + len(prefill)) * width
        return padded <= self.prefill_tokens and len(decode) * longest <= 4 * self.prefill_tokens

    def _plan_decode(self, rows: list[Row]) -> tuple[list[Row], list[int]]:
        """Plan a decode of `rows` (their last token each) through the cache's decode view; the rows in the view's
        order and the position of each one's new token."""
        assert self._cache is not None
        positions = [len(r.prompt) + len(r.out) - 1 for r in rows]
        order, _ = self._cache.plan_decode([r.key for r in rows], [r.slots for r in rows], positions)
        return [rows[i] for i in order], [positions[i] for i in order]

    def _prefill(self, batch: list[tuple[Row, int]], decode: list[tuple[Row, int]] | None = None) -> torch.Tensor:
        """One forward of the next chunk of each row of `batch`, left-padded to the longest chunk (padding writes
        to the cache's spare slot and is hidden from every real token); the logits of each row's last token. With
        `decode` (rows planned by `_plan_decode`, each with its new token's position), those rows come first, each
        with its new token left-padded to the same width (a decode step fused with the prefill)."""
        assert self._cache is not None
        width = max(n for _, n in batch)
        parts = [(r, p, 1) for r, p in decode or []] + [(r, r.prefilled, n) for r, n in batch]
        length = max(start + n for _, start, n in parts)
        spare = torch.tensor([self._cache.capacity])
        write = torch.cat([torch.cat([spare.expand(width - n), r.slots[start : start + n]]) for r, start, n in parts])  # fmt: skip
        read = torch.stack([_padded(r.slots, start + n, length) for r, start, n in parts])
        self._cache.plan(write, read, view_writes=bool(decode))
        tokens = [[0] * (width - n) + (r.prompt[start : start + n] if start < len(r.prompt) else r.out[-1:]) for r, start, n in parts]  # fmt: skip
        return self._forward([r for r, _, _ in parts], tokens, [start + n - width for _, start, n in parts], length)

    def _forward(self, rows: list[Row], tokens: list[list[int]], firsts: list[int], length: int) -> torch.Tensor:
        """One forward of `rows`, each with as many new `tokens` from position `firsts[i]` (negative for left
        padding) over `length` keys, as the cache was planned; the `(rows, vocab)` logits of each last token."""
        assert self._cache is not None
        device = self._cache.keys[0].device
        new = len(tokens[0])
        mask = attention_mask(firsts, new, length, self._cache.keys[0].dtype, device)
        positions = (torch.tensor(firsts).view(-1, 1) + torch.arange(new)).clamp_(min=0).to(device)
        ids = torch.tensor(tokens, device=device)
        with torch.inference_mode(), mixed_batch(MixedBatch([r.task for r in rows], self.store.routing)):
            out = self.store.model(  # type: ignore[operator]
                input_ids=ids, position_ids=positions, attention_mask=mask, cache=self._cache, use_cache=True,
                logits_to_keep=1,
            )  # fmt: skip
        return out.logits[:, -1].float().cpu()

    def _advance(self, row: Row, logits: torch.Tensor) -> None:
        """Choose the row's next token, publish the text that became final, and end the row if it is done."""
        token = choose(logits, row.params, row.generator)
        row.out.append(token)
        if row.first_token is None:
            row.first_token = time.perf_counter()
            self._observe("first_token", task=row.task, seconds=row.first_token - row.submitted)
        eos = token in self.eos
        if not eos:
            row.tracker.add(row.out)
        if eos or row.tracker.stopped:
            return self._finish(row, "stop")
        if len(row.out) >= row.params.max_tokens:
            return self._finish(row, "length")
        delta = row.tracker.delta(final=False)
        if delta:
            row.handle._publish(delta)

    def _finish(self, row: Row, reason: str = "", error: BaseException | None = None) -> None:
        """Take the row out of the batch, free its tokens, and publish its end."""
        if row in self._running:
            self._running.remove(row)
        elif row in self._waiting:
            self._waiting.remove(row)
        else:
            return
        self._pool.give(row.slots)
        if error is not None:
            return row.handle._publish(error=error)
        delta = row.tracker.delta(final=True)
        completion = Completion(row.tracker.text, reason, len(row.prompt), len(row.out), tuple(row.out))
        row.handle._publish(delta, result=completion)
        seconds = time.perf_counter() - row.submitted
        self._observe("finish", task=row.task, finish_reason=reason, prompt_tokens=len(row.prompt), completion_tokens=len(row.out), seconds=seconds)  # fmt: skip

    def _observe(self, event: str, **data: Any) -> None:
        if self.observer is not None:
            try:
                self.observer.on_generation(event, data)
            except Exception:  # metrics must never stop generation
                logger.exception("generation observer failed on %s", event)
