"""Compact adapter storage (`bitfit_peft.compact`): round trips per dtype and sparsity, sizes, errors, peft loading."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest
import torch
from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertForSequenceClassification

from bitfit_peft import BitFitConfig, compact

FORMS = [(d, k) for d in compact.SAVE_DTYPES for k in (None, 0.3)]
# Largest error each dtype may add, relative to the tensor's absmax (int8: half a step of absmax / 127).
REL_ERROR = {"float32": 0.0, "bfloat16": 2**-8, "float16": 2**-11, "int8": 0.5 / 127 + 1e-6}


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    config = BitFitConfig(task_type="SEQ_CLS", bias_terms=["query", "intermediate"], init_weights=False)
    return get_peft_model(BertForSequenceClassification(cfg), config).eval()


def _bert_base_state() -> dict[str, torch.Tensor]:
    """A BERT-base-shaped b_q + b_m2 adapter with its classifier, values like a trained one."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for i in range(12):
        for module, n in (("attention.self.query", 768), ("intermediate.dense", 3072)):
            state[f"base_model.model.bert.encoder.layer.{i}.{module}.bitfit_delta"] = (
                torch.randn(n, generator=g) * 0.05
            )
    state["base_model.model.classifier.weight"] = torch.randn(2, 768, generator=g) * 0.05
    state["base_model.model.classifier.bias"] = torch.randn(2, generator=g) * 0.05
    return state


def _file_bytes(tensors: dict[str, torch.Tensor], path: str, module_order: bool = False) -> int:
    save_file(tensors, path, metadata=compact.safetensors_metadata(tensors, module_order=module_order))
    with open(path, "rb") as f:
        return len(f.read())


@pytest.mark.parametrize(("dtype", "keep"), FORMS, ids=[f"{d}-{k}" for d, k in FORMS])
def test_round_trip_through_a_file(dtype: str, keep: float | None, tmp_path) -> None:
    state = get_peft_model_state_dict(_model())
    encoded = compact.encode(state, dtype, keep)
    assert compact.is_packed(encoded) and not compact.is_packed(state)
    path = str(tmp_path / "a.safetensors")
    save_file(encoded, path)
    decoded = compact.decode(load_file(path))
    assert list(decoded) == list(state) or set(decoded) == set(state)
    for key, value in state.items():
        out = decoded[key]
        assert out.dtype == torch.float32 and out.shape == value.shape
        kept = out != 0
        if keep is not None and key.endswith("bitfit_delta"):
            n = value.numel()
            assert int(kept.sum()) == max(1, round(keep * n)), key
            threshold = value.abs().flatten().sort(descending=True).values[int(kept.sum()) - 1]
            assert bool((value.abs()[kept] >= threshold).all()), f"{key}: kept entries are not the largest"
        else:
            kept = torch.ones_like(value, dtype=torch.bool)
        bound = REL_ERROR[dtype] * float(value.abs().max())
        assert float((out[kept] - value[kept]).abs().max()) <= bound + 1e-12, key


def test_float32_packed_gives_the_same_outputs_as_the_original() -> None:
    model, fresh = _model(), _model()
    with torch.no_grad():
        for name, param in fresh.named_parameters():
            if "bitfit_delta" in name or "modules_to_save" in name:
                param.zero_()  # a different adapter on the same base
    x = torch.randint(0, 50, (3, 6))
    state = compact.decode(compact.encode(get_peft_model_state_dict(model), "float32"))
    assert not set_peft_model_state_dict(fresh, state).unexpected_keys
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=x).logits, model(input_ids=x).logits)


def test_int8_head_scale_found_after_peft_renames_the_head_key() -> None:
    state = get_peft_model_state_dict(_model())
    encoded = compact.encode(state, "int8")
    # the layout lists heads without peft's prefix: files written by one version must decode in another
    assert sorted(compact.read_layout(encoded)["heads"]) == ["classifier.bias", "classifier.weight"]
    renamed = {k.replace(".classifier.", ".classifier.modules_to_save.default."): v for k, v in encoded.items()}
    decoded = compact.decode(renamed)
    key = "base_model.model.classifier.modules_to_save.default.weight"
    assert torch.allclose(decoded[key], state["base_model.model.classifier.weight"], atol=1e-2)


