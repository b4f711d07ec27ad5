"""Malformed data files: each ends train.py in one `error:` line naming file, split, line and what was expected.

A table of malformed files (TSV and `<label> <text>`) x the CLI behaviour: exit code 2, the exact message as the
last stderr line, no traceback, nothing written to --output-dir. Plus: the loader reads the well-formed files the
same way whatever their blank lines, and keeps the real CR/MPQA files' label-only lines.
"""

from __future__ import annotations

import os
import pathlib
import shutil
from dataclasses import dataclass

import pytest
import torch
from glue_helpers import make_tiny_glue, make_tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(1)

from glue_bitfit import data as glue_data  # noqa: E402
from glue_bitfit import train  # noqa: E402

SST_COLUMNS = "the columns of GLUE's original download for task 'sst2': text ['sentence'] and label 'label' (check --task and --data-dir)"  # fmt: skip
IN_LABEL_SET = "in that set (check that --task matches the data in --data-dir)"


@dataclass(frozen=True)
class Case:
    """One malformed file: task, the file (relative to --data-dir), its bytes, and the message expected after `error: `."""

    name: str
    task: str
    file: str
    content: bytes
    message: str  # `{path}` is replaced by the file's full path


STS_HEADER = b"index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
STS_ROW = b"0\tg\tf\t2012\t0\tnone\tnone\ta good movie\ta great film\t"

