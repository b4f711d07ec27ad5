"""The architecture table: one tiny, seeded transformers task model per architecture BitFit claims to support.

Each `Case` says how to build the model (from a config, seeded, so a fresh process rebuilds it bit for bit), which
`BitFitConfig` kwargs it needs, which modules form its task head, how to make a small seeded input batch, and how
many bias entries each of the paper's named bias terms covers, computed from the config sizes alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

SEED = 0
VOCAB = 99
BATCH = 4
SEQ_LEN = 7
DEC_LEN = 5
PAD = 0
# Layer types whose bias BitFit covers by default (the contract: Linear, GPT-2 Conv1D, LayerNorm, Conv1d/2d).
BIASED_TYPES = (nn.Linear, Conv1D, nn.LayerNorm, nn.Conv1d, nn.Conv2d)
# Types where `add_missing_bias=True` adds a delta if the bias is absent (RMSNorm-like norms are not among them).
ADDABLE_TYPES = (nn.Linear, Conv1D)
TERMS = ("query", "key", "value", "attention_output", "intermediate", "output", "layernorm")


@dataclass(frozen=True)
class Case:
    """One architecture of the table.

    Args:
        name: the test id.
        config: builds the tiny transformers config.
        auto_class: the `transformers` Auto class that builds the task model from the config.
        task_type: the peft task type, or None.
        bitfit_kwargs: extra `BitFitConfig` kwargs the architecture needs.
        head: names of the task-head modules trained whole (peft `modules_to_save`).
        kind: "encoder", "decoder", "seq2seq" or "vision": decides the input batch.
        term_sizes: bias term -> number of bias entries the term covers, from the config; absent = not applicable.
        fused: (fused module suffix, function(config, part) -> positions of part 0/1/2 = q/k/v in its bias).
    """

    name: str
    config: Callable[[], PretrainedConfig]
    auto_class: str
    task_type: str | None
    kind: str
    term_sizes: Callable[[Any], dict[str, int]]
    bitfit_kwargs: dict[str, Any] = field(default_factory=dict)
    head: tuple[str, ...] = ()
    fused: tuple[str, Callable[[Any, int], list[int]]] | None = None

    def build(self, dtype: torch.dtype | None = None, frozen: bool = True) -> PreTrainedModel:
        """The seeded task model in eval mode (the same bits on every call and in every process).

        `frozen=False` for a model to hand to peft, so that the tests see peft/BitFit do the freezing.
        """
        return build_model(self.auto_class, self.config(), dtype, frozen)

    def batch(self, seed: int = 1, batch_size: int = BATCH) -> dict[str, torch.Tensor]:
        return make_batch(self.kind, self.config(), seed, batch_size)


def build_model(
    auto_class: str, config: PretrainedConfig, dtype: torch.dtype | None = None, frozen: bool = True
) -> PreTrainedModel:
    """Seeded build from a config; also what the fresh-process check runs (it only needs transformers).

    References come frozen, as the base is inside a peft model: torch's matmul picks its kernel (fold into one mm
    or not) by `requires_grad` even under `no_grad`, so a trainable reference can differ from the frozen base in the
    last bit, which would break the bitwise parity checks for reasons that have nothing to do with BitFit.
    """
    torch.manual_seed(SEED)
    model = getattr(transformers, auto_class).from_config(config, attn_implementation="eager")
    if dtype is not None:
        model = model.to(dtype)
    return model.requires_grad_(not frozen).eval()


def make_batch(kind: str, config: PretrainedConfig, seed: int = 1, batch_size: int = BATCH) -> dict[str, torch.Tensor]:
    """A small seeded batch; text rows have an attention mask and every other row ends in padding."""
    g = torch.Generator().manual_seed(seed)
    if kind == "vision":
        size = config.image_size
        return {"pixel_values": torch.randn(batch_size, config.num_channels, size, size, generator=g)}
    ids = torch.randint(1, VOCAB, (batch_size, SEQ_LEN), generator=g)
    mask = torch.ones(batch_size, SEQ_LEN, dtype=torch.long)
    mask[1::2, -2:] = 0
    ids = ids.masked_fill(mask == 0, PAD)
    batch = {"input_ids": ids, "attention_mask": mask}
    if kind == "seq2seq":
        batch["decoder_input_ids"] = torch.randint(1, VOCAB, (batch_size, DEC_LEN), generator=g)
    return batch


def expected_targets(model: nn.Module, case: Case) -> dict[str, int]:
    """Module name -> delta size that the default BitFit config must create, found by structure (not by name).

    Every bias of a supported layer type outside the task head; with `add_missing_bias`, also every Linear/Conv1D
    without one. Also checks that the model has no other kind of bias, so the count is the model's whole bias count.
    """
    add_missing = case.bitfit_kwargs.get("add_missing_bias", False)
    head = tuple(case.head)
    out: dict[str, int] = {}
    for name, module in model.named_modules():
        if any(name == h or name.startswith(h + ".") for h in head):
            continue
        bias = module._parameters.get("bias") if "bias" in module._parameters else None
        if isinstance(module, BIASED_TYPES) and bias is not None:
            out[name] = bias.numel()
        elif isinstance(module, BIASED_TYPES) and bias is None and add_missing and isinstance(module, ADDABLE_TYPES):
            out[name] = module.out_features if isinstance(module, nn.Linear) else module.nf
        elif bias is not None:
            raise AssertionError(f"{name} ({type(module).__name__}) has a bias of a type the table does not know")
    return out


def head_param_count(model: nn.Module, case: Case) -> int:
    return sum(p.numel() for h in case.head for p in model.get_submodule(h).parameters())


# --- term sizes, from the config only -------------------------------------------------------------------------------


def _bert_terms(c: Any) -> dict[str, int]:
    n, h, i = c.num_hidden_layers, c.hidden_size, c.intermediate_size
    emb = getattr(c, "embedding_size", h)
    # layer norms: 2 per layer + the embedding LayerNorm (+ DeBERTa's relative-embedding LayerNorm).
    extra_ln = h if getattr(c, "relative_attention", False) and "layer_norm" in getattr(c, "norm_rel_ebd", "") else 0
    return dict(
        query=n * h,
        key=n * h,
        value=n * h,
        attention_output=n * h,
        intermediate=n * i,
        output=n * h,
        layernorm=2 * n * h + emb + extra_ln,
    )


def _distilbert_terms(c: Any) -> dict[str, int]:
    n, h, i = c.n_layers, c.dim, c.hidden_dim
    return dict(
        query=n * h,
        key=n * h,
        value=n * h,
        attention_output=n * h,
        intermediate=n * i,
        output=n * h,
        layernorm=(2 * n + 1) * h,
    )


def _gpt2_terms(c: Any) -> dict[str, int]:
    n, h = c.n_layer, c.n_embd
    i = c.n_inner or 4 * h
    return dict(
        query=n * h,
        key=n * h,
        value=n * h,
        attention_output=n * h,
        intermediate=n * i,
        output=n * h,
        layernorm=(2 * n + 1) * h,
    )


def _gpt2_slice(c: Any, part: int) -> list[int]:
    # c_attn output is [q; k; v], each n_embd wide.
    return list(range(part * c.n_embd, (part + 1) * c.n_embd))


def _neox_slice(c: Any, part: int) -> list[int]:
    # query_key_value output is viewed as [head][q, k, v][head_dim].
    hd = c.hidden_size // c.num_attention_heads
    return [head * 3 * hd + part * hd + j for head in range(c.num_attention_heads) for j in range(hd)]


def _opt_terms(c: Any) -> dict[str, int]:
    n, h, i = c.num_hidden_layers, c.hidden_size, c.ffn_dim
    return dict(
        query=n * h,
        key=n * h,
        value=n * h,
        attention_output=n * h,
        intermediate=n * i,
        output=n * h,
        layernorm=(2 * n + 1) * h,
    )


def _llama_terms(c: Any) -> dict[str, int]:
    # Needs add_missing_bias (no Linear has a bias); RMSNorm has no bias at all, so no "layernorm" term.
    n, h, i = c.num_hidden_layers, c.hidden_size, c.intermediate_size
    hd = h // c.num_attention_heads
    kv = c.num_key_value_heads * hd
    return dict(query=n * h, key=n * kv, value=n * kv, attention_output=n * h, intermediate=2 * n * i, output=n * h)


def _qwen2_terms(c: Any) -> dict[str, int]:
    # Plain BitFit: only q/k/v carry a bias.
    n, h = c.num_hidden_layers, c.hidden_size
    kv = c.num_key_value_heads * (h // c.num_attention_heads)
    return dict(query=n * h, key=n * kv, value=n * kv)


def _t5_terms(c: Any) -> dict[str, int]:
    # Needs add_missing_bias. Attention terms cover the decoder's cross-attention too.
    e, d, dm = c.num_layers, c.num_decoder_layers, c.d_model
    inner = c.num_heads * c.d_kv
    attn = e + 2 * d
    return dict(
        query=attn * inner,
        key=attn * inner,
        value=attn * inner,
        attention_output=attn * dm,
        intermediate=(e + d) * c.d_ff,
        output=(e + d) * dm,
    )


def _bart_terms(c: Any) -> dict[str, int]:
    e, d, dm = c.encoder_layers, c.decoder_layers, c.d_model
    attn = (e + 2 * d) * dm
    return dict(
        query=attn,
        key=attn,
        value=attn,
        attention_output=attn,
        intermediate=e * c.encoder_ffn_dim + d * c.decoder_ffn_dim,
        output=(e + d) * dm,
        # 2 per encoder layer, 3 per decoder layer, + layernorm_embedding of encoder and decoder.
        layernorm=(2 * e + 3 * d + 2) * dm,
    )


def _vit_terms(c: Any) -> dict[str, int]:
    n, h, i = c.num_hidden_layers, c.hidden_size, c.intermediate_size
    return dict(
        query=n * h,
        key=n * h,
        value=n * h,
        attention_output=n * h,
        intermediate=n * i,
        output=n * h,
        layernorm=(2 * n + 1) * h,
    )


def _neox_terms(c: Any) -> dict[str, int]:
    n, h, i = c.num_hidden_layers, c.hidden_size, c.intermediate_size
    return dict(
        query=n * h,
        key=n * h,
        value=n * h,
        attention_output=n * h,
        intermediate=n * i,
        output=n * h,
        layernorm=(2 * n + 1) * h,
    )


# --- the table --------------------------------------------------------------------------------------------------------

_ENC = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
    pad_token_id=PAD,
    num_labels=3,
)
_DEC = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=37,
    max_position_embeddings=64,
    pad_token_id=PAD,
    bos_token_id=1,
    eos_token_id=2,
)
_SEQ2SEQ_IDS = dict(pad_token_id=PAD, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)

CASES: list[Case] = [
    Case(
        "bert",
        lambda: transformers.BertConfig(**_ENC),
        "AutoModelForSequenceClassification",
        "SEQ_CLS",
        "encoder",
        _bert_terms,
        head=("classifier",),
    ),
    Case(
        "roberta",
        lambda: transformers.RobertaConfig(**{**_ENC, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2}),
        "AutoModelForSequenceClassification",
        "SEQ_CLS",
        "encoder",
        _bert_terms,
        head=("classifier",),  # RobertaClassificationHead (dense + out_proj), trained whole
    ),
    Case(
        "distilbert",
        lambda: transformers.DistilBertConfig(
            vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=37, max_position_embeddings=64, num_labels=3
        ),
        "AutoModelForSequenceClassification",
        "SEQ_CLS",
        "encoder",
        _distilbert_terms,
        # peft wraps every module whose name ends with "classifier" (`_set_trainable` matches by `endswith`), so the
        # head trained whole is pre_classifier + classifier, exactly as with LoRA on DistilBERT.
        head=("pre_classifier", "classifier"),
    ),
    Case(
        "deberta_v2",
        lambda: transformers.DebertaV2Config(
            **_ENC,
            relative_attention=True,
            position_buckets=8,
            pos_att_type=["p2c", "c2p"],
            norm_rel_ebd="layer_norm",
            share_att_key=True,
        ),
        "AutoModelForSequenceClassification",
        "SEQ_CLS",
        "encoder",
        _bert_terms,
        head=("classifier",),  # pooler.dense gets a delta
    ),
    Case(
        "electra",
        lambda: transformers.ElectraConfig(**_ENC, embedding_size=32),
        "AutoModelForSequenceClassification",
        "SEQ_CLS",
        "encoder",
        _bert_terms,
        head=("classifier",),
    ),
    Case(
        "bert_token_cls",
        lambda: transformers.BertConfig(**_ENC),
        "AutoModelForTokenClassification",
        "TOKEN_CLS",
        "encoder",
        _bert_terms,
        head=("classifier",),
    ),
    Case(
        "roberta_qa",
        lambda: transformers.RobertaConfig(
            **{**_ENC, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2, "num_labels": 2}  # start, end
        ),
        "AutoModelForQuestionAnswering",
        "QUESTION_ANS",
        "encoder",
        _bert_terms,
        head=("qa_outputs",),
    ),
    Case(
        "gpt2",
        lambda: transformers.GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            pad_token_id=PAD,
            bos_token_id=1,
            eos_token_id=2,
        ),
        "AutoModelForCausalLM",
        "CAUSAL_LM",
        "decoder",
        _gpt2_terms,
        fused=("attn.c_attn", _gpt2_slice),
    ),
    Case(
        "opt",
        lambda: transformers.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=37,
            word_embed_proj_dim=32,
            max_position_embeddings=64,
            pad_token_id=PAD,
            bos_token_id=1,
            eos_token_id=2,
        ),
        "AutoModelForCausalLM",
        "CAUSAL_LM",
        "decoder",
        _opt_terms,
    ),
    Case(
        "llama",
        lambda: transformers.LlamaConfig(**_DEC),
        "AutoModelForCausalLM",
        "CAUSAL_LM",
        "decoder",
        _llama_terms,
        bitfit_kwargs={"add_missing_bias": True},
    ),
    Case(
        "mistral",
        lambda: transformers.MistralConfig(**_DEC, sliding_window=None),
        "AutoModelForCausalLM",
        "CAUSAL_LM",
        "decoder",
        _llama_terms,
        bitfit_kwargs={"add_missing_bias": True},
    ),
    Case(
        "qwen2",
        lambda: transformers.Qwen2Config(**_DEC),
        "AutoModelForCausalLM",
        "CAUSAL_LM",
        "decoder",
        _qwen2_terms,
    ),
    Case(
        "t5",
        lambda: transformers.T5Config(
            vocab_size=VOCAB,
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            **_SEQ2SEQ_IDS,
        ),
        "AutoModelForSeq2SeqLM",
        "SEQ_2_SEQ_LM",
        "seq2seq",
        _t5_terms,
        bitfit_kwargs={"add_missing_bias": True},
    ),
    Case(
        "bart",
        lambda: transformers.BartConfig(
            vocab_size=VOCAB,
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=37,
            decoder_ffn_dim=41,
            max_position_embeddings=64,
            forced_eos_token_id=None,
            **_SEQ2SEQ_IDS,
        ),
        "AutoModelForSeq2SeqLM",
        "SEQ_2_SEQ_LM",
        "seq2seq",
        _bart_terms,
    ),
    Case(
        "vit",
        lambda: transformers.ViTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
            image_size=16,
            patch_size=4,
            num_channels=3,
            num_labels=3,
        ),
        "AutoModelForImageClassification",
        None,
        "vision",
        _vit_terms,
        bitfit_kwargs={"modules_to_save": ["classifier"]},
        head=("classifier",),
    ),
    Case(
        "gpt_neox",
        lambda: transformers.GPTNeoXConfig(**{**_DEC, "num_key_value_heads": None}, rotary_pct=0.5),
        "AutoModelForCausalLM",
        "CAUSAL_LM",
        "decoder",
        _neox_terms,
        fused=("attention.query_key_value", _neox_slice),
    ),
]
CASES_BY_NAME = {c.name: c for c in CASES}