@pytest.mark.parametrize("keep", [0.004, 0.05, 0.5])
def test_sparse_positions_round_trip_and_pick_the_smaller_encoding(keep: float) -> None:
    state = {"m.bitfit_delta": torch.randn(5000, generator=torch.Generator().manual_seed(1))}
    encoded = compact.encode(state, "float32", keep)
    k = round(keep * 5000)
    encoding = compact.read_layout(encoded)["sparse"]["encoding"]
    assert encoding == ("gaps" if k < 5000 / 8 else "bitmap")
    assert encoded[compact.POSITIONS_KEY].numel() <= 5000 / 8 + 1
    out = compact.decode(encoded)["m.bitfit_delta"]
    top = state["m.bitfit_delta"].abs().topk(k).indices
    assert torch.equal(out[top], state["m.bitfit_delta"][top]) and int((out != 0).sum()) == k


def test_dense_files_stay_within_5_percent_of_their_payload(tmp_path) -> None:
    state = _bert_base_state()
    for dtype in compact.SAVE_DTYPES:
        encoded = compact.encode(state, dtype)
        size = _file_bytes(encoded, str(tmp_path / f"{dtype}.safetensors"), module_order=True)
        assert size <= 1.05 * compact.payload_bytes(encoded), dtype


def test_bert_base_b_q_b_m2_fits_in_32_kb(tmp_path) -> None:
    deltas = {k: v for k, v in _bert_base_state().items() if k.endswith("bitfit_delta")}
    encoded = compact.encode(deltas, "int8", keep_fraction=0.5)
    assert _file_bytes(encoded, str(tmp_path / "a.safetensors")) <= 32 * 1024


def test_metadata_records_the_module_order() -> None:
    state = get_peft_model_state_dict(_model())
    meta = compact.safetensors_metadata(compact.encode(state, "bfloat16"))
    modules = [meta["bitfit_module_prefix"] + m for m in meta["bitfit_modules"].split(",")]
    assert modules == [
        k.removeprefix("base_model.model.").removesuffix(".bitfit_delta") for k in state if "bitfit" in k
    ]
    assert meta["bitfit_dtype"] == "bfloat16" and meta["format"] == "pt" and meta["bitfit_layout"] == "1"
    assert "bitfit_keep_fraction" not in meta
    assert meta["bitfit_module_prefix"] == "bert.encoder.layer."
    # the common prefix stops at a whole component: "h.1" is shared by h.10 and h.11 but is not a module path
    split = compact.safetensors_metadata(
        compact.encode({f"base_model.model.h.{i}.mlp.bitfit_delta": torch.ones(2) for i in (10, 11)}, "float16")
    )
    assert (split["bitfit_module_prefix"], split["bitfit_modules"]) == ("h.", "10.mlp,11.mlp")
    sparse = compact.safetensors_metadata(compact.encode(state, "int8", 0.25), module_order=False)
    assert sparse == {"format": "pt", "bitfit_layout": "1", "bitfit_dtype": "int8", "bitfit_keep_fraction": "0.25"}


def test_integer_tensors_pass_through_a_packed_file_unchanged() -> None:
    """encode keeps a non-floating tensor as it is (only floating heads are cast or scaled); decode gives it back."""
    state = {"m.bitfit_delta": torch.ones(2), "n": torch.tensor([3, -4])}
    for dtype in ("float16", "int8"):
        out = compact.decode(compact.encode(state, dtype))
        assert out["n"].dtype == torch.int64 and out["n"].tolist() == [3, -4], dtype


def test_unpacked_state_decodes_to_float32() -> None:
    out = compact.decode({"a.bitfit_delta": torch.ones(2, dtype=torch.bfloat16), "n": torch.tensor([3, -4])})
    assert out["a.bitfit_delta"].dtype == torch.float32
    assert out["n"].dtype == torch.int64 and out["n"].tolist() == [3, -4]  # only floating tensors change dtype


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"save_dtype": "int4"}, "Invalid save_dtype 'int4'"),
        ({"keep_fraction": 0.0}, r"keep_fraction must be in \(0, 1\]"),
        ({"keep_fraction": 1.5}, r"keep_fraction must be in \(0, 1\]"),
    ],
)
def test_encode_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    args = {"save_dtype": "int8", **kwargs}
    with pytest.raises(ValueError, match=match):
        compact.encode({"m.bitfit_delta": torch.ones(3)}, **args)


