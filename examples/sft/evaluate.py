"""Evaluate a decoder on a generative task by greedy generation: accuracy = the answer is the right label word.

Without `--adapter` it scores the base model zero-shot (same prompts, same parsing); with one it loads the adapter
(BitFit or LoRA, as saved by `train.py`) with `PeftModel.from_pretrained`. The dev set is a fixed subset of
`--eval-size` examples drawn with a fixed seed (`sft_data.EVAL_SUBSET_SEED`), the same for every model; `0` = all.

    python examples/sft/evaluate.py --base smollm2-135m --task sst2 --data-dir ../shared/data \
        --adapter out/sft-sst2-bitfit --json out/sft-sst2-bitfit/eval.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.append(str(Path(__file__).resolve().parent))  # appended, not first: examples/glue has a train.py too

import sft_data  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True, help="plain checkpoint (prepare_base.py --out)")
    parser.add_argument("--adapter", type=Path, default=None, help="adapter directory from train.py; unset = base")
    parser.add_argument("--task", choices=sft_data.TASK_NAMES, required=True)
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"), help="directory like ../shared/data")
    parser.add_argument("--eval-size", type=int, default=200, help="dev examples (fixed seeded subset; 0 = all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    for name in ("batch_size", "max_new_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.eval_size < 0:
        parser.error(f"--eval-size must be positive or 0 (all), got {args.eval_size}")
    return args


def load_model(base: Path, adapter: Path | None) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer padding on the left) for `base`, with `adapter` loaded when given."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.padding_side = "left"  # generation continues every row from its last prompt token
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        import bitfit_peft  # noqa: F401  (registers BITFIT with peft)

        model = PeftModel.from_pretrained(model, adapter)
    return model.eval(), tokenizer


def generate_answers(
    model: Any, tokenizer: Any, prompts: list[list[dict[str, str]]], batch_size: int, max_new_tokens: int
) -> list[str]:
    """Greedy completions of chat `prompts` (the tokenizer's chat template, with the generation prompt)."""
    import torch

    texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
    answers: list[str] = []
    for i in range(0, len(texts), batch_size):
        batch = tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(
                **batch, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id
            )
        answers += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return answers


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Score the model on the dev subset; print one line, write `--json` if given, and return the results."""
    task = sft_data.get_task(args.task)
    dev = sft_data.subset(
        sft_data.load_examples(args.task, "dev", args.data_dir), args.eval_size or None, sft_data.EVAL_SUBSET_SEED
    )
    model, tokenizer = load_model(args.base, args.adapter)
    start = time.perf_counter()
    answers = generate_answers(
        model,
        tokenizer,
        [sft_data.prompt_messages(args.task, e.text) for e in dev],
        args.batch_size,
        args.max_new_tokens,
    )
    eval_seconds = time.perf_counter() - start
    parsed = [sft_data.parse_answer(a, task.label_words) for a in answers]
    correct = sum(p == task.label_words[e.label] for p, e in zip(parsed, dev, strict=True))
    results: dict[str, Any] = {
        "task": args.task,
        "base": str(args.base),
        "adapter": None if args.adapter is None else str(args.adapter),
        "method": "base zero-shot",
        "eval_size": len(dev),
        "max_new_tokens": args.max_new_tokens,
        "accuracy": correct / len(dev),
        "unparsed": sum(p is None for p in parsed),
        "eval_seconds": round(eval_seconds, 1),
        "answers": parsed,  # per dev example, in subset order: the label word found, or None
        "samples": [
            {"text": e.text[:80], "label": task.label_words[e.label], "generated": a}
            for e, a in zip(dev[:5], answers[:5], strict=True)
        ],
    }
    train_file = None if args.adapter is None else args.adapter / "train_results.json"
    if train_file is not None and train_file.is_file():
        train = json.loads(train_file.read_text())
        for key in ("method", "train_size", "steps", "lr", "trainable_parameters", "adapter_bytes", "train_seconds"):
            results[key] = train[key]
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(
        f"task={args.task} model={results['method']} dev={len(dev)} accuracy={results['accuracy']:.4f} "
        f"(no label word in {results['unparsed']}) | generation {eval_seconds:.1f} s"
    )
    return results


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
