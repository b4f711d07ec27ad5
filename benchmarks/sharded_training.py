"""BitFit under the launch's Accelerate config (FSDP2, DeepSpeed ZeRO-3, or plain): one short run, as JSON.

    accelerate launch --config_file examples/configs/fsdp2.yaml -m benchmarks.sharded_training --out fsdp2.json

A random-weight Llama-shaped decoder (its speed and memory do not depend on the weights' values), BitFit b_q + b_m2
with `add_missing_bias`, AdamW over the deltas, `--steps` steps on random tokens; then the adapter is saved on every
process (`is_main_process` on one). Records the losses, seconds per step (median), peak device memory, the
distributed type Accelerate chose, and the saved adapter's tensor names and sizes (it must hold the deltas only).
`benchmarks/gpu_training.sh` runs it on a GPU machine; `--cpu` with a plain launch is its dry run here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from typing import Any

import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the JSON file to write (on the main process)")
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size (intermediate = 2.75x)")
    parser.add_argument("--layers", type=int, default=8, help="decoder layers")
    parser.add_argument("--batch", type=int, default=4, help="sequences per process")
    parser.add_argument("--seq", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (non-reentrant)")
    return parser.parse_args(argv)


def _build(args: argparse.Namespace) -> Any:
    import transformers
    from peft import get_peft_model

    import bitfit_peft

    config = transformers.LlamaConfig(
        vocab_size=32000,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 128),
        num_key_value_heads=max(1, args.hidden // 512),
        max_position_embeddings=max(2048, args.seq),
    )
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(config)
    if args.checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    bitfit = bitfit_peft.BitFitConfig(
        task_type="CAUSAL_LM", add_missing_bias=True, bias_terms=["query", "intermediate"]
    )
    return get_peft_model(base, bitfit)


def _save(accelerator: Any, model: Any, out_dir: str) -> None:
    """Every process saves (FSDP2 gathers the deltas collectively); ZeRO-3 gathers just the trainable partitions."""
    unwrapped = accelerator.unwrap_model(model)
    main = accelerator.is_main_process
    if accelerator.distributed_type.value == "DEEPSPEED":
        import deepspeed

        params = [p for p in unwrapped.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            unwrapped.save_pretrained(out_dir, is_main_process=main)
    else:
        unwrapped.save_pretrained(out_dir, is_main_process=main)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from accelerate import Accelerator
    from safetensors import safe_open

    args = parse_args(argv)
    accelerator = Accelerator()
    model = _build(args)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    device = accelerator.device
    generator = torch.Generator().manual_seed(1 + accelerator.process_index)
    losses, seconds = [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.steps):
        ids = torch.randint(0, 32000, (args.batch, args.seq), generator=generator).to(device)
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
        losses.append(accelerator.reduce(loss.detach(), reduction="mean").item())
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = tmp  # only the main process writes, into its own directory, and reads it back
        _save(accelerator, model, out_dir)
        accelerator.wait_for_everyone()
        saved: dict[str, list[int]] = {}
        if accelerator.is_main_process:
            with safe_open(os.path.join(out_dir, "adapter_model.safetensors"), "pt") as f:
                saved = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    result = {
        "distributed_type": accelerator.distributed_type.value,
        "num_processes": accelerator.num_processes,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "args": vars(args),
        "losses": losses,
        "median_step_s": statistics.median(seconds[1:] or seconds),
        "peak_device_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "saved_tensors": len(saved),
        "saved_elements": sum(int(torch.tensor(s).prod()) for s in saved.values()),
        "saved_only_deltas": bool(saved) and all("bitfit_delta" in k for k in saved),
    }
    if accelerator.is_main_process:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
