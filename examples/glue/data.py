"""GLUE (and a few single-sentence) task definitions, loading with `datasets`, validation and tokenization.

A task is read either from a directory in the layout of GLUE's original download (`<TASK>/train.tsv`,
`<TASK>/dev.tsv`, each task with its own columns) or, without a directory, from the Hugging Face Hub
(`nyu-mll/glue`). The extra single-sentence tasks (TREC, SUBJ, MR, CR, MPQA) read the `<label> <text>` files of
the SentEval-style `sentence/` directory; those without an official dev split are split with a fixed seed.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from typing import Any

import datasets

# Seed of the fixed train/dev split for the `sentence/` files that ship without one.
SPLIT_SEED = 1234
SPLIT_DEV_FRACTION = 0.1


@dataclass(frozen=True)
class TaskSpec:
    """One task: where its files are, which columns hold text and label, and how it is scored.

    Args:
        name (`str`): The CLI name, e.g. `"sst2"`.
        dir_name (`str`): Sub-directory of `--data-dir`, e.g. `"SST-2"`.
        train_file (`str`): Training file inside `dir_name`.
        dev_file (`str`): Dev file inside `dir_name`.
        text_columns (`tuple[str, ...]`): One column (single sentence) or two (sentence pair).
        label_column (`str`): Column holding the label (or the score for regression).
        labels (`tuple[str, ...] | None`): The label set as written in the file; `None` for regression.
        metrics (`tuple[str, ...]`): Metrics reported, the first is the one used to pick the best epoch.
        column_names (`tuple[str, ...] | None`): Column names for files without a header (CoLA).
        hub (`tuple[str, str, str] | None`): `(dataset, config, dev split)` on the Hub; `None` if not there.
        hub_text_columns (`tuple[str, ...] | None`): Text columns of the Hub version when they differ.
        fmt (`str`): `"tsv"` (GLUE) or `"label_text"` (one `<label> <text>` example a line).
    """

    name: str
    dir_name: str
    train_file: str
    dev_file: str
    text_columns: tuple[str, ...]
    label_column: str
    labels: tuple[str, ...] | None
    metrics: tuple[str, ...]
    column_names: tuple[str, ...] | None = None
    hub: tuple[str, str, str] | None = None
    hub_text_columns: tuple[str, ...] | None = None
    fmt: str = "tsv"

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    @property
    def main_metric(self) -> str:
        return self.metrics[0]


_NLI = ("entailment", "not_entailment")
_GLUE = "nyu-mll/glue"

TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in [
        TaskSpec(
            "cola", "CoLA", "train.tsv", "dev.tsv", ("sentence",), "label", ("0", "1"), ("mcc", "accuracy"),
            column_names=("source", "label", "original_label", "sentence"), hub=(_GLUE, "cola", "validation"),
        ),
        TaskSpec(
            "sst2", "SST-2", "train.tsv", "dev.tsv", ("sentence",), "label", ("0", "1"), ("accuracy",),
            hub=(_GLUE, "sst2", "validation"),
        ),
        TaskSpec(
            "mrpc", "MRPC", "train.tsv", "dev.tsv", ("#1 String", "#2 String"), "Quality", ("0", "1"),
            ("f1", "accuracy"), hub=(_GLUE, "mrpc", "validation"), hub_text_columns=("sentence1", "sentence2"),
        ),
        TaskSpec(
            "stsb", "STS-B", "train.tsv", "dev.tsv", ("sentence1", "sentence2"), "score", None,
            ("pearson", "spearman"), hub=(_GLUE, "stsb", "validation"),
        ),
        TaskSpec(
            "qqp", "QQP", "train.tsv", "dev.tsv", ("question1", "question2"), "is_duplicate", ("0", "1"),
            ("f1", "accuracy"), hub=(_GLUE, "qqp", "validation"),
        ),
        TaskSpec(
            "mnli", "MNLI", "train.tsv", "dev_matched.tsv", ("sentence1", "sentence2"), "gold_label",
            ("entailment", "neutral", "contradiction"), ("accuracy",), hub=(_GLUE, "mnli", "validation_matched"),
            hub_text_columns=("premise", "hypothesis"),
        ),
        TaskSpec(
            "qnli", "QNLI", "train.tsv", "dev.tsv", ("question", "sentence"), "label", _NLI, ("accuracy",),
            hub=(_GLUE, "qnli", "validation"),
        ),
        TaskSpec(
            "rte", "RTE", "train.tsv", "dev.tsv", ("sentence1", "sentence2"), "label", _NLI, ("accuracy",),
            hub=(_GLUE, "rte", "validation"),
        ),
        TaskSpec(
            "wnli", "WNLI", "train.tsv", "dev.tsv", ("sentence1", "sentence2"), "label", ("0", "1"), ("accuracy",),
            hub=(_GLUE, "wnli", "validation"),
        ),
        # Single-sentence tasks from the `sentence/` directory (`<label> <text>` lines).
        TaskSpec("trec", "", "TREC.train.all", "TREC.test.all", ("text",), "label", tuple("012345"), ("accuracy",), fmt="label_text"),
        TaskSpec("subj", "", "subj.all", "", ("text",), "label", ("0", "1"), ("accuracy",), fmt="label_text"),
        TaskSpec("mr", "", "rt-polarity.all", "", ("text",), "label", ("0", "1"), ("accuracy",), fmt="label_text"),
        TaskSpec("cr", "", "custrev.all", "", ("text",), "label", ("0", "1"), ("accuracy",), fmt="label_text"),
        TaskSpec("mpqa", "", "mpqa.all", "", ("text",), "label", ("0", "1"), ("accuracy",), fmt="label_text"),
    ]
}  # fmt: skip

GLUE_TASKS = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli")


def get_task(name: str) -> TaskSpec:
    """Return the spec of task `name` (case-insensitive; `sst-2` and `sts-b` are accepted too)."""
    key = name.lower().replace("-", "")
    if key not in TASKS:
        raise ValueError(f"Unknown task '{name}'. Choose one of: {', '.join(TASKS)}.")
    return TASKS[key]


def _task_files(task: TaskSpec, data_dir: str) -> list[str]:
    root = os.path.join(data_dir, task.dir_name)
    return [os.path.join(root, f) for f in (task.train_file, task.dev_file) if f]


def _load_tsv(task: TaskSpec, data_dir: str) -> datasets.DatasetDict:
    train_path, dev_path = _task_files(task, data_dir)
    header_kwargs: dict[str, Any] = (
        {"column_names": list(task.column_names), "header": None} if task.column_names else {}
    )
    raw: Any = datasets.load_dataset(
        "csv",
        data_files={"train": train_path, "dev": dev_path},
        delimiter="\t",
        quoting=csv.QUOTE_NONE,
        na_filter=False,
        **header_kwargs,
    )
    for split, path in (("train", train_path), ("dev", dev_path)):
        missing = [c for c in (*task.text_columns, task.label_column) if c not in raw[split].column_names]
        if missing:
            raise ValueError(
                f"{path} has no column(s) {missing} (found {raw[split].column_names}). Task '{task.name}' expects "
                f"the columns of GLUE's original download: text {list(task.text_columns)}, label "
                f"'{task.label_column}'. Check --task and --data-dir."
            )
    return raw


def _load_label_text(task: TaskSpec, data_dir: str) -> datasets.DatasetDict:
    def parse(path: str) -> datasets.Dataset:
        labels, texts = [], []
        with open(path, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                label, _, text = line.partition(" ")
                if not text:
                    raise ValueError(f"{path} line {lineno}: expected '<label> <text>', got {line[:60]!r}.")
                labels.append(label)
                texts.append(text)
        return datasets.Dataset.from_dict({"label": labels, "text": texts})

    train_path, *rest = _task_files(task, data_dir)
    train = parse(train_path)
    if rest:
        return datasets.DatasetDict({"train": train, "dev": parse(rest[0])})
    split = train.train_test_split(test_size=SPLIT_DEV_FRACTION, seed=SPLIT_SEED)
    return datasets.DatasetDict({"train": split["train"], "dev": split["test"]})


def _load_hub(task: TaskSpec) -> datasets.DatasetDict:
    if task.hub is None:
        raise ValueError(f"Task '{task.name}' is not on the Hub here: pass --data-dir with its files.")
    path, config, dev_split = task.hub
    raw = datasets.load_dataset(path, config)
    out = datasets.DatasetDict({"train": raw["train"], "dev": raw[dev_split]})
    names = raw["train"].features["label"]
    # The Hub stores class indices; map them back to the label strings of the original files.
    label_of = (lambda i: task.labels[i]) if task.labels else (lambda v: v)  # noqa: E731
    if task.labels and getattr(names, "names", None):
        label_of = lambda i: names.names[i] if names.names[i] in task.labels else str(i)  # noqa: E731
    renames = dict(zip(task.hub_text_columns or task.text_columns, task.text_columns, strict=True))
    return out.map(
        lambda ex: {**{new: ex[old] for old, new in renames.items()}, task.label_column: label_of(ex["label"])},
        remove_columns=[c for c in out["train"].column_names if c not in renames],
    )


def load_task(task: TaskSpec, data_dir: str | None) -> datasets.DatasetDict:
    """Load `task` into a `DatasetDict` with `train` and `dev` splits, columns `text_a`, `text_b`, `labels`.

    Args:
        task (`TaskSpec`): The task.
        data_dir (`str | None`): A GLUE-layout directory (for the `sentence/` tasks: the directory holding the
            `<label> <text>` files); `None` loads the task from the Hub.

    Raises:
        `ValueError`: the directory or its files are missing, a column is missing, or a label is outside the
            task's label set.
    """
    if data_dir is None:
        raw = _load_hub(task)
    else:
        if not os.path.isdir(data_dir):
            raise ValueError(
                f"--data-dir '{data_dir}' is not a directory. Pass the folder that holds <TASK>/train.tsv."
            )
        missing = [p for p in _task_files(task, data_dir) if not os.path.isfile(p)]
        if missing:
            wanted = " and ".join(os.path.join(task.dir_name, f) for f in (task.train_file, task.dev_file) if f)
            raise ValueError(
                f"Task '{task.name}' needs {wanted} under --data-dir '{data_dir}', but {', '.join(missing)} does not "
                "exist. --data-dir must be laid out like GLUE's original download (<TASK>/train.tsv, <TASK>/dev.tsv)."
            )
        raw = _load_tsv(task, data_dir) if task.fmt == "tsv" else _load_label_text(task, data_dir)
    return datasets.DatasetDict({split: _normalise(task, raw[split], split) for split in ("train", "dev")})


def _normalise(task: TaskSpec, ds: datasets.Dataset, split: str) -> datasets.Dataset:
    label_values = [str(v).strip() for v in ds[task.label_column]]
    if task.labels is None:
        try:
            labels: list[float] | list[int] = [float(v) for v in label_values]
        except ValueError as err:
            raise ValueError(f"Task '{task.name}' ({split}): the score column '{task.label_column}' holds a non-number: {err}.") from None  # fmt: skip
    else:
        index = {lab: i for i, lab in enumerate(task.labels)}
        bad = next(((row, v) for row, v in enumerate(label_values) if v not in index), None)
        if bad is not None:
            raise ValueError(
                f"Task '{task.name}' ({split} split, row {bad[0] + 1}): label '{bad[1]}' is not in the task's label "
                f"set {list(task.labels)}. Check that --task matches the data in --data-dir."
            )
        labels = [index[v] for v in label_values]
    text_b = ds[task.text_columns[1]] if len(task.text_columns) > 1 else [None] * len(ds)
    return datasets.Dataset.from_dict(
        {"text_a": [str(t) for t in ds[task.text_columns[0]]], "text_b": text_b, "labels": labels}
    )


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
