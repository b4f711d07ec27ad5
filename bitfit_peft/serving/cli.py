"""The `serve` command: build `ServeSettings` from flags and run the app with uvicorn.

`add_serve_parser(subparsers)` adds `serve` to the `bitfit-peft` console script; `python -m bitfit_peft.serving.cli
serve ...` runs it alone. The only environment read anywhere in the server is here: the admin API key comes from the
variable named by `--api-key-env` (default `BITFIT_SERVE_API_KEY`), so the key never shows in the process list.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["DEFAULT_API_KEY_ENV", "add_serve_parser", "main", "run_serve", "settings_from_args"]

DEFAULT_API_KEY_ENV = "BITFIT_SERVE_API_KEY"
logger = logging.getLogger(__name__)


class _DefaultsFormatter(argparse.HelpFormatter):
    """Show `(default: X)` only where there is one to show: not on required options, not for a None default, and not
    where the help text already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.required or action.default in (None, argparse.SUPPRESS) or "default" in text:
            return text
        return f"{text} (default: %(default)s)"


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `serve` subcommand to an `argparse` subparsers object; its handler is `args.func = run_serve`."""
    p = subparsers.add_parser(
        "serve",
        help="Serve every adapter of a directory over HTTP, micro-batched across tasks.",
        description="Serve the BitFit adapters in --adapters on one --base model over HTTP (OpenAPI page at /docs).",
        formatter_class=_DefaultsFormatter,
    )
    p.add_argument("--base", required=True, help="Base model: a local directory or a hub id.")
    p.add_argument("--adapters", required=True, help="Directory of adapters, one per task: <adapters>/<task>/.")
    p.add_argument("--host", default="127.0.0.1", help="Interface to listen on (0.0.0.0: every interface).")
    p.add_argument("--port", type=int, default=8000, help="Port (0: any free port, printed at startup).")
    p.add_argument("--max-batch-size", type=int, default=32, help="Most items per micro-batch.")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="How long a batch waits for more items.")
    p.add_argument("--max-queue", type=int, default=1024, help="Most queued items; beyond it requests get 429.")
    p.add_argument("--max-length", type=int, default=128, help="Longest input in tokens (413 beyond, or truncate).")
    p.add_argument("--max-items-per-request", type=int, default=256, help="Most items in one mixed request.")
    p.add_argument("--max-new-tokens", type=int, default=256, help="Largest max_tokens a generation request may ask.")
    p.add_argument("--max-tokens-in-flight", type=int, default=16384,
                   help="Generation KV budget: prompt + max_tokens of all running requests; beyond it 429.")  # fmt: skip
    p.add_argument("--max-running", type=int, default=64, help="Most generation requests decoding at once.")
    p.add_argument("--prefill-chunk", type=int, default=128,
                   help="Prompt tokens prefilled per engine step (long prompts do not stall running decodes).")  # fmt: skip
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"), help="Model dtype.")
    p.add_argument("--device", default="cpu", help="torch device of the model (cpu, cuda, cuda:1, ...).")
    p.add_argument(
        "--forward-cost-tokens",
        type=float,
        default=None,
        help="What one more forward costs, in padded tokens: micro-batches are sorted by length and cut where padding "
        "costs more (default: 32 on CPU, measured; one forward per batch on other devices; inf: never cut).",
    )
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice).")
    p.add_argument(
        "--api-key-env",
        default=DEFAULT_API_KEY_ENV,
        help="Environment variable holding the API key that the admin routes (load/hotswap/unload) require as "
        "`Authorization: Bearer <key>`; unset or empty: admin routes are open.",
    )
    p.add_argument("--request-timeout", type=float, default=60.0, help="Seconds before a waiting request gets 504.")
    p.add_argument("--retry-after", type=int, default=1, help="Retry-After seconds of 429 and 503 answers.")
    p.add_argument("--metrics-max-tasks", type=int, default=64, help="Tasks with their own label in /metrics.")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="Seconds to finish in-flight work at SIGTERM.")
    p.add_argument(
        "--log-level",
        default="info",
        choices=("critical", "error", "warning", "info", "debug"),
        help="Server log level.",
    )
    p.set_defaults(func=run_serve)
    return p


def settings_from_args(args: argparse.Namespace, environ: dict[str, str] | None = None) -> Any:
    """`ServeSettings` from parsed flags; the API key is read from `environ` (default: the process environment)."""
    from .server import ServeSettings

    env = os.environ if environ is None else environ
    return ServeSettings(
        base=args.base,
        adapters=args.adapters,
        host=args.host,
        port=args.port,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        max_length=args.max_length,
        max_items_per_request=args.max_items_per_request,
        max_new_tokens=args.max_new_tokens,
        max_tokens_in_flight=args.max_tokens_in_flight,
        max_running=args.max_running,
        prefill_chunk=args.prefill_chunk,
        dtype=args.dtype,
        device=args.device,
        forward_cost_tokens=args.forward_cost_tokens,
        threads=args.threads,
        api_key=env.get(args.api_key_env) or None,
        request_timeout_s=args.request_timeout,
        retry_after_s=args.retry_after,
        metrics_max_tasks=args.metrics_max_tasks,
        drain_timeout_s=args.drain_timeout,
    )


def run_serve(args: argparse.Namespace) -> int:
    """Run the server until SIGINT/SIGTERM (which drain in-flight requests first); return the exit code."""
    try:
        import uvicorn

        from .server import create_app
    except ImportError as exc:
        print(f"error: `bitfit-peft serve` needs the serve extra ({exc}): pip install 'bitfit-peft[serve]'", file=sys.stderr)  # fmt: skip
        return 2
    if not os.path.isdir(args.adapters):
        print(f"error: --adapters {args.adapters} is not a directory: pass the folder holding <task>/ adapters.", file=sys.stderr)  # fmt: skip
        return 2
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if settings.threads is not None:
        import torch

        torch.set_num_threads(settings.threads)
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=int(settings.drain_timeout_s) or None,
    )
    server = uvicorn.Server(config)
    server.run()  # exits the process with code 3 if the app fails to start (uvicorn's STARTUP_FAILURE)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bitfit-peft", description="bitfit-peft serving commands.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(subparsers)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