def test_encode_rejects_bad_state() -> None:
    with pytest.raises(ValueError, match="No 'bitfit_delta' tensors"):
        compact.encode({"classifier.weight": torch.ones(2)}, "int8")
    packed = compact.encode({"m.bitfit_delta": torch.ones(3)}, "int8")
    with pytest.raises(ValueError, match="already packed"):
        compact.encode(packed, "int8")
    with pytest.raises(ValueError, match="NaN or inf"):
        compact.encode({"m.bitfit_delta": torch.tensor([1.0, float("nan")])}, "int8")


def test_decode_reports_corrupt_files() -> None:
    packed = compact.encode({"m.bitfit_delta": torch.arange(6.0)}, "int8", keep_fraction=0.5)
    with pytest.raises(ValueError, match="bitfit_layout cannot be read|truncated"):
        compact.decode({**packed, compact.LAYOUT_KEY: packed[compact.LAYOUT_KEY][:10]})
    with pytest.raises(ValueError, match="holds 2 values but the layout needs 3"):
        compact.decode({**packed, compact.PACKED_KEY: packed[compact.PACKED_KEY][:2]})
    with pytest.raises(ValueError, match="no bitfit_positions"):
        compact.decode({k: v for k, v in packed.items() if k != compact.POSITIONS_KEY})
    with pytest.raises(ValueError, match=r"bitfit_layout is there but bitfit_packed is missing\. Save it again\."):
        compact.decode({k: v for k, v in packed.items() if k != compact.PACKED_KEY})
    with pytest.raises(ValueError, match=r"int8 tensor head.weight has no scale in the layout\. Save it again\."):
        compact.decode({**packed, "head.weight": torch.ones(2, dtype=torch.int8)})  # not among the layout's heads


def test_decode_gives_float32_under_a_float64_default_dtype() -> None:
    """The deltas decode to float32 as documented, also in a process that set torch's default dtype to float64
    (int8 scales and the zero-filled sparse buffer are built with an explicit dtype)."""
    state = {"m.bitfit_delta": torch.tensor([1.0, -2.0, 0.5, 4.0])}
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        for dtype, keep in (("int8", None), ("float16", 0.5), ("int8", 0.5)):
            out = compact.decode(compact.encode(state, dtype, keep))["m.bitfit_delta"]
            assert out.dtype == torch.float32, (dtype, keep, out.dtype)
    finally:
        torch.set_default_dtype(old)


def test_gap_encoding_handles_gaps_longer_than_a_byte() -> None:
    positions = np.array([0, 300, 301, 1000, 1999])
    encoding, data = compact._encode_positions(positions, 2000)
    assert encoding == "gaps"
    assert np.array_equal(compact._decode_positions(data, "gaps", 2000), positions)


def _base() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    return BertForSequenceClassification(cfg).eval()


def _int6(x: torch.Tensor) -> tuple[float, torch.Tensor]:
    scale = float(x.abs().max()) / 31.0 if x.numel() else 0.0
    return scale, (torch.round(x / scale) if scale else torch.zeros_like(x)).clamp(-31, 31).to(torch.int16)


def test_a_new_storage_dtype_is_one_codec_entry(tmp_path) -> None:
    """Registering a codec is all it takes: the config accepts it (and refuses it unpacked, being scaled), saving
    encodes and loading decodes through peft, the CLI offers it, and the size accounting counts its scales."""
    from peft import PeftModel

    from bitfit_peft.cli import build_parser, parse_target

    compact.register_codec(compact.Codec("int6", torch.int16, quantize=_int6))
    try:
        with pytest.raises(ValueError, match="packed=False cannot store save_dtype='int6'"):
            BitFitConfig(save_dtype="int6", packed=False)
        model = get_peft_model(_base(), BitFitConfig(task_type="SEQ_CLS", init_weights=False, save_dtype="int6"))
        model.save_pretrained(str(tmp_path))
        tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
        layout = compact.read_layout(tensors)
        assert layout["dtype"] == "int6" and tensors[compact.PACKED_KEY].dtype == torch.int16
        heads = [v for k, v in tensors.items() if "classifier" in k]
        assert layout["heads"] and heads and all(v.dtype == torch.int16 for v in heads)  # the head is stored scaled
        assert compact.payload_bytes(tensors) == sum(
            t.numel() * t.element_size() for k, t in tensors.items() if k != compact.LAYOUT_KEY
        ) + 4 * (len(layout["scales"]) + len(layout["head_scales"]))
        loaded = PeftModel.from_pretrained(_base(), str(tmp_path))
        want = {k: v for k, v in model.state_dict().items() if "bitfit_delta" in k}
        got = loaded.state_dict()
        for key, value in want.items():
            step = float(value.abs().max()) / 31
            assert torch.allclose(got[key], value, atol=step / 2 + 1e-7), key
        assert parse_target("int6:0.5", "float32") == ("int6", 0.5)
        convert = build_parser()._subparsers._group_actions[0].choices["convert"]  # type: ignore[union-attr]
        assert "int6" in next(a.help for a in convert._actions if a.dest == "to")
    finally:
        del compact.CODECS["int6"]
    with pytest.raises(ValueError, match=r"Invalid save_dtype 'int6'. Must be one of \['float32'"):
        BitFitConfig(save_dtype="int6")


