"""Generative versions of three classification tasks, as chat instructions answered with one label word.

Each example becomes a TRL prompt-completion conversation: the prompt is one user message (the instruction, the
text, the allowed answers), the completion one assistant message holding the label word. `SFTTrainer` applies the
tokenizer's chat template to both and puts the loss on the completion only; `evaluate.py` applies the same template
with `add_generation_prompt=True` and compares the generated word with the label word.

Data (read in place from a directory laid out like `../shared/data`, never copied):

- `sst2`: `glue/SST-2/train.tsv` and `dev.tsv` (header `sentence<TAB>label`, 0 = negative, 1 = positive).
- `trec`: `sentence/TREC.train.all` and `TREC.test.all` (`<label> <question>`; the six coarse classes, numbered
  0-5 in these files as description, entity, abbreviation, human, location, number). The test file is the dev set.
- `agnews`: only `agnews/test.csv` exists (7,600 rows, 4 topics). It is split with a fixed seed
  (`AGNEWS_SPLIT_SEED`) into 1,000 dev rows (`AGNEWS_DEV_SIZE`; a quarter of a smaller file) and 6,600 for
  training; the split does not depend on `--seed`, so every run evaluates on the same rows.
"""

from __future__ import annotations

import csv
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TASK_NAMES = ("sst2", "trec", "agnews")
AGNEWS_SPLIT_SEED = 0
AGNEWS_DEV_SIZE = 1000
EVAL_SUBSET_SEED = 0
MAX_WORDS = 64  # longer texts are cut to their first 64 words, so prompt + answer always fit in --max-length


@dataclass(frozen=True)
class Task:
    """One generative task: its instruction and its label words, in label order.

    Args:
        name: the task name (`--task`).
        instruction: the user message's first line; the text and the allowed answers follow it.
        label_words: the answer for label 0, 1, ...; lower-case single words.
        text_name: how the instruction names the text ("Review", "Question", "Article").
    """

    name: str
    instruction: str
    label_words: tuple[str, ...]
    text_name: str


TASKS = {
    "sst2": Task("sst2", "What is the sentiment of this movie review?", ("negative", "positive"), "Review"),
    "trec": Task(
        "trec",
        "What kind of answer does this question ask for?",
        ("description", "entity", "abbreviation", "human", "location", "number"),
        "Question",
    ),
    "agnews": Task(
        "agnews", "What is the topic of this news article?", ("world", "sports", "business", "science"), "Article"
    ),
}


@dataclass(frozen=True)
class Example:
    """A text and its label index."""

    text: str
    label: int


def get_task(name: str) -> Task:
    """The task named `name`, or a ValueError listing the known ones."""
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}. Must be one of {list(TASKS)}.")
    return TASKS[name]


def _read_sst2(path: Path) -> list[Example]:
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows or rows[0][:2] != ["sentence", "label"]:
        raise ValueError(f"{path}: expected a GLUE SST-2 file with the header 'sentence<TAB>label'.")
    return [Example(row[0].strip(), int(row[1])) for row in rows[1:] if row]


def _read_trec(path: Path) -> list[Example]:
    # TREC holds a few Latin-1 bytes: undecodable bytes become U+FFFD (as the GLUE example reads it).
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    examples = []
    for line in lines:
        if line.strip():
            label, _, text = line.partition(" ")
            examples.append(Example(text.strip(), int(label)))
    return examples


def _read_agnews(path: Path) -> list[Example]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != ["Class Index", "Title", "Description"]:
            raise ValueError(f"{path}: expected the AG News header 'Class Index,Title,Description'.")
        # The descriptions use a backslash where the source had a line break.
        return [
            Example(
                f"{row['Title'].strip()}. {row['Description'].replace(chr(92), ' ').strip()}",
                int(row["Class Index"]) - 1,
            )
            for row in reader
        ]


def split_agnews(
    examples: list[Example], seed: int = AGNEWS_SPLIT_SEED, dev_size: int = AGNEWS_DEV_SIZE
) -> tuple[list[Example], list[Example]]:
    """(train, dev) from AG News' one file: a seeded permutation, the first `dev_size` rows are dev."""
    if not 0 < dev_size < len(examples):
        raise ValueError(
            f"dev_size={dev_size} must be between 1 and {len(examples) - 1} (the file has {len(examples)} rows)."
        )
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    return [examples[i] for i in order[dev_size:]], [examples[i] for i in order[:dev_size]]


def load_examples(task: str, split: str, data_dir: Path) -> list[Example]:
    """All examples of `split` ("train" or "dev") of `task`, in file order (AG News: in its fixed split's order)."""
    get_task(task)
    if split not in ("train", "dev"):
        raise ValueError(f"Unknown split {split!r}. Must be 'train' or 'dev'.")
    data_dir = Path(data_dir)
    if task == "sst2":
        return _read_sst2(data_dir / "glue" / "SST-2" / ("train.tsv" if split == "train" else "dev.tsv"))
    if task == "trec":
        return _read_trec(data_dir / "sentence" / ("TREC.train.all" if split == "train" else "TREC.test.all"))
    examples = _read_agnews(data_dir / "agnews" / "test.csv")
    train, dev = split_agnews(examples, dev_size=min(AGNEWS_DEV_SIZE, len(examples) // 4))
    return train if split == "train" else dev


def subset(examples: list[Example], size: int | None, seed: int) -> list[Example]:
    """`size` examples drawn with `seed` (all of them, in order, when `size` is None or not smaller)."""
    if size is None or size >= len(examples):
        return list(examples)
    if size <= 0:
        raise ValueError(f"size={size} must be positive (or unset for all {len(examples)} examples).")
    return random.Random(seed).sample(examples, size)


def prompt_messages(task: str, text: str) -> list[dict[str, str]]:
    """The user turn asking for `task`'s label word of `text` (cut to its first MAX_WORDS words)."""
    spec = get_task(task)
    words = text.split()
    if len(words) > MAX_WORDS:
        text = " ".join(words[:MAX_WORDS]) + " ..."
    answers = ", ".join(spec.label_words)
    content = f"{spec.instruction} Answer with one word: {answers}.\n\n{spec.text_name}: {text}"
    return [{"role": "user", "content": content}]


def to_record(task: str, example: Example) -> dict[str, Any]:
    """A TRL conversational prompt-completion record (plus the label index, which TRL ignores)."""
    word = get_task(task).label_words[example.label]
    return {
        "prompt": prompt_messages(task, example.text),
        "completion": [{"role": "assistant", "content": word}],
        "label": example.label,
    }


def build_dataset(task: str, split: str, data_dir: Path, size: int | None, seed: int) -> Any:
    """A `datasets.Dataset` of prompt-completion records: `size` examples of `split`, drawn with `seed`."""
    from datasets import Dataset

    examples = subset(load_examples(task, split, data_dir), size, seed)
    return Dataset.from_list([to_record(task, e) for e in examples])


def parse_answer(generated: str, label_words: tuple[str, ...]) -> str | None:
    """The first label word among the words of `generated` (case and punctuation ignored), else None.

    The first one anywhere, not only as the first word, so that a base model answering "The sentiment is positive."
    is scored on its answer rather than on its phrasing (evaluation generates a few tokens only).
    """
    for word in re.findall(r"[a-z]+", generated.lower()):
        if word in label_words:
            return word
    return None
