"""Adapter files as untrusted input: every way a file can lie gets one clear error before the model is touched, and
the model (a bare base, or a PeftModel that already holds an adapter) stays bitwise as it was.

Each case writes a crafted adapter directory and loads it with `PeftModel.from_pretrained` and with `load_adapter`;
the options that accept what is refused by default (`bitfit_peft.files.load_policy`) are tested to load it.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from test_core import assert_same, bert, snapshot, trained

from bitfit_peft import BitFitConfig, BitFitLayer, compact
from bitfit_peft.files import load_policy

WEIGHTS = "adapter_model.safetensors"


def write_raw(path: Path, header: str, data: bytes = b"", claimed: int | None = None) -> None:
    """A safetensors file from a header written by hand (so it can repeat keys or lie about its length)."""
    raw = header.encode()
    path.write_bytes(struct.pack("<Q", len(raw) if claimed is None else claimed) + raw + data)


def packed_dir(tmp_path: Path, save_dtype: str = "int8") -> Path:
    _, path = trained(tmp_path, "p", save_dtype=save_dtype)
    return path


def repack(path: Path, change: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> None:
    tensors = load_file(path / WEIGHTS)
    save_file(change(tensors), path / WEIGHTS)


def relayout(path: Path, change: Callable[[dict], None], scales: list[float] | None = None) -> None:
    """Rewrite the layout tensor of a packed file with `change` applied to its JSON (and, optionally, new scales)."""
    import zlib

    import numpy as np

    def apply(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        layout = compact.read_layout(tensors)
        old_scales = layout.pop("scales", [])
        layout.pop("head_scales", None)
        change(layout)
        raw = zlib.compress(json.dumps(layout).encode()) + np.asarray(scales or old_scales, "<f4").tobytes()
        return {**tensors, compact.LAYOUT_KEY: torch.frombuffer(bytearray(raw), dtype=torch.uint8)}

    repack(path, apply)


def refused(path: Path, match: str) -> None:
    """Loading `path` fails with `match`, onto a bare base and into a PeftModel with an adapter, changing nothing."""
    base = bert()
    before = snapshot(base)
    with pytest.raises(ValueError, match=match):
        PeftModel.from_pretrained(base, str(path))
    assert_same(before, snapshot(base))
    model = get_peft_model(bert(), BitFitConfig(task_type="SEQ_CLS", init_weights=False)).eval()
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        model.load_adapter(str(path), adapter_name="new")
    assert_same(before, snapshot(model))


def test_header_that_claims_a_huge_length(tmp_path: Path) -> None:
    _, path = trained(tmp_path)
    write_raw(path / WEIGHTS, '{"a.bitfit_delta":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', claimed=2**40)
    refused(path, r"header claims 1,099,511,627,776 bytes .* \(limit 16,777,216\)")


def test_header_that_claims_more_bytes_than_the_file_has(tmp_path: Path) -> None:
    # under the 16 MiB limit, but past the end of the file: refused by the file's size, not parsed short
    _, path = trained(tmp_path)
    header = '{"a.bitfit_delta":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    write_raw(path / WEIGHTS, header, b"\0" * 4, claimed=len(header) + 4 + 100)
    refused(
        path, rf"header claims {len(header) + 104} bytes but the file has {len(header) + 4} after the length field\)"
    )


@pytest.mark.parametrize("second", [(0, 4), (3, 7)], ids=["same-bytes", "one-byte"])
def test_tensors_whose_bytes_overlap(second: tuple[int, int], tmp_path: Path) -> None:
    _, path = trained(tmp_path)
    entry = '"{}.bitfit_delta":{{"dtype":"F32","shape":[1],"data_offsets":[{},{}]}}'
    header = "{" + entry.format("a", 0, 4) + "," + entry.format("b", *second) + "}"
    write_raw(path / WEIGHTS, header, b"\0" * 8)
    refused(path, "tensors a.bitfit_delta and b.bitfit_delta overlap in the data section")


def test_tensor_dtype_that_a_bias_delta_cannot_have(tmp_path: Path) -> None:
    _, path = trained(tmp_path)
    repack(path, lambda t: {k: v.to(torch.int64) if "bitfit_delta" in k else v for k, v in t.items()})
    refused(path, r"has dtype torch.int64, expected floating point")
    _, path = trained(tmp_path, "one")  # one int8 delta, which safetensors stores after the float32 tensors
    last = sorted(k for k in load_file(path / WEIGHTS) if "bitfit_delta" in k)[-1]
    repack(path, lambda t: {**t, last: t[last].to(torch.int8)})
    refused(path, rf"tensor {last} has dtype torch.int8, expected floating point")


def test_packed_values_whose_dtype_disagrees_with_the_layout(tmp_path: Path) -> None:
    path = packed_dir(tmp_path)
    repack(path, lambda t: {**t, compact.PACKED_KEY: t[compact.PACKED_KEY].float()})
    refused(path, r"the layout says int8 but bitfit_packed holds torch.float32\. Save the adapter again\.$")


def test_shapes_that_disagree_with_the_config(tmp_path: Path) -> None:
    path = packed_dir(tmp_path, "bfloat16")

    def wider(layout: dict) -> None:  # consistent file, but the deltas do not fit the modules the config targets
        layout["shapes"] = [[s[0] + 1] for s in layout["shapes"]]

    def grow(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        n = len(compact.read_layout(tensors)["keys"])
        return {**tensors, compact.PACKED_KEY: torch.cat([tensors[compact.PACKED_KEY], torch.zeros(n).bfloat16()])}

    repack(path, grow)
    relayout(path, wider)
    refused(path, r"has shape \(33,\) in the checkpoint but \(32,\) in the model")


def test_a_transposed_head_weight_is_refused_by_shape_not_by_size(tmp_path: Path) -> None:
    # same number of values (2 x 32 = 32 x 2): only the shape tells that it does not fit the head
    _, path = trained(tmp_path)
    head = "classifier.weight"

    def transpose(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        key = next(k for k in tensors if k.endswith(head))
        return {**tensors, key: tensors[key].t().contiguous()}

    repack(path, transpose)
    refused(path, r"classifier\..*weight has shape \(32, 2\) in the checkpoint but \(2, 32\) in the model")


def test_sparse_position_one_past_the_end(tmp_path: Path) -> None:
    _, path = trained(tmp_path, "s", keep_fraction=0.05)

    def move(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        layout = compact.read_layout(tensors)
        total = sum(int(torch.Size(s).numel()) for s in layout["shapes"])
        encoding = layout["sparse"]["encoding"]
        positions = compact._decode_positions(tensors[compact.POSITIONS_KEY].numpy(), encoding, total).tolist()
        positions[-1] = total  # the last kept value moved just past the last delta
        gaps, previous = [], -1  # the "gaps" encoding written by hand: it can say what encode never would
        for p in positions:
            gaps += [255] * ((p - previous - 1) // 255) + [(p - previous - 1) % 255]
            previous = p
        return {**tensors, compact.POSITIONS_KEY: torch.tensor(gaps, dtype=torch.uint8)}

    repack(path, move)
    relayout(path, lambda layout: layout["sparse"].update(encoding="gaps"))
    refused(path, r"sparse position \d+ is out of range")


def test_layout_that_claims_a_huge_adapter(tmp_path: Path) -> None:
    path = packed_dir(tmp_path, "bfloat16")
    relayout(path, lambda layout: layout.update(shapes=[[2**40]] * len(layout["shapes"])))
    refused(path, r"claims .* delta values, more than any model's biases")


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "int8-scale"])
def test_nan_and_inf_refused_unless_allowed(packed: bool, tmp_path: Path) -> None:
    if packed:  # int8 values are finite by construction; a NaN scale makes the decoded deltas NaN
        path = packed_dir(tmp_path)
        layout = compact.read_layout(load_file(path / WEIGHTS))
        n = len(layout["keys"]) + len(layout.get("heads", []))  # a scale per delta tensor and per int8 head tensor
        relayout(path, lambda layout: None, scales=[float("nan")] + [0.01] * (n - 1))
        match = "decodes to NaN or inf"
    else:
        _, path = trained(tmp_path)
        repack(path, lambda t: {k: v.clone().fill_(float("inf")) if "bitfit_delta" in k else v for k, v in t.items()})
        match = "holds NaN or inf values"
    refused(path, rf"{match} .*load_policy\(allow_nonfinite=True\)")
    with load_policy(allow_nonfinite=True):
        loaded = PeftModel.from_pretrained(bert(), str(path))
    layer = next(m for m in loaded.modules() if isinstance(m, BitFitLayer))
    assert not bool(torch.isfinite(layer.bitfit_delta["default"]).all())


def test_duplicate_keys_in_the_header_and_in_the_layout(tmp_path: Path) -> None:
    _, path = trained(tmp_path)
    entry = '{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
    write_raw(path / WEIGHTS, f'{{"x.bitfit_delta":{entry},"x.bitfit_delta":{entry}}}', b"\0" * 4)
    refused(path, r"the header lists key 'x.bitfit_delta' twice")
    path = packed_dir(tmp_path)
    relayout(path, lambda layout: layout["keys"].__setitem__(1, layout["keys"][0]))
    refused(path, r"the layout lists key .* twice")


@pytest.mark.parametrize("key", ["../../etc/x.bitfit_delta", "/abs.bitfit_delta", "a..b.bitfit_delta"])
def test_path_like_keys(key: str, tmp_path: Path) -> None:
    _, path = trained(tmp_path)
    write_raw(path / WEIGHTS, json.dumps({key: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}), b"\0" * 4)
    refused(path, "is not a dotted parameter name")
    path = packed_dir(tmp_path)
    relayout(path, lambda layout: layout["keys"].__setitem__(0, key))
    refused(path, "is not a dotted '...bitfit_delta' name")


def test_pickle_only_directory_needs_an_explicit_opt_in(tmp_path: Path) -> None:
    model = get_peft_model(bert(), BitFitConfig(task_type="SEQ_CLS", init_weights=False))
    model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert not (tmp_path / "bin" / WEIGHTS).exists()
    refused(
        tmp_path / "bin",
        r"holds only a pickle checkpoint .* so they are refused by default\. Convert it with model\.save_pretrained\(\) "
        r"\(safetensors\), or, for a file you trust, .*load_policy\(allow_pickle=True\)",
    )
    with load_policy(allow_pickle=True):
        loaded = PeftModel.from_pretrained(bert(), str(tmp_path / "bin"))
    for (n, p), (_, q) in zip(model.named_parameters(), loaded.named_parameters(), strict=True):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("value", [float("nan"), float("-inf")])
@pytest.mark.parametrize("save_dtype", ["bfloat16", "float16"])
def test_nan_or_inf_in_a_plain_half_precision_file_is_refused_like_float32(
    save_dtype: str, value: float, tmp_path: Path
) -> None:
    _, path = trained(tmp_path, save_dtype=save_dtype, packed=False)
    tensors = load_file(path / WEIGHTS)
    deltas = [k for k, v in tensors.items() if "bitfit_delta" in k]
    assert {tensors[k].dtype for k in deltas} == {getattr(torch, save_dtype)}
    last = deltas[-1]  # one bad value in one tensor, not the first: a check of the first tensor only misses it
    bad = tensors[last].clone()
    bad[-1] = value
    save_file({**tensors, last: bad}, path / WEIGHTS)
    refused(path, rf"tensor {last} holds NaN or inf values .*load_policy\(allow_nonfinite=True\)")


def test_header_readers_share_the_strict_reader(tmp_path: Path) -> None:
    """`read_safetensors_header` (used by the CLI's size accounting and the store's head detection) applies the
    strict reader's header checks without reading the data."""
    from bitfit_peft.cli import CliError, header_bytes
    from bitfit_peft.files import read_safetensors_header
    from bitfit_peft.serving.prepare import head_keys

    good = tmp_path / "good" / "adapter_model.safetensors"
    good.parent.mkdir()
    save_file({"base_model.model.classifier.weight": torch.ones(2, 3), "x.bitfit_delta": torch.ones(3)}, str(good))
    header, size = read_safetensors_header(str(good))
    assert {k for k in header if k != "__metadata__"} == {"base_model.model.classifier.weight", "x.bitfit_delta"}
    assert size == 8 + int.from_bytes(good.read_bytes()[:8], "little") == header_bytes(str(good))
    assert head_keys({"t": str(good.parent)}) == {"classifier.weight"}
    bad = tmp_path / "bad" / "adapter_model.safetensors"
    bad.parent.mkdir()
    write_raw(bad, '{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {}}', b"\0" * 4)
    with pytest.raises(ValueError, match=r"bad/adapter_model.safetensors is not a valid .*lists key 'a' twice"):
        read_safetensors_header(str(bad))
    with pytest.raises(CliError, match="twice"):
        header_bytes(str(bad))
    assert head_keys({"t": str(bad.parent)}) is None
    write_raw(bad, "{}", claimed=1 << 40)
    with pytest.raises(ValueError, match="the header claims"):
        read_safetensors_header(str(bad))