CASES = [
    Case(
        "missing-field", "sst2", "SST-2/dev.tsv", b"sentence\tlabel\ngood movie\t1\nbad movie\n",
        "{path} (dev split, line 3): 1 tab-separated field(s) where the header has 2. "
        "Expected 2 fields on every line: sentence<TAB>label.",
    ),
    Case(
        "extra-field-after-blank-line", "sst2", "SST-2/train.tsv", b"sentence\tlabel\n\ngood movie\t1\textra\n",
        "{path} (train split, line 3): 3 tab-separated field(s) where the header has 2. "
        "Expected 2 fields on every line: sentence<TAB>label.",
    ),
    Case(
        "renamed-header-column", "sst2", "SST-2/dev.tsv", b"text\tlabel\nhello\t1\n",
        "{path} (dev split, line 1): the header has no column(s) ['sentence'] (found ['text', 'label']). "
        f"Expected {SST_COLUMNS}.",
    ),
    Case(
        "empty-file", "sst2", "SST-2/dev.tsv", b"",
        f"{{path}} (dev split): the file is empty. Expected {SST_COLUMNS}, then one example a line.",
    ),
    Case(
        "header-only", "sst2", "SST-2/train.tsv", b"sentence\tlabel\n",
        f"{{path}} (train split): no example after the header. Expected {SST_COLUMNS}, then one example a line.",
    ),
    Case(
        "non-numeric-label", "sst2", "SST-2/dev.tsv", b"sentence\tlabel\ngood movie\t1\nbad movie\tneg\n",
        f"{{path}} (dev split, line 3): label 'neg' is not in the task's label set ['0', '1']. "
        f"Expected a label {IN_LABEL_SET}.",
    ),
    Case(
        "out-of-range-label", "sst2", "SST-2/train.tsv", b"sentence\tlabel\ngood movie\t1\nbad movie\t2\n",
        f"{{path}} (train split, line 3): label '2' is not in the task's label set ['0', '1']. "
        f"Expected a label {IN_LABEL_SET}.",
    ),
    Case(
        "non-utf8", "sst2", "SST-2/dev.tsv", b"sentence\tlabel\ngood movie\t1\ncaf\xe9 movie\t0\n",
        "{path} (dev split, line 3): byte 0xe9 is not valid UTF-8. Expected a UTF-8 text file (re-save it as UTF-8).",
    ),
    Case(
        "non-numeric-score", "stsb", "STS-B/dev.tsv", STS_HEADER + STS_ROW + b"4.2\n" + STS_ROW + b"high\n",
        "{path} (dev split, line 3): score 'high' in column 'score' is not a number. "
        "Expected a number on every line (task 'stsb' is a regression).",
    ),
    Case(
        "nan-score", "stsb", "STS-B/train.tsv", STS_HEADER + STS_ROW + b"nan\n",
        "{path} (train split, line 2): score 'nan' in column 'score' is not a number. "
        "Expected a number on every line (task 'stsb' is a regression).",
    ),
    Case(
        "label-text-bad-line", "trec", "TREC.test.all", b"0 what is a movie ?\n\nLOC:city where is it ?\n",
        "{path} (dev split, line 3): label 'LOC:city' is not in the task's label set ['0', '1', '2', '3', '4', '5']. "
        f"Expected a line `<label> <text>` with <label> {IN_LABEL_SET}.",
    ),
    Case(
        "label-text-empty", "trec", "TREC.train.all", b"\n\n",
        "{path} (train split): the file is empty. Expected one `<label> <text>` example a line.",
    ),
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("glue_data")
    data = make_tiny_glue(root / "data")
    trec = "\n".join(f"{i % 6} what is example number {i} ?" for i in range(24))
    for name in ("TREC.train.all", "TREC.test.all"):
        (root / "data" / name).write_text(trec + "\n")
    return {"model": make_tiny_model(root / "model", dropout=0.0), "data": data}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_malformed_file_is_one_error_line(
    case: Case, tiny: dict[str, str], tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny["data"], data)
    (data / case.file).write_bytes(case.content)
    out = tmp_path / "out"
    argv = ["--model", tiny["model"], "--data-dir", str(data), "--task", case.task, "--output-dir", str(out)]
    assert train.main([*argv, "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == "error: " + case.message.format(path=data / case.file)
    assert not out.exists()


def test_loader_raises_data_file_error(tiny: dict[str, str], tmp_path: pathlib.Path) -> None:
    """The same errors through the library call: a `DataFileError`, which is a `ValueError`."""
    shutil.copytree(tiny["data"], tmp_path / "data")
    (tmp_path / "data" / "SST-2" / "dev.tsv").write_text("sentence\tlabel\ngood\t1\nbad\n")
    with pytest.raises(glue_data.DataFileError, match=r"dev\.tsv \(dev split, line 3\): 1 tab-separated field"):
        glue_data.load_task(glue_data.get_task("sst2"), str(tmp_path / "data"))
    assert issubclass(glue_data.DataFileError, ValueError)


def test_blank_lines_and_crlf_read_like_plain_lines(tmp_path: pathlib.Path) -> None:
    rows = ["sentence\tlabel", "a good movie\t1", "a bad movie\t0", 'quite "dull"\t0']
    for name, text in (("plain", "\n".join(rows) + "\n"), ("messy", "\r\n".join(rows[:2] + [""] + rows[2:]) + "\r\n\r\n")):  # fmt: skip
        (tmp_path / name / "SST-2").mkdir(parents=True)
        for split in ("train.tsv", "dev.tsv"):
            (tmp_path / name / "SST-2" / split).write_text(text, newline="")
    plain = glue_data.load_task(glue_data.get_task("sst2"), str(tmp_path / "plain"))
    messy = glue_data.load_task(glue_data.get_task("sst2"), str(tmp_path / "messy"))
    assert plain["train"].to_dict() == messy["train"].to_dict()
    assert plain["train"]["text_a"][2] == 'quite "dull"' and list(plain["train"]["labels"]) == [1, 0, 0]


def test_label_only_lines_are_kept_as_empty_examples(tmp_path: pathlib.Path) -> None:
    """The real CR and MPQA files hold a few `0 ` lines; they load (as empty texts) instead of failing."""
    lines = [f"{i % 2} sentence number {i}" for i in range(20)] + ["0 ", "1"]
    (tmp_path / "mpqa.all").write_text("\n".join(lines) + "\n")
    ds = glue_data.load_task(glue_data.get_task("mpqa"), str(tmp_path))
    texts = list(ds["train"]["text_a"]) + list(ds["dev"]["text_a"])
    assert len(texts) == 22 and texts.count("") == 2
