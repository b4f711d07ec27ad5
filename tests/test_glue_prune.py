"""train.py --keep-fraction: masked re-training of a pruned BitFit adapter, saved int8 + sparse; eval_compact.py.

Every test uses the tiny random BERT and tiny SST-2 of glue_helpers (no dropout, so runs are deterministic).
"""

from __future__ import annotations

import json
import os
import pathlib

import pytest
import torch
from glue_helpers import make_tiny_glue, make_tiny_model
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(1)

from glue_bitfit import prune, train  # noqa: E402
from glue_bitfit.options import parse_args  # noqa: E402

from bitfit_peft import compact  # noqa: E402

BIAS_TERMS = ["--bias-terms", "query", "intermediate"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("prune")
    model = make_tiny_model(root / "model", dropout=0.0)
    data = make_tiny_glue(root / "data")
    dense = root / "dense"
    args = ["--model", model, "--data-dir", data, "--task", "sst2", "--batch-size", "8", "--no-checkpoints"]
    assert train.main([*args, *BIAS_TERMS, "--epochs", "2", "--lr", "1e-2", "--output-dir", str(dense)]) == 0
    return {"model": model, "data": data, "dense": str(dense)}


def _args(tiny: dict[str, str], out: pathlib.Path, *extra: str) -> list[str]:
    common = ["--model", tiny["model"], "--data-dir", tiny["data"], "--task", "sst2", "--batch-size", "8"]
    return [*common, "--no-checkpoints", "--output-dir", str(out), *BIAS_TERMS, "--lr", "1e-2", *extra]


def _deltas(path: pathlib.Path) -> dict[str, torch.Tensor]:
    state = compact.decode(load_file(str(path)))
    return {k: v for k, v in state.items() if k.endswith(compact.DELTA_MARKER)}


def test_retrain_holds_pruned_entries_at_zero_and_moves_kept_ones(
    tiny: dict[str, str], tmp_path: pathlib.Path
) -> None:
    """In memory, after re-training: pruned entries exactly 0, kept ones trained further, masks = top-|delta|."""
    args = parse_args(_args(tiny, tmp_path / "r", "--init-adapter", tiny["dense"], "--keep-fraction", "0.3"))
    s, state = train.setup(args)
    before = [p.detach().clone() for p in prune.delta_parameters(s.model)]
    prune.retrain(s, state)
    after = [p.detach() for p in prune.delta_parameters(s.model)]
    assert len(after) == 4  # 2 layers x (query, intermediate)
    for b, a, (_, mask) in zip(before, after, s.masks, strict=True):
        kept = b.abs().topk(prune.kept_count(b.numel(), 0.3)).indices
        assert torch.equal(mask.nonzero().flatten().sort().values, kept.sort().values)
        assert torch.count_nonzero(a[mask == 0]) == 0
        assert not torch.equal(a[mask == 1], b[mask == 1])
    assert state.completed_steps == s.steps_per_epoch  # one re-training epoch, no normal epochs


def test_init_adapter_run_saves_compact_file_and_records_it(tiny: dict[str, str], tmp_path: pathlib.Path) -> None:
    out = tmp_path / "sparse"
    assert train.main(_args(tiny, out, "--init-adapter", tiny["dense"], "--keep-fraction", "0.4")) == 0
    results = json.loads((out / "results.json").read_text())
    dense = json.loads((pathlib.Path(tiny["dense"]) / "results.json").read_text())
    assert results["keep_fraction"] == 0.4 and results["save_dtype"] == "int8"
    assert results["epochs"] == 0 and results["retrain_epochs"] == 1 and results["retrain_lr"] == 1e-2
    assert results["init_adapter"] == tiny["dense"]
    assert results["adapter_bytes"] == (out / "adapter_model.safetensors").stat().st_size
    assert [e["phase"] for e in results["dev"]] == ["retrain"]
    # The loaded adapter scores what the run that trained it saved as its best.
    assert results["pruning"]["before"]["accuracy"] == dense["best"]["accuracy"]
    assert set(results["pruning"]["pruned"]) == {"accuracy"}
    for path in (out / "adapter_model.safetensors", out / "final" / "adapter_model.safetensors"):
        tensors = load_file(str(path))
        layout = compact.read_layout(tensors)
        assert layout["dtype"] == "int8" and layout["sparse"]["keep_fraction"] == 0.4
        for delta in _deltas(path).values():
            assert torch.count_nonzero(delta) <= prune.kept_count(delta.numel(), 0.4)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["save_dtype"] == "int8" and config["keep_fraction"] == 0.4
    kept = sum(prune.kept_count(d.numel(), 0.4) for d in _deltas(out / "adapter_model.safetensors").values())
    assert results["pruning"]["kept"] == kept
    assert (out / "adapter_model.safetensors").stat().st_size < (pathlib.Path(tiny["dense"]) / "adapter_model.safetensors").stat().st_size  # fmt: skip


def test_keep_fraction_after_normal_training(tiny: dict[str, str], tmp_path: pathlib.Path) -> None:
    out = tmp_path / "both"
    assert train.main(_args(tiny, out, "--epochs", "1", "--keep-fraction", "0.5", "--retrain-epochs", "2")) == 0
    results = json.loads((out / "results.json").read_text())
    assert [e.get("phase") for e in results["dev"]] == [None, "retrain", "retrain"]
    assert results["best"] in results["dev"][1:]  # the saved adapter is a re-trained one
    assert results["pruning"]["before"]["accuracy"] == results["dev"][0]["accuracy"]
    assert compact.is_packed(load_file(str(out / "adapter_model.safetensors")))


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--init-adapter", "x"], "only starts a --keep-fraction"),
        (["--keep-fraction", "1.5"], r"must be in \(0, 1\), got 1.5"),
        (["--keep-fraction", "0.5", "--retrain-epochs", "0"], "--retrain-epochs must be at least 1"),
        (["--keep-fraction", "0.5", "--retrain-lr", "0"], "--retrain-lr must be positive"),
        (["--keep-fraction", "0.5", "--stop-after-steps", "1"], "not checkpointed"),
        (["--keep-fraction", "0.5", "--init-adapter", "x", "--epochs", "2"], "drop --epochs"),
    ],
)
def test_bad_pruning_options(tiny: dict[str, str], tmp_path: pathlib.Path, extra: list[str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        train.run(parse_args(_args(tiny, tmp_path / "bad", *extra)))
    assert not (tmp_path / "bad").exists()


def test_keep_fraction_needs_bitfit(tiny: dict[str, str], tmp_path: pathlib.Path) -> None:
    args = _args(tiny, tmp_path / "bad", "--keep-fraction", "0.5")
    args = [a for a in args if a not in ("--bias-terms", "query", "intermediate")]
    with pytest.raises(ValueError, match="use it with --method bitfit, not lora"):
        train.run(parse_args([*args, "--method", "lora"]))


def test_init_adapter_must_fit_the_model(tiny: dict[str, str], tmp_path: pathlib.Path) -> None:
    args = _args(tiny, tmp_path / "bad", "--init-adapter", tiny["dense"], "--keep-fraction", "0.5")
    args = [a for a in args if a != "intermediate"]  # b_q only: the adapter also holds b_m2
    with pytest.raises(ValueError, match="does not fit this model .* --bias-terms of the run that trained it"):
        train.run(parse_args(args))
    with pytest.raises(ValueError, match="holds no adapter_model.safetensors"):
        train.run(parse_args(_args(tiny, tmp_path / "bad", "--init-adapter", str(tmp_path), "--keep-fraction", "0.5")))


def test_eval_compact_scores_forms_and_compact_files(tiny: dict[str, str], tmp_path: pathlib.Path) -> None:
    """eval_compact.py: the original scores what train.py recorded; float32 loses nothing; a compact dir loads."""
    import eval_compact  # examples/glue is on the path through pyproject's [tool.pytest.ini_options] pythonpath

    dense = json.loads((pathlib.Path(tiny["dense"]) / "results.json").read_text())
    out = eval_compact.run(tiny["dense"], "sst2", tiny["data"], ["float32", "int8:0.25"], tiny["model"], 128)
    original, fp32, sparse = out["results"]
    assert original["metrics"]["accuracy"] == fp32["metrics"]["accuracy"] == dense["best"]["accuracy"]
    assert fp32["max_abs_error"]["all"] == 0.0 and sparse["positions"] in ("bitmap", "gaps")
    assert sparse["file_bytes"] < fp32["file_bytes"] < original["file_bytes"]
    encoded = eval_compact.encode_form(
        compact.decode(load_file(tiny["dense"] + "/adapter_model.safetensors")), "int8:0.25"
    )
    compact_dir = tmp_path / "compact"
    compact_dir.mkdir()
    (compact_dir / "adapter_config.json").write_text((pathlib.Path(tiny["dense"]) / "adapter_config.json").read_text())
    from safetensors.torch import save_file

    save_file(encoded, str(compact_dir / "adapter_model.safetensors"))
    again = eval_compact.run(str(compact_dir), "sst2", tiny["data"], [], tiny["model"], 128)
    assert again["results"][0]["metrics"] == sparse["metrics"]


def test_compact_file_loads_with_peft_from_pretrained(tiny: dict[str, str], tmp_path: pathlib.Path) -> None:
    """The saved dir loads through PeftModel.from_pretrained to the values in the file."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "sparse"
    assert train.main(_args(tiny, out, "--init-adapter", tiny["dense"], "--keep-fraction", "0.25")) == 0
    expected = compact.decode(load_file(str(out / "adapter_model.safetensors")))
    base = AutoModelForSequenceClassification.from_pretrained(tiny["model"], num_labels=2)
    model = PeftModel.from_pretrained(base, str(out))
    state = {k: v for k, v in model.state_dict().items()}
    for key, value in expected.items():
        name = key.replace("bitfit_delta", "bitfit_delta.default").replace(
            "classifier.", "classifier.modules_to_save.default."
        )
        assert torch.equal(state[name], value), key
