"""File size of a BitFit adapter in every compact form, for a model shape alone (random weights, no download).

Builds `BertForSequenceClassification` from a `BertConfig` (`bert-base`: the default config, 12 x 768, intermediate
3072; `minilm`: all-MiniLM-L6-v2's 6 x 384, intermediate 1536) with random weights, adds a BitFit adapter with
random deltas (`init_weights=False`) on `--bias-terms` and a `--num-labels` head, and writes it with
`bitfit_peft.compact.encode` in each form (the head in the same dtype), then with `BitFitConfig(save_dtype,
keep_fraction)` and `save_pretrained` (the head float32, the module order in the header). Sizes depend on the shape, not on the values (sparse positions are
stored as a bitmap down to about 1/8 kept; below that as gap bytes, one more for each gap of 255 or more).

    python examples/glue/compact_sizes.py --preset bert-base --bias-terms query intermediate \
        --forms float32 bfloat16 int8 int8:0.5 int8:0.25 int8:0.1 int8:0.05
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from typing import Any

import torch
from peft import get_peft_model, get_peft_model_state_dict
from safetensors.torch import save_file
from transformers import BertConfig, BertForSequenceClassification

from bitfit_peft import BitFitConfig, compact

PRESETS: dict[str, dict[str, int]] = {
    "bert-base": {},  # BertConfig()'s defaults
    "minilm": {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536},
}


def sizes(preset: str, bias_terms: list[str], num_labels: int, forms: list[str]) -> dict[str, Any]:
    """Bytes of the adapter file (without and with module-order metadata) and of its payload, per form."""
    torch.manual_seed(0)
    base = BertForSequenceClassification(BertConfig(num_labels=num_labels, **PRESETS[preset]))
    config = BitFitConfig(task_type="SEQ_CLS", bias_terms=bias_terms, init_weights=False)
    model = get_peft_model(base, config)
    state = get_peft_model_state_dict(model)
    deltas = sum(v.numel() for k, v in state.items() if k.endswith(compact.DELTA_MARKER))
    out: dict[str, Any] = {"preset": preset, "bias_terms": bias_terms, "deltas": deltas, "forms": {}}
    out["head"] = sum(v.numel() for k, v in state.items() if not k.endswith(compact.DELTA_MARKER))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "adapter_model.safetensors")
        save_file({k: v.contiguous() for k, v in state.items()}, path)
        out["forms"]["peft float32"] = {"file_bytes": os.path.getsize(path)}
        for form in forms:
            dtype, _, keep = form.partition(":")
            encoded = compact.encode(state, dtype, float(keep) if keep else None)
            save_file(encoded, path, metadata={"format": "pt"})
            size = os.path.getsize(path)
            save_file(encoded, path, metadata=compact.safetensors_metadata(encoded))
            out["forms"][form] = {
                "file_bytes": size,
                "file_bytes_with_module_metadata": os.path.getsize(path),
                "payload_bytes": compact.payload_bytes(encoded),
            }
        # What BitFitConfig(save_dtype, keep_fraction) + save_pretrained writes: the head stays float32.
        for form in forms:
            dtype, _, keep = form.partition(":")
            config.save_dtype, config.keep_fraction = dtype, float(keep) if keep else None
            config.packed = None if dtype == "float32" and not keep else True
            model.save_pretrained(tmp)
            out["forms"][f"BitFitConfig {form}"] = {"file_bytes": os.path.getsize(path)}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="bert-base")
    parser.add_argument("--bias-terms", nargs="+", default=["query", "intermediate"])
    parser.add_argument("--num-labels", type=int, default=2)
    parser.add_argument(
        "--forms", nargs="+", default=["float32", "bfloat16", "int8", "int8:0.5", "int8:0.25", "int8:0.1", "int8:0.05"]
    )
    parser.add_argument("--json", help="write the sizes here as JSON")
    args = parser.parse_args(argv)
    out = sizes(args.preset, args.bias_terms, args.num_labels, args.forms)
    print(f"{args.preset} {' + '.join(args.bias_terms)}: {out['deltas']:,} deltas, head {out['head']:,} values")
    for form, r in out["forms"].items():
        extra = f" (+module metadata {r['file_bytes_with_module_metadata']:,})" if "payload_bytes" in r else ""
        print(f"{form:14s} {r['file_bytes']:8,d} B{extra}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
