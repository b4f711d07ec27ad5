"""Shared fixtures for the GLUE example tests: a tiny random BERT with its tokenizer, tiny GLUE-layout data.

The example itself is the `glue_bitfit` package (examples/glue/glue_bitfit): tests import it by name
(`from glue_bitfit import train`); pytest's `pythonpath` (pyproject.toml) makes that the checkout's copy.
"""

from __future__ import annotations

import os
import pathlib
import random
import subprocess
import sys

REPO = pathlib.Path(__file__).parents[1]
EXAMPLE_DIR = REPO / "examples" / "glue"
TRAIN_SCRIPT = EXAMPLE_DIR / "train.py"
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()

POSITIVE = ["good", "great", "fine", "nice", "happy", "superb"]
NEGATIVE = ["bad", "awful", "poor", "sad", "dull", "boring"]
FILLER = ["the", "a", "movie", "film", "plot", "was", "is", "very", "quite", "story", "actor", "scene"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_tiny_model(
    path: pathlib.Path, dropout: float = 0.1, seed: int = 0, sentence_transformers: bool = False
) -> str:
    """Save a 2-layer, 32-wide random BERT and a word-level tokenizer for the tiny vocabulary under `path`."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    vocab = SPECIAL + sorted(set(POSITIVE + NEGATIVE + FILLER))
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(path)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    BertModel(config).save_pretrained(path)
    if sentence_transformers:
        (path / "1_Pooling").mkdir(exist_ok=True)
        (path / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    return str(path)


def _sentence(rng: random.Random, label: int) -> str:
    words = [rng.choice(FILLER) for _ in range(rng.randint(2, 5))]
    words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if label else NEGATIVE))
    return " ".join(words)


def make_tiny_glue(root: pathlib.Path, n_train: int = 64, n_dev: int = 32, seed: int = 0) -> str:
    """Write tiny learnable SST-2 and STS-B directories in GLUE's layout under `root`; return `root`."""
    rng = random.Random(seed)
    sst = root / "SST-2"
    sst.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        rows = ["sentence\tlabel"] + [f"{_sentence(rng, i % 2)}\t{i % 2}" for i in range(n)]
        (sst / name).write_text("\n".join(rows) + "\n")
    sts = root / "STS-B"
    sts.mkdir(parents=True, exist_ok=True)
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        rows = [header]
        for i in range(n):
            a, b = _sentence(rng, i % 2), _sentence(rng, (i // 2) % 2)
            score = 4.0 + rng.random() if i % 2 == (i // 2) % 2 else rng.random()
            rows.append(f"{i}\tg\tf\t2012\t{i}\tnone\tnone\t{a}\t{b}\t{score:.3f}")
        (sts / name).write_text("\n".join(rows) + "\n")
    return str(root)


def run_train(
    args: list[str],
    launcher: list[str] | None = None,
    timeout: int = 300,
    env: dict[str, str] | None = None,
    stderr_to_stdout: bool = False,
) -> subprocess.CompletedProcess:
    """Run train.py in a fresh process (1 torch thread, offline, `env` on top) and return the completed process;
    `stderr_to_stdout`: one stream, as a terminal shows them (then `stderr` is None)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}  # fmt: skip
    env["HF_DATASETS_OFFLINE"] = "1"
    cmd = (launcher or [sys.executable]) + [str(TRAIN_SCRIPT), *args]
    streams = (
        {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT} if stderr_to_stdout else {"capture_output": True}
    )
    return subprocess.run(cmd, text=True, env=env, timeout=timeout, cwd=str(REPO), **streams)  # type: ignore[call-overload]
