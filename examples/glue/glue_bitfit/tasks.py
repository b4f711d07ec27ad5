"""The tasks: GLUE's nine and five single-sentence ones, with their files, columns, label sets and metrics.

A GLUE task reads `<TASK>/train.tsv` and `<TASK>/dev.tsv` of a directory laid out like GLUE's original download
(or, without a directory, the Hub's `nyu-mll/glue`); a single-sentence task (TREC, SUBJ, MR, CR, MPQA) reads the
`<label> <text>` files of the SentEval-style `sentence/` directory.
"""

from __future__ import annotations

from dataclasses import dataclass


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