# gaps of 254-256, 509-511 and 765-766 sit on either side of one, two and three escape bytes (255 each)
STRADDLING_GAPS = [254, 255, 256, 509, 510, 511, 765, 766, 0, 1]


def test_sparse_gaps_that_straddle_the_escape_value_round_trip_exactly() -> None:
    positions = np.cumsum(np.array(STRADDLING_GAPS) + 1) - 1  # a gap of g: g positions skipped before the next
    total = int(positions[-1]) + 300  # the last kept position is not the last one
    encoding, data = compact._encode_positions(positions, total)
    assert encoding == "gaps"
    assert np.array_equal(compact._decode_positions(data, "gaps", total), positions)
    # the same through encode/decode: the kept values are the only large ones
    values = torch.full((total,), 1e-3)
    values[torch.from_numpy(positions)] = torch.arange(1, len(positions) + 1, dtype=torch.float32)
    encoded = compact.encode({"m.bitfit_delta": values}, "float32", keep_fraction=len(positions) / total)
    assert compact.read_layout(encoded)["sparse"]["encoding"] == "gaps"
    expected = torch.zeros(total)
    expected[torch.from_numpy(positions)] = values[torch.from_numpy(positions)]
    assert torch.equal(compact.decode(encoded)["m.bitfit_delta"], expected)


@pytest.mark.parametrize(("dtype", "keep"), [("float32", None), ("int8", None), ("bfloat16", 0.5)])
def test_keys_in_unsorted_order_keep_their_own_values(dtype: str, keep: float | None) -> None:
    """The layout lists keys in the state dict's order; a reader or writer that sorts one side only would hand each
    value to another key (and a value of another size would not even reshape)."""
    names = ["z.bitfit_delta", "a.bitfit_delta", "m.x.bitfit_delta", "b.bitfit_delta"]
    pattern = torch.tensor([1.0, -1.5, 0.5, 2.0])
    state = {name: pattern * (i + 1) for i, name in enumerate(names)}
    state["q.bitfit_delta"] = torch.tensor([8.0, -6.0])  # another size: a misplaced split shifts every value after
    out = compact.decode(compact.encode(state, dtype, keep))
    assert list(out) == list(state)
    for key, value in state.items():
        expected = value
        if keep is not None:
            kept = value.abs().topk(round(keep * value.numel())).indices
            expected = torch.zeros_like(value).index_copy(0, kept, value[kept])
        step = float(value.abs().max()) / 127  # int8's step; bfloat16 errs by less on these values
        assert torch.allclose(out[key], expected, rtol=0, atol=step / 2 + 1e-6), key


def test_int8_is_exact_at_scale_one_zero_for_zero_tensors_and_symmetric_without_wrapping() -> None:
    """absmax 127 gives scale 1.0 (integers come back exactly); an all-zero tensor decodes to zeros; deltas so small
    that their float32 scale is subnormal (coarse, so x / scale passes 127) keep their sign and symmetry instead of
    wrapping around in int8; smaller ones still (a zero scale) decode to zeros, not NaN."""
    state = {
        "a.bitfit_delta": torch.tensor([127.0, -64.0, 3.0]),
        "z.bitfit_delta": torch.zeros(2),
        "t.bitfit_delta": torch.tensor([2e-43, -2e-43]),
        "u.bitfit_delta": torch.tensor([4e-44, 0.0]),
    }
    out = compact.decode(compact.encode(state, "int8"))
    assert torch.equal(out["a.bitfit_delta"], state["a.bitfit_delta"])
    assert torch.equal(out["z.bitfit_delta"], torch.zeros(2))
    tiny = out["t.bitfit_delta"]
    assert 0 < float(tiny[0]) <= 2e-43 and float(tiny[1]) == -float(tiny[0]), tiny.tolist()
    assert torch.equal(out["u.bitfit_delta"], torch.zeros(2))