def test_adapter_config_is_read_in_one_place(tmp_path: Path) -> None:
    """`config.read_config` is how the CLI, the serving store and `hotswap_adapter` read adapter_config.json: a
    saved config comes back as the `BitFitConfig` that was saved, keys of a newer peft are ignored, and every bad
    config is refused by all of them with the same message, naming the file and the fix."""
    from bitfit_peft.cli import CliError, read_adapter
    from bitfit_peft.config import read_config
    from bitfit_peft.loading import hotswap_adapter
    from bitfit_peft.serving.adapters import AdapterError
    from bitfit_peft.serving.adapters import read_adapter as serving_read

    model, out = trained(tmp_path, bias_terms=["query", "intermediate"], labels=["neg", "pos"])
    saved = model.peft_config["default"]
    config_file = out / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "a_newer_peft_field": 1}))
    back = read_config(str(out))
    assert isinstance(back, BitFitConfig)
    for name in ("bias_terms", "labels", "task_type", "base_fingerprint", "save_dtype", "add_missing_bias"):
        assert getattr(back, name) == getattr(saved, name), name
    assert back.to_json_dict()["bias_terms"] == ["intermediate", "query"]

    def readers(path: Path, hotswap: bool = True) -> list[str]:
        messages = []
        for read, error in (
            (lambda: read_config(str(path)), ValueError),
            (lambda: read_adapter(str(path)), CliError),
            (lambda: serving_read("t", str(path)), AdapterError),
            *([(lambda: hotswap_adapter(model, str(path)), ValueError)] if hotswap else []),
        ):
            with pytest.raises(error) as caught:
                read()
            messages.append(str(caught.value))
        return messages

    good = json.loads(config_file.read_text())
    before = snapshot(model)
    cases = {
        "{not json": r"adapter_config.json: cannot read it as JSON .*save the adapter again",
        json.dumps({**good, "peft_type": "LORA"}): r"not a BitFit adapter \(peft_type 'LORA', expected 'BITFIT'\)",
        json.dumps({**good, "bias_terms": ["nope"]}): r"adapter_config.json: Unknown bias_terms \['nope'\]",
        json.dumps({**good, "keep_fraction": 2}): r"adapter_config.json: Invalid keep_fraction 2",
    }
    for text, pattern in cases.items():
        config_file.write_text(text)
        for message in readers(out):
            assert re.search(pattern, message), (pattern, message)
    config_file.unlink()  # hotswap_adapter takes a directory of weights alone, as it takes a state dict
    for message in readers(out, hotswap=False):
        assert "there is no adapter_config.json" in message, message
    assert_same(snapshot(model), before)  # no refused hotswap touched the model


