"""Per-thread setup of the threads that run the model (the generation engine's, the predict batcher's)."""

from __future__ import annotations

__all__ = ["prepare_worker_thread"]


def prepare_worker_thread() -> None:
    """Make a worker thread run torch's kernels as fast as the main thread (see docs/serving.md)."""