def test_sparse_positions_out_of_range_or_not_uint8_bytes_are_refused() -> None:
    """A crafted positions tensor must not place a value outside its delta, nor anywhere else: positions past the
    layout's size (by bitmap or by gaps) and positions stored as other than 1-D uint8 (an int64 gap of -4 would
    index from the end) are refused."""
    values = torch.arange(1.0, 601.0)
    gaps = compact.encode({"m.bitfit_delta": values}, "float32", keep_fraction=0.01)  # 594..599: gap bytes
    bitmap = compact.encode({"m.bitfit_delta": values[:6]}, "float32", keep_fraction=0.5)  # 3..5: one bitmap byte
    assert [compact.read_layout(p)["sparse"]["encoding"] for p in (gaps, bitmap)] == ["gaps", "bitmap"]
    stored = gaps[compact.POSITIONS_KEY]
    past = stored.clone()
    past[-1] += 1  # the last kept position becomes 600, one past the end
    with pytest.raises(
        ValueError, match=r"position 600 is out of range \(the layout has 600 values\)\. Save the adapter again\.$"
    ):
        compact.decode({**gaps, compact.POSITIONS_KEY: past})
    bits = bitmap[compact.POSITIONS_KEY].clone()
    assert bits.tolist() == [0b00111000]
    bits[0] |= 0b01000000  # position 6 of 6
    with pytest.raises(ValueError, match=r"sparse position 6 is out of range \(the layout has 6 values\)"):
        compact.decode({**bitmap, compact.POSITIONS_KEY: bits})
    for bad, what in (
        (torch.tensor([-4, 200, 0, 0, 0, 0]), r"torch.int64 of shape \(6,\)"),
        (stored.reshape(2, -1), r"torch.uint8 of shape \(2, 4\)"),
    ):
        match = (
            rf"bitfit_positions is {what}, expected torch.uint8 bytes \(one dimension\)\. Save the adapter again\.$"
        )
        with pytest.raises(ValueError, match=match):
            compact.decode({**gaps, compact.POSITIONS_KEY: bad})
    layout = compact.read_layout(gaps)
    layout["sparse"]["encoding"] = "rle"
    raw = zlib.compress(json.dumps(layout).encode())  # float32: no scales follow the JSON
    with pytest.raises(ValueError, match=r"Unknown sparse position encoding 'rle' \(known: \['bitmap', 'gaps'\]\)"):
        compact.decode({**gaps, compact.LAYOUT_KEY: torch.frombuffer(bytearray(raw), dtype=torch.uint8)})


@pytest.mark.parametrize(("dtype", "keep"), [("int8", 0.5), ("float16", 0.5), ("int8", None)])
def test_an_empty_delta_round_trips_first_or_last(dtype: str, keep: float | None) -> None:
    """A zero-size delta keeps no value, so no kept position falls in it; the deltas after it, and its own scale,
    still line up (per-tensor counts must cover every delta, also those that come last with none kept). The values
    are exact in every form (int8 with absmax 127 has scale 1)."""
    for order in (["e.bitfit_delta", "m.bitfit_delta"], ["m.bitfit_delta", "e.bitfit_delta"]):
        values = {"e.bitfit_delta": torch.zeros(0), "m.bitfit_delta": torch.tensor([127.0, -1.0, 63.0, 2.0])}
        state = {key: values[key] for key in order}
        out = compact.decode(compact.encode(state, dtype, keep))
        assert list(out) == order and out["e.bitfit_delta"].shape == (0,)
        expected = torch.tensor([127.0, 0.0, 63.0, 0.0]) if keep else values["m.bitfit_delta"]
        assert torch.equal(out["m.bitfit_delta"], expected), (order, out["m.bitfit_delta"])
