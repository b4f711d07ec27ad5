"""Supervised fine-tuning of a decoder LLM with TRL's `SFTTrainer` and BitFit (or peft's LoRA, for comparison).

The model learns to answer a task's chat instruction with one label word (`sft_data.py`). The loss is on the
answer only (TRL's prompt-completion format). `--method` picks the adapter:

- `bitfit-bq-bm2`: BitFit on the paper's b_q + b_m2 (query, and the first MLP layer: gate and up for Llama).
  Llama has no biases, hence `add_missing_bias=True`: zero-initialised deltas on the bias-less Linear layers.
- `bitfit-all`: BitFit on every bias term (all attention and MLP projections; RMSNorm has none).
- `lora-r8`: peft's LoRA, r=8, alpha=16, on q_proj and v_proj.

    python examples/sft/prepare_base.py --out smollm2-135m
    python examples/sft/train.py --base smollm2-135m --task sst2 --method bitfit-bq-bm2 \
        --data-dir ../shared/data --train-size 400 --output-dir out/sft-sst2-bitfit

The output directory then holds the adapter (`adapter_model.safetensors`, `adapter_config.json`) and
`train_results.json` (options, trainable parameters, adapter bytes, training time, loss per logged step).
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

METHODS = ("bitfit-bq-bm2", "bitfit-all", "lora-r8")
# Bias deltas start at zero and move little per step, so BitFit trains with a larger rate than LoRA.
DEFAULT_LR = {"bitfit-bq-bm2": 2e-3, "bitfit-all": 2e-3, "lora-r8": 1e-3}


def peft_config(method: str) -> Any:
    """The peft config of `method` for a causal LM."""
    from peft import LoraConfig

    from bitfit_peft import BitFitConfig
    from bitfit_peft.constants import BIAS_TERMS

    if method == "bitfit-bq-bm2":
        return BitFitConfig(task_type="CAUSAL_LM", add_missing_bias=True, bias_terms=["query", "intermediate"])
    if method == "bitfit-all":
        return BitFitConfig(task_type="CAUSAL_LM", add_missing_bias=True, bias_terms=list(BIAS_TERMS))
    if method == "lora-r8":
        return LoraConfig(
            task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]
        )
    raise ValueError(f"Unknown method {method!r}. Must be one of {list(METHODS)}.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True, help="plain checkpoint (prepare_base.py --out)")
    parser.add_argument("--task", choices=sft_data.TASK_NAMES, required=True)
    parser.add_argument("--method", choices=METHODS, default="bitfit-bq-bm2")
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"), help="directory like ../shared/data")
    parser.add_argument("--train-size", type=int, default=400, help="training examples drawn with --seed (0 = all)")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (overrides --epochs)")
    parser.add_argument("--lr", type=float, default=None, help=f"learning rate (default per method: {DEFAULT_LR})")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=192, help="tokens per example (prompt + answer)")
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logging-steps", type=int, default=5)
    args = parser.parse_args(argv)
    for name in ("train_size", "batch_size", "max_length", "logging_steps"):
        if getattr(args, name) < (0 if name == "train_size" else 1):
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.max_steps == 0 or args.max_steps < -1:
        parser.error(f"--max-steps must be positive (or -1 to use --epochs), got {args.max_steps}")
    if args.lr is None:
        args.lr = DEFAULT_LR[args.method]
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train, save the adapter and `train_results.json` into `args.output_dir`, and return the results."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    import bitfit_peft  # noqa: F401  (registers BITFIT with peft)

    train = sft_data.build_dataset(args.task, "train", args.data_dir, args.train_size or None, args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    if tokenizer.chat_template is None:
        raise ValueError(f"The tokenizer in {args.base} has no chat template; SFT on chat instructions needs one.")
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    config = SFTConfig(
        output_dir=str(args.output_dir),
        learning_rate=args.lr,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        max_length=args.max_length,
        lr_scheduler_type="linear",
        warmup_steps=0,
        logging_steps=args.logging_steps,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        data_seed=args.seed,
        bf16=False,  # TRL's default is bf16; these CPU runs stay in float32
        gradient_checkpointing=False,  # TRL's default; a 135M model does not need it and it costs a second forward
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=peft_config(args.method),
    )
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    trainer.model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    losses = [(log["step"], log["loss"]) for log in trainer.state.log_history if "loss" in log]
    results = {
        "task": args.task,
        "method": args.method,
        "base": str(args.base),
        "train_size": len(train),
        "epochs": args.epochs,
        "max_steps": args.max_steps,
        "steps": trainer.state.global_step,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "seed": args.seed,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "adapter_bytes": (args.output_dir / "adapter_model.safetensors").stat().st_size,
        "train_seconds": round(train_seconds, 1),
        "loss": losses,
    }
    (args.output_dir / "train_results.json").write_text(json.dumps(results, indent=2) + "\n")
    first, last = (losses[0][1], losses[-1][1]) if losses else (float("nan"), float("nan"))
    print(
        f"task={args.task} method={args.method} train={len(train)} steps={results['steps']} lr={args.lr} | "
        f"trainable {trainable:,} of {total:,} | loss {first:.3f} -> {last:.3f} | adapter "
        f"{results['adapter_bytes']:,} bytes | training {train_seconds:.1f} s"
    )
    return results


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
