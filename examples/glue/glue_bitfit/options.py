"""The command line of `train.py`: its options, their per-method defaults and the checks made before loading anything."""

from __future__ import annotations

import argparse
import os

from .modeling import DEFAULT_EPOCHS, DEFAULT_LR, METHODS, POOLINGS, check_model_path

DESCRIPTION = "Fine-tune an encoder on a GLUE task with BitFit (or a baseline) using Accelerate."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse train.py's options (`--epochs` and `--lr` stay `None` until `resolve_defaults`)."""
    p = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    p.add_argument("--save-total-limit", type=int, default=2, help="Checkpoints kept (Accelerate deletes older ones).")
    p.add_argument(
        "--resume-from-checkpoint",
        default=None,
        help="A checkpoint dir, or `latest` (the newest OUTPUT_DIR/checkpoints/checkpoint_N).",
    )
    p.add_argument(
        "--stop-after-steps",
        type=int,
        default=None,
        help="Stop (as if interrupted) after N optimizer steps, with a checkpoint; for testing resumption.",
    )
    p.add_argument(
        "--load-report",
        action="store_true",
        help="Also show transformers' LOAD REPORT table for the base model (by default one line says what is new).",
    )
    p.add_argument("--num-threads", type=int, default=None, help="torch CPU threads per process.")
    p.add_argument("--log-every", type=int, default=10, help="Record the training loss every N steps.")
    p.add_argument(
        "--keep-fraction",
        type=float,
        default=None,
        help="After training, keep the largest-magnitude fraction F of each BitFit delta, re-train with the rest "
        "held at zero, and save int8 + sparse (glue_bitfit/prune.py).",
    )
    p.add_argument("--retrain-epochs", type=int, default=1, help="Epochs of masked re-training (--keep-fraction).")
    p.add_argument("--retrain-lr", type=float, default=None, help="Re-training learning rate; default: --lr.")
    p.add_argument(
        "--init-adapter",
        default=None,
        help="Start --keep-fraction from this trained adapter (a train.py --output-dir) instead of training first.",
    )
    return p.parse_args(argv)  # fmt: skip


def resolve_defaults(args: argparse.Namespace) -> None:
    """Fill `--epochs` and `--lr` with the method's measured defaults (modeling.py), so results.json shows them.

    With `--init-adapter` the normal training is skipped (`--epochs` 0) and `--retrain-lr` defaults to `--lr`.
    """
    if args.init_adapter is not None and args.epochs is None:
        args.epochs = 0  # the adapter is already trained: only the masked re-training runs
    args.epochs = DEFAULT_EPOCHS[args.method] if args.epochs is None else args.epochs
    args.lr = DEFAULT_LR[args.method] if args.lr is None else args.lr
    args.retrain_lr = args.lr if args.retrain_lr is None else args.retrain_lr


def validate(args: argparse.Namespace) -> None:
    """Check the options that can be checked without loading anything; raise ValueError naming the fix."""
    if args.dev_size is not None and args.dev_size < 1:
        raise ValueError(f"--dev-size must be at least 1, got {args.dev_size}.")
    _validate_pruning(args)
    for name in (
        "epochs" if args.init_adapter is None else "retrain_epochs",
        "batch_size",
        "eval_batch_size",
        "grad_accum",
        "max_length",
        "log_every",
        "save_total_limit",
    ):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}.")
    if args.train_size is not None and args.train_size < 1:
        raise ValueError(f"--train-size must be at least 1, got {args.train_size}.")
    if args.lr is not None and args.lr <= 0:
        raise ValueError(f"--lr must be positive, got {args.lr}.")
    if args.resume_from_checkpoint is None and os.path.exists(os.path.join(args.output_dir, "results.json")):
        raise ValueError(f"{args.output_dir} already holds results.json: pass a new --output-dir or remove it.")
    check_model_path(args.model)


def _validate_pruning(args: argparse.Namespace) -> None:
    """The options of the masked re-training (`--keep-fraction`, `--init-adapter`, `--retrain-*`)."""
    keep = args.keep_fraction
    if keep is None:
        if args.init_adapter is not None:
            raise ValueError("--init-adapter only starts a --keep-fraction re-training: pass --keep-fraction too.")
        return
    if not 0.0 < keep < 1.0:
        raise ValueError(f"--keep-fraction must be in (0, 1), got {keep}; e.g. 0.4 keeps the largest 40%.")
    if args.method != "bitfit":
        raise ValueError(f"--keep-fraction prunes BitFit deltas: use it with --method bitfit, not {args.method}.")
    if args.retrain_epochs < 1:
        raise ValueError(f"--retrain-epochs must be at least 1, got {args.retrain_epochs}.")
    if args.retrain_lr is not None and args.retrain_lr <= 0:
        raise ValueError(f"--retrain-lr must be positive, got {args.retrain_lr}.")
    if args.init_adapter is not None and args.epochs:
        raise ValueError(
            f"--epochs {args.epochs} with --init-adapter: the adapter is already trained; set the re-training "
            "length with --retrain-epochs and drop --epochs."
        )
    if args.stop_after_steps is not None:
        raise ValueError("--stop-after-steps with --keep-fraction: the re-training is not checkpointed; drop one.")