def test_a_file_too_short_for_its_header_says_which_length_is_wrong(tmp_path: Path) -> None:
    """7 bytes cannot hold the length field; 8 bytes hold it but no header: each error names what is missing."""
    from bitfit_peft.files import read_safetensors, read_safetensors_header

    path = tmp_path / WEIGHTS
    path.write_bytes(b"\2" + b"\0" * 6)
    for read in (read_safetensors, read_safetensors_header):
        with pytest.raises(
            ValueError, match=rf"{WEIGHTS} is not a valid .*the file has 7 bytes, fewer than the 8-byte"
        ):
            read(str(path))
    write_raw(path, "", claimed=2)
    for read in (read_safetensors, read_safetensors_header):
        with pytest.raises(ValueError, match=r"the header claims 2 bytes but the file has 0 after the length field\)"):
            read(str(path))


def test_empty_tensors_read_back_with_their_shape_and_dtype(tmp_path: Path) -> None:
    """A zero-size tensor (begin == end in the header) is valid safetensors; it reads back as written, beside the
    tensors that hold data."""
    from bitfit_peft.files import read_safetensors

    written = {
        "a.bitfit_delta": torch.zeros(0, dtype=torch.float16),
        "b.weight": torch.ones(2, 0, dtype=torch.int8),
        "c.bitfit_delta": torch.tensor([1.0, -2.0, 3.0]),
    }
    save_file(written, str(tmp_path / WEIGHTS))
    tensors, metadata = read_safetensors(str(tmp_path / WEIGHTS))
    assert metadata == {} and set(tensors) == set(written)
    for key, value in written.items():
        assert tensors[key].dtype == value.dtype and tensors[key].shape == value.shape, key
        assert torch.equal(tensors[key], value), key


