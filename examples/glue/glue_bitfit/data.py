"""Loading a task's train and dev splits into `datasets`, every malformed file reported in one line; tokenization.

A task is read either from a directory in the layout of GLUE's original download (`<TASK>/train.tsv`,
`<TASK>/dev.tsv`, each task with its own columns) or, without a directory, from the Hugging Face Hub
(`nyu-mll/glue`). The extra single-sentence tasks (TREC, SUBJ, MR, CR, MPQA) read the `<label> <text>` files of
the SentEval-style `sentence/` directory; those without an official dev split are split with a fixed seed.

The files are read here, line by line with the `csv` module (tab-separated, no quoting, as GLUE ships them), so that
every problem -- bad encoding, an empty file, a missing header column, a line with too few or too many fields, a
label outside the task's label set, a score that is not a number -- ends in one `DataFileError` naming the file,
the split, the 1-based line number and what was expected there, before any training starts.
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass
from typing import Any

import datasets

from .tasks import GLUE_TASKS, TASKS, TaskSpec, get_task

__all__ = [
    "GLUE_TASKS",
    "TASKS",
    "DataFileError",
    "TaskSpec",
    "get_task",
    "load_task",
    "subsample",
    "tokenize",
]

# Seed of the fixed train/dev split for the `sentence/` files that ship without one.
SPLIT_SEED = 1234
SPLIT_DEV_FRACTION = 0.1


class DataFileError(ValueError):
    """A malformed data file, in one line: `<file> (<split> split, line <n>): <problem>. Expected <what>.`"""

    def __init__(
        self, path: str, split: str, line: int | None, problem: str, expected: str, unit: str = "line"
    ) -> None:
        where = f"{split} split" + (f", {unit} {line}" if line is not None else "")
        super().__init__(f"{path} ({where}): {problem}. Expected {expected}.")


@dataclass
class _Rows:
    """The columns read from one file (all strings), and the 1-based line each row came from."""

    path: str
    split: str
    columns: dict[str, list[Any]]
    lines: list[int]
    unit: str = "line"

    def error(self, i: int, problem: str, expected: str) -> DataFileError:
        return DataFileError(self.path, self.split, self.lines[i], problem, expected, self.unit)


def _task_files(task: TaskSpec, data_dir: str) -> list[str]:
    root = os.path.join(data_dir, task.dir_name)
    return [os.path.join(root, f) for f in (task.train_file, task.dev_file) if f]


def _read_text(path: str, split: str, errors: str = "strict") -> str:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as err:
        raise DataFileError(path, split, None, f"cannot be read ({err.strerror})", "a readable file") from None
    try:
        return raw.decode("utf-8-sig", errors)
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataFileError(
            path,
            split,
            line,
            f"byte {raw[err.start]:#04x} is not valid UTF-8",
            "a UTF-8 text file (re-save it as UTF-8)",
        ) from None


def _read_tsv(task: TaskSpec, path: str, split: str) -> _Rows:
    """The task's text and label columns of a GLUE `.tsv` file (a header line, except CoLA's)."""
    wanted = [*task.text_columns, task.label_column]
    header = list(task.column_names or ())  # CoLA has no header line: its column names are given
    header_read = bool(task.column_names)
    layout = f"the columns of GLUE's original download for task '{task.name}': text {list(task.text_columns)} and label '{task.label_column}' (check --task and --data-dir)"  # fmt: skip
    rows: list[list[str]] = []
    lines: list[int] = []
    reader = csv.reader(io.StringIO(_read_text(path, split), newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    try:
        for fields in reader:
            if not fields:
                continue  # a blank line (as pandas skips them)
            if not header_read:
                header, header_read = fields, True
                missing = [c for c in wanted if c not in header]
                if missing:
                    raise DataFileError(path, split, reader.line_num, f"the header has no column(s) {missing} (found {header})", layout)  # fmt: skip
            elif len(fields) != len(header):
                raise DataFileError(
                    path, split, reader.line_num,
                    f"{len(fields)} tab-separated field(s) where the header has {len(header)}",
                    f"{len(header)} fields on every line: {'<TAB>'.join(header)}",
                )  # fmt: skip
            else:
                rows.append(fields)
                lines.append(reader.line_num)
    except csv.Error as err:
        raise DataFileError(path, split, reader.line_num, f"unreadable line ({err})", "tab-separated text") from None
    if not rows:
        problem = "no example after the header" if header_read and not task.column_names else "the file is empty"
        raise DataFileError(path, split, None, problem, f"{layout}, then one example a line")
    columns = {c: [r[header.index(c)] for r in rows] for c in wanted}
    return _Rows(path, split, columns, lines)


def _read_label_text(path: str, split: str) -> _Rows:
    """One `<label> <text>` example a line (blank lines skipped)."""
    # These files mix encodings (MR, SUBJ and TREC hold Latin-1 bytes): undecodable bytes become U+FFFD.
    text = _read_text(path, split, errors="replace")
    labels: list[str] = []
    texts: list[str] = []
    lines: list[int] = []
    for lineno, line in enumerate(io.StringIO(text, newline=None), 1):
        line = line.strip()
        if line:
            # A label with no text is kept as an empty example: the real CR and MPQA files hold a few (`0 `).
            label, _, sentence = line.partition(" ")
            labels.append(label)
            texts.append(sentence)
            lines.append(lineno)
    if not lines:
        raise DataFileError(path, split, None, "the file is empty", "one `<label> <text>` example a line")
    return _Rows(path, split, {"label": labels, "text": texts}, lines)


def _normalise(task: TaskSpec, rows: _Rows) -> datasets.Dataset:
    """Columns `text_a`, `text_b` (`None` for single sentences) and `labels` (class index, or float score)."""
    values = [str(v).strip() for v in rows.columns[task.label_column]]
    labels: list[float] | list[int]
    if task.labels is None:
        scores: list[float] = []
        for i, v in enumerate(values):
            try:
                score = float(v)
            except ValueError:
                score = math.nan
            if not math.isfinite(score):
                raise rows.error(i, f"score {v!r} in column '{task.label_column}' is not a number", f"a number on every line (task '{task.name}' is a regression)")  # fmt: skip
            scores.append(score)
        labels = scores
    else:
        index = {lab: i for i, lab in enumerate(task.labels)}
        for i, v in enumerate(values):
            if v not in index:
                fmt = "a line `<label> <text>` with <label>" if task.fmt == "label_text" else "a label"
                raise rows.error(i, f"label {v!r} is not in the task's label set {list(task.labels)}", f"{fmt} in that set (check that --task matches the data in --data-dir)")  # fmt: skip
        labels = [index[v] for v in values]
    texts = rows.columns[task.text_columns[0]]
    text_b = rows.columns[task.text_columns[1]] if len(task.text_columns) > 1 else [None] * len(texts)
    return datasets.Dataset.from_dict({"text_a": [str(t) for t in texts], "text_b": text_b, "labels": labels})


def _load_files(task: TaskSpec, data_dir: str) -> datasets.DatasetDict:
    if not os.path.isdir(data_dir):
        raise ValueError(f"--data-dir '{data_dir}' is not a directory. Pass the folder that holds <TASK>/train.tsv.")
    paths = _task_files(task, data_dir)
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        wanted = " and ".join(os.path.join(task.dir_name, f) for f in (task.train_file, task.dev_file) if f)
        raise ValueError(
            f"Task '{task.name}' needs {wanted} under --data-dir '{data_dir}', but {', '.join(missing)} does not "
            "exist. --data-dir must be laid out like GLUE's original download (<TASK>/train.tsv, <TASK>/dev.tsv)."
        )
    splits = dict(zip(("train", "dev"), paths, strict=False))
    read = (lambda p, s: _read_tsv(task, p, s)) if task.fmt == "tsv" else _read_label_text
    loaded = {split: _normalise(task, read(path, split)) for split, path in splits.items()}
    if "dev" not in loaded:  # no official dev file: a fixed split of the one file
        parts = loaded["train"].train_test_split(test_size=SPLIT_DEV_FRACTION, seed=SPLIT_SEED)
        loaded = {"train": parts["train"], "dev": parts["test"]}
    return datasets.DatasetDict(loaded)


def _load_hub(task: TaskSpec) -> datasets.DatasetDict:
    if task.hub is None:
        raise ValueError(f"Task '{task.name}' is not on the Hub here: pass --data-dir with its files.")
    path, config, dev_split = task.hub
    raw = datasets.load_dataset(path, config)
    names = raw["train"].features["label"]
    # The Hub stores class indices; map them back to the label strings of the original files.
    label_of = (lambda i: task.labels[i]) if task.labels else (lambda v: v)  # noqa: E731
    if task.labels and getattr(names, "names", None):
        label_of = lambda i: names.names[i] if names.names[i] in task.labels else str(i)  # noqa: E731
    hub_columns = task.hub_text_columns or task.text_columns
    out = {}
    for split, hub_split in (("train", "train"), ("dev", dev_split)):
        ds = raw[hub_split]
        columns = {new: ds[old] for old, new in zip(hub_columns, task.text_columns, strict=True)}
        columns[task.label_column] = [label_of(v) for v in ds["label"]]
        rows = _Rows(f"{path}:{config}", split, columns, list(range(1, len(ds) + 1)), unit="row")
        out[split] = _normalise(task, rows)
    return datasets.DatasetDict(out)


def load_task(task: TaskSpec, data_dir: str | None) -> datasets.DatasetDict:
    """Load `task` into a `DatasetDict` with `train` and `dev` splits, columns `text_a`, `text_b`, `labels`.

    Args:
        task (`TaskSpec`): The task.
        data_dir (`str | None`): A GLUE-layout directory (for the `sentence/` tasks: the directory holding the
            `<label> <text>` files); `None` loads the task from the Hub.

    Raises:
        `ValueError`: the directory or its files are missing. `DataFileError` (a `ValueError`): a file is malformed
            (encoding, empty, header, a line's field count, a label outside the task's label set, a non-numeric
            score); the message names the file, the split and the line.

    Example:

    >>> ds = load_task(get_task("sst2"), "../shared/data/glue")  # doctest: +SKIP
    >>> ds["dev"].column_names
    ['text_a', 'text_b', 'labels']
    """
    return _load_hub(task) if data_dir is None else _load_files(task, data_dir)


def subsample(ds: datasets.Dataset, size: int | None, seed: int) -> datasets.Dataset:
    """A seeded subset of `size` examples (all of `ds` when `size` is `None` or not smaller than `len(ds)`)."""
    if size is None or size >= len(ds):
        return ds
    if size <= 0:
        raise ValueError(f"--train-size must be positive, got {size}.")
    return ds.shuffle(seed=seed).select(range(size))


def tokenize(ds: datasets.Dataset, tokenizer: Any, max_length: int) -> datasets.Dataset:
    """Tokenize `text_a` (and `text_b` for sentence pairs, as one pair with segment ids), truncated to `max_length`."""
    pair = any(t is not None for t in ds["text_b"][:1])

    def encode(batch: dict[str, list]) -> Any:
        args = (batch["text_a"], batch["text_b"]) if pair else (batch["text_a"],)
        return tokenizer(*args, truncation=True, max_length=max_length)

    return ds.map(encode, batched=True, remove_columns=["text_a", "text_b"], load_from_cache_file=False)
