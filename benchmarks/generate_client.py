"""The streaming client of the generation case (`case_generate`): OpenAI `/v1/completions` with `stream: true`
over httpx, recording when each server-sent chunk with text arrives.

Per request: time to first token (send -> first chunk with text), the gaps between text chunks (inter-token latency;
a chunk may carry more than one token when the server holds text back, e.g. a partial UTF-8 character), the latency
(send -> `[DONE]`) and the completion tokens (the last chunk's `usage` when the server sends it, else the number of
text chunks). Every request is greedy (`temperature` 0) and bounded by the client's timeout.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any


async def stream_one(client: Any, model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    """One streamed completion: `{"ttft_s", "gaps_s", "latency_s", "tokens", "text", "finish", "error"}`."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    sent = time.perf_counter()
    arrivals: list[float] = []
    texts: list[str] = []
    usage: int | None = None
    finish: str | None = None
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            detail = (await response.aread()).decode(errors="replace")[:300]
            return {"error": f"HTTP {response.status_code}: {detail}", "latency_s": time.perf_counter() - sent}
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: ") :]
            if data.strip() == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                return {"error": str(event["error"])[:300], "latency_s": time.perf_counter() - sent}
            for choice in event.get("choices") or []:
                if choice.get("text"):
                    arrivals.append(time.perf_counter())
                    texts.append(choice["text"])
                finish = choice.get("finish_reason") or finish
            if event.get("usage"):
                usage = event["usage"].get("completion_tokens")
    latency = time.perf_counter() - sent
    return {
        "ttft_s": (arrivals[0] - sent) if arrivals else latency,
        "gaps_s": [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)],
        "latency_s": latency,
        "tokens": usage if usage is not None else len(arrivals),
        "text": "".join(texts),
        "finish": finish,
        "error": None,
    }


def _client(url: str, width: int, timeout: float) -> Any:
    import httpx

    limits = httpx.Limits(max_connections=width, max_keepalive_connections=width)
    return httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarize(results: list[dict[str, Any]], elapsed: float) -> dict[str, Any]:
    """Output tokens/s over the run's wall time, TTFT and inter-token latency p50/p99, errors."""
    ok = [r for r in results if not r.get("error")]
    tokens = sum(r["tokens"] for r in ok)
    ttft = [r["ttft_s"] for r in ok]
    gaps = [g for r in ok for g in r["gaps_s"]]
    return {
        "requests": len(ok), "errors": len(results) - len(ok), "tokens": tokens, "seconds": elapsed,
        "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0, "tokens_per_request": tokens / len(ok) if ok else 0.0,
        "ttft_p50_s": percentile(ttft, 0.5), "ttft_p99_s": percentile(ttft, 0.99),
        "itl_p50_s": percentile(gaps, 0.5), "itl_p99_s": percentile(gaps, 0.99),
        "first_error": next((r["error"] for r in results if r.get("error")), None),
    }  # fmt: skip


async def _load(url: str, models: list[str], prompts: list[str], concurrency: int, per_stream: int, max_tokens: int,
                timeout: float) -> dict[str, Any]:  # fmt: skip
    results: list[dict[str, Any]] = []
    async with _client(url, concurrency, timeout) as client:

        async def stream(i: int) -> None:
            for j in range(per_stream):
                n = i * per_stream + j  # request n goes to model n % len(models): exactly spread over the models
                try:
                    res = await stream_one(client, models[n % len(models)], prompts[n % len(prompts)], max_tokens)
                except Exception as exc:  # a failed request is counted, not fatal to the run
                    res = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                results.append(res)

        start = time.perf_counter()
        tasks = [asyncio.create_task(stream(i)) for i in range(concurrency)]
        _, unfinished = await asyncio.wait(tasks, timeout=timeout)
        for task in unfinished:  # past the bound: what finished is kept, the rest is counted as errors
            task.cancel()
        await asyncio.gather(*unfinished, return_exceptions=True)
        elapsed = time.perf_counter() - start
    out = summarize(results, elapsed)
    out["unfinished"] = concurrency * per_stream - len(results)
    out["errors"] += out["unfinished"]
    if out["unfinished"] and not out["first_error"]:
        out["first_error"] = f"{out['unfinished']} request(s) unfinished after {timeout:.1f} s"
    return out


def load_run(url: str, models: list[str], prompts: list[str], *, concurrency: int, per_stream: int, max_tokens: int,
             timeout: float = 600.0) -> dict[str, Any]:  # fmt: skip
    """`concurrency` streams, each sending `per_stream` requests one after the other (fixed work per run: the same
    requests for every variant), bounded by `timeout` seconds in all; the `summarize` of its requests, where requests
    still unfinished at the bound (`unfinished`) count as errors and the tokens/s is over the bound."""
    return asyncio.run(_load(url, models, prompts, concurrency, per_stream, max_tokens, timeout))


def single(url: str, model: str, prompt: str, max_tokens: int, timeout: float = 600.0) -> dict[str, Any]:
    """One request alone."""

    async def go() -> dict[str, Any]:
        async with _client(url, 2, timeout) as client:
            return await asyncio.wait_for(stream_one(client, model, prompt, max_tokens), timeout)

    return asyncio.run(go())


def head_of_line(url: str, models: tuple[str, str], prompts: tuple[str, str], tokens: tuple[int, int], delay: float,
                 timeout: float = 600.0) -> dict[str, Any]:  # fmt: skip
    """A `tokens[0]`-token request, then `delay` s later a `tokens[1]`-token one: both requests' results."""

    async def go() -> dict[str, Any]:
        async with _client(url, 4, timeout) as client:
            long = asyncio.create_task(stream_one(client, models[0], prompts[0], tokens[0]))
            await asyncio.sleep(delay)
            short = await asyncio.wait_for(stream_one(client, models[1], prompts[1], tokens[1]), timeout)
            return {"long": await asyncio.wait_for(long, timeout), "short": short}

    return asyncio.run(go())
