"""Drop the import-time noise of optional dependencies that says nothing about BitFit, and only that.

torchao (which peft imports when it is installed, e.g. for quantized bases) logs one warning per CUDA kernel library
it cannot load on a CPU build of torch, and its enum registrations make torch log a deprecation line; bitsandbytes
warns that an optional kernel package for CPU 4-bit matmuls is absent (it uses its own). On a CPU
machine every `bitfit-peft` command and training run would start with those lines. A logging filter on those two
loggers drops exactly these messages; everything else they log still shows.
"""

from __future__ import annotations

import logging

__all__ = ["quiet_optional_imports"]

_NOISE = {
    "torchao": ("Failed to load", "Could not load this library"),
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported",),
    # bitsandbytes looks for an optional hub kernel (`kernels`) for CPU 4-bit matmuls and falls back to its own
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
}


class _Drop(logging.Filter):
    """Drops records whose message contains one of `needles`."""

    def __init__(self, needles: tuple[str, ...]) -> None:
        super().__init__()
        self.needles = needles

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(needle in message for needle in self.needles)


def quiet_optional_imports() -> None:
    """Install the filters (once; calling again adds nothing)."""
    for name, needles in _NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) for f in logger.filters):
            logger.addFilter(_Drop(needles))


quiet_optional_imports()  # on import: `bitfit_peft/__init__.py` imports this module before anything imports peft