def test_tensors_whose_byte_ranges_overlap_are_refused(tmp_path: Path) -> None:
    """Each entry's range fits its shape, but the second reuses the first one's bytes: a crafted file."""
    _, path = trained(tmp_path)
    entries = {
        "x.bitfit_delta": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "y.bitfit_delta": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
    }
    write_raw(path / WEIGHTS, json.dumps(entries), b"\0" * 8)
    refused(path, r"tensors x.bitfit_delta and y.bitfit_delta overlap in the data section")


def test_unreadable_and_corrupt_files_name_the_file_and_the_fix(tmp_path: Path) -> None:
    from bitfit_peft.files import read_safetensors, read_safetensors_header

    for read in (read_safetensors, read_safetensors_header):
        with pytest.raises(ValueError, match=rf"Cannot read adapter file {tmp_path}: \[Errno 21\] Is a directory"):
            read(str(tmp_path))
    path = tmp_path / WEIGHTS
    write_raw(path, "[1]")
    with pytest.raises(ValueError, match=r"the header is not a JSON object\)\. It may be truncated or corrupt \(or "
                       r"crafted\): save the adapter again with model\.save_pretrained\(\)\.$"):  # fmt: skip
        read_safetensors(str(path))


def test_integer_tensor_in_a_packed_file_must_be_a_head_the_layout_scales(tmp_path: Path) -> None:
    """A packed bfloat16 file has no int8 heads: an integer head there is refused, as in a plain file."""
    path = packed_dir(tmp_path, "bfloat16")
    key = "base_model.model.classifier.bias"
    repack(path, lambda t: {**t, key: t[key].to(torch.int64)})
    refused(
        path,
        rf"tensor {key} has dtype torch.int64, expected floating point \(integer tensors appear only in a packed "
        r"layout: bitfit_packed, bitfit_layout, bitfit_positions, and int8 task heads the layout lists\)",
    )


