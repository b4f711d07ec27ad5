"""Measure what `save_pretrained` writes for BitFit adapters of BERT-base and MiniLM-L6 shapes, in every storage form.

Prints one Markdown row per (shape, bias terms, storage): delta parameters, file bytes, payload bytes (tensor bytes,
sparse positions and int8 scales: `bitfit_peft.compact.payload_bytes`) and file / payload. The bases are built on the
meta device and filled with N(0, 0.02) (sizes do not depend on the values); the deltas are random.

    python docs/measurements/checkpoint_sizes.py
"""

from __future__ import annotations

import os
import tempfile

import torch
import transformers
from peft import get_peft_model
from safetensors import safe_open

from bitfit_peft import BitFitConfig, compact

SHAPES = {
    "BERT-base": {},
    "MiniLM-L6": {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536},
}
# (save_dtype, keep_fraction, packed)
FORMS = [
    (None, None, None),
    (None, None, True),
    ("bfloat16", None, False),
    ("bfloat16", None, None),
    ("float16", None, None),
    ("int8", None, None),
    ("int8", 0.1, None),
    (None, 0.1, None),
]


def base(**kwargs: int) -> transformers.BertForSequenceClassification:
    config = transformers.BertConfig(vocab_size=16, num_labels=2, **kwargs)
    with torch.device("meta"):
        model = transformers.BertForSequenceClassification(config)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.02)
    return model


def main() -> None:
    print("| shape | bias terms | delta params | storage | layout | file B | payload B | file / payload |")
    print("|---|---|---:|---|---|---:|---:|---:|")
    for shape, kwargs in SHAPES.items():
        for terms in (None, ["query", "intermediate"]):
            for save_dtype, keep, packed in FORMS:
                torch.manual_seed(0)
                config = BitFitConfig(
                    task_type="SEQ_CLS",
                    bias_terms=terms,
                    init_weights=False,
                    save_dtype=save_dtype,
                    keep_fraction=keep,
                    packed=packed,
                )
                model = get_peft_model(base(**kwargs), config)
                with tempfile.TemporaryDirectory() as out:
                    model.save_pretrained(out)
                    path = os.path.join(out, "adapter_model.safetensors")
                    with safe_open(path, "pt") as f:
                        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
                    size, payload = os.path.getsize(path), compact.payload_bytes(tensors)
                n = sum(p.numel() for name, p in model.named_parameters() if "bitfit_delta" in name)
                storage = (save_dtype or "float32") + (f", keep {keep}" if keep else "")
                layout = "packed" if compact.is_packed(tensors) else "per key"
                print(f"| {shape} | {'b_q+b_m2' if terms else 'all biases'} | {n:,} | {storage} | {layout} | "
                      f"{size:,} | {payload:,} | {size / payload:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
