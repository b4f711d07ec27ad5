"""Tiny served models for the serving tests: a base model saved with an offline tokenizer, and adapters of several
head shapes saved with `save_pretrained` into `<adapters>/<task>/`."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from peft import PeftModel, get_peft_model

from bitfit_peft import BitFitConfig

WORDS = [f"w{i}" for i in range(90)]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)


def tokenizer(path: Path) -> transformers.PreTrainedTokenizerBase:
    """A word-level tokenizer over SPECIAL + WORDS (saved beside the model, so a served base decodes its ids). Built
    from the vocabulary dict: transformers 5's `BertTokenizerFast(vocab_file=...)` saves a 5-token vocabulary, and the
    reloaded tokenizer turned every word into [UNK] and decoded every id to ''."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(SPECIAL + WORDS) + "\n")
    return transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(SPECIAL + WORDS)})


def text(seed: int, n: int | None = None) -> str:
    g = torch.Generator().manual_seed(seed)
    length = n or int(torch.randint(2, 12, (1,), generator=g))
    return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (length,), generator=g))


def save_base(path: Path, kind: str = "bert", seed: int = 0) -> Path:
    """A tiny randomly initialised base model with its tokenizer, saved to `path`."""
    tok = tokenizer(path)
    torch.manual_seed(seed)
    vocab = len(SPECIAL) + len(WORDS)
    model: transformers.PreTrainedModel
    if kind == "bert":
        model = transformers.BertForSequenceClassification(transformers.BertConfig(**TINY, vocab_size=vocab))
    elif kind == "roberta":
        config = transformers.RobertaConfig(**TINY, vocab_size=vocab, max_position_embeddings=80, pad_token_id=0)
        model = transformers.RobertaForSequenceClassification(config)
    elif kind == "gpt2":
        config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=vocab, n_positions=80)
        config.eos_token_id = config.bos_token_id = tok.sep_token_id
        model = transformers.GPT2LMHeadModel(config)
    else:
        raise ValueError(kind)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def base_model(path: Path, num_labels: int) -> transformers.PreTrainedModel:
    config = transformers.AutoConfig.from_pretrained(path)
    if config.model_type == "gpt2":
        return transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    return transformers.AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=num_labels, ignore_mismatched_sizes=True
    ).eval()


def save_adapter(
    base: Path, out: Path, num_labels: int = 2, seed: int = 0, labels: list[str] | None = None, **config: object
) -> Path:
    """An adapter with random deltas and a random head of `num_labels` outputs, saved to `out`."""
    model = base_model(base, num_labels)
    generator = model.config.model_type == "gpt2"
    torch.manual_seed(seed)
    cfg = BitFitConfig(
        task_type="CAUSAL_LM" if generator else "SEQ_CLS",
        init_weights=False,
        labels=labels,
        problem_type="regression" if num_labels == 1 and not generator else None,
        **config,  # type: ignore[arg-type]
    )
    peft = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if ".modules_to_save." in name:
                param.normal_(std=0.5)
    peft.save_pretrained(str(out))
    return out


def offline(base: Path, adapter: Path, num_labels: int, inputs: str | tuple[str, str]) -> torch.Tensor:
    """The logits of one input run alone through `PeftModel.from_pretrained` (the reference for serving)."""
    tok = transformers.AutoTokenizer.from_pretrained(base)
    model = PeftModel.from_pretrained(base_model(base, num_labels), str(adapter)).eval()
    enc = tok(*((inputs,) if isinstance(inputs, str) else inputs), return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits[0]