def test_a_directory_without_weights_says_which_file_is_missing(tmp_path: Path) -> None:
    _, path = trained(tmp_path)
    (path / WEIGHTS).unlink()
    refused(path, rf"No adapter weights in {path}/?: expected {WEIGHTS} next to adapter_config.json \(written by")


def test_header_metadata_must_map_names_to_strings_and_a_header_alone_is_a_valid_file(tmp_path: Path) -> None:
    from bitfit_peft.files import read_safetensors

    path = tmp_path / WEIGHTS
    for metadata in ('{"format": 1}', '["pt"]'):
        write_raw(path, f'{{"__metadata__": {metadata}}}')
        with pytest.raises(ValueError, match="__metadata__ must map names to strings"):
            read_safetensors(str(path))
    write_raw(path, '{"__metadata__": {"format": "pt"}}')  # no tensors: the header fills the file exactly
    assert read_safetensors(str(path)) == ({}, {"format": "pt"})


def test_an_adapter_holding_nan_saves_and_loads_back_only_when_allowed(tmp_path: Path) -> None:
    """Saving does not judge the values (a diverged run's adapter can be kept and inspected); loading refuses NaN
    unless `load_policy(allow_nonfinite=True)`, which brings it back where it was."""
    model = get_peft_model(bert(), BitFitConfig(task_type="SEQ_CLS", init_weights=False, save_dtype="float16"))
    name, layer = next((n, m) for n, m in model.named_modules() if isinstance(m, BitFitLayer))
    with torch.no_grad():
        layer.bitfit_delta["default"][1] = float("nan")
    model.save_pretrained(tmp_path / "a")
    refused(tmp_path / "a", r"tensor bitfit_packed holds NaN or inf values")
    with load_policy(allow_nonfinite=True):
        loaded = PeftModel.from_pretrained(bert(), str(tmp_path / "a"))
    delta = loaded.get_submodule(name).bitfit_delta["default"]
    assert torch.isnan(delta).tolist() == [i == 1 for i in range(delta.numel())]


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ("5", r"tensor a.bitfit_delta has dtype 5\)"),
        ('{"dtype": "F8", "shape": [1], "data_offsets": [0, 4]}', r"tensor a.bitfit_delta has dtype 'F8'\)"),
        ('{"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}', r"tensor a.bitfit_delta has shape \[-1\]\)"),
        ('{"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}', r"tensor a.bitfit_delta has shape \[1.0\]\)"),
        ('{"dtype": "F32", "shape": "1", "data_offsets": [0, 4]}', r"tensor a.bitfit_delta has shape '1'\)"),
        ('{"dtype": "F32", "shape": [1], "data_offsets": [4]}', r"tensor a.bitfit_delta has data_offsets \[4\]\)"),
        ('{"dtype": "F32", "shape": [1], "data_offsets": [0, "4"]}', r"has data_offsets \[0, '4'\]\)"),
        ('{"dtype": "F32", "shape": [1], "data_offsets": "0,4"}', r"tensor a.bitfit_delta has data_offsets '0,4'\)"),
        (
            '{"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}',
            r"tensor a.bitfit_delta \(F32 \[2\]\) needs 8 bytes but its data_offsets \[4, 12\] span 8 of a 4-byte data",
        ),
    ],
    ids=[
        "not-a-dict",
        "dtype",
        "negative",
        "float-dim",
        "shape-str",
        "one-offset",
        "str-offset",
        "offsets-str",
        "past",
    ],
)
def test_a_header_entry_that_lies_is_named_with_what_is_wrong(entry: str, match: str, tmp_path: Path) -> None:
    """Every field of a header entry is checked before a tensor is built; the error names the tensor and the value."""
    from bitfit_peft.files import read_safetensors

    write_raw(tmp_path / WEIGHTS, f'{{"a.bitfit_delta": {entry}}}', b"\0" * 4)
    with pytest.raises(ValueError, match=match):
        read_safetensors(str(tmp_path / WEIGHTS))
