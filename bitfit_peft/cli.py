"""`bitfit-peft` command line: inspect, convert and verify BitFit adapter directories.

    bitfit-peft inspect ADAPTER [--json] [--plot FILE.png]
    bitfit-peft convert ADAPTER OUT --to float32|bfloat16|float16|int8[:KEEP]|sparse:KEEP
    bitfit-peft verify ADAPTER --base MODEL
    bitfit-peft serve --base MODEL --adapters DIR [...]   (needs the serve extra; see bitfit_peft.serving.cli)

Every failure the user can fix (missing directory, corrupt file, not a BitFit adapter, a base model that does not
fit) is one `error: ...` line on stderr and a non-zero exit, never a traceback. New subcommands register in
`build_parser` with `set_defaults(func=...)`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import stat
import sys
from typing import Any

import torch
from safetensors.torch import save_file

from . import compact
from .analysis import BiasChange, bias_changes_from_state_dicts, change_matrix, layer_index
from .card import adapter_info, model_card, read_eval_results
from .config import BitFitConfig, read_config
from .constants import CARD_NAME, CONFIG_NAME, METRICS_NAME, WEIGHTS_NAME
from .constants import PEFT_KEY_PREFIX as PEFT_PREFIX
from .files import read_safetensors, read_safetensors_header
from .fingerprint import fingerprint, target_modules_of

__all__ = ["CliError", "build_parser", "main"]


class CliError(Exception):
    """A problem the user can fix; `main` prints it as one line and exits with `code`."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------- reading adapters
def read_adapter(path: str) -> tuple[BitFitConfig, dict[str, torch.Tensor], int]:
    """The config, the tensors as saved, and the file size of a BitFit adapter directory."""
    try:
        config = read_config(path)
    except ValueError as err:
        raise CliError(_one_line(err)) from err
    weights_path = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(weights_path):
        raise CliError(f"{path}: no {WEIGHTS_NAME} next to {CONFIG_NAME}.")
    try:
        tensors, _ = read_safetensors(weights_path, verify_finite=False)
        if compact.is_packed(tensors):
            compact.read_layout(tensors)
    except Exception as err:  # safetensors raises its own error types for truncated or garbled files
        raise CliError(f"{weights_path}: corrupt or truncated adapter file ({_one_line(err)}).") from err
    return config, tensors, os.path.getsize(weights_path)


def saved_facts(path: str, config: BitFitConfig) -> dict[str, Any]:
    """What a training run saved with the adapter: label names (its config) and dev metrics on a task (eval_results)."""
    metrics, task = read_eval_results(path)
    return {"labels": config.labels, "metrics": metrics, "task": task}


def decoded(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter's tensors under their peft keys, in float32: the one place files are decoded."""
    try:
        return compact.decode(tensors)
    except ValueError as err:
        raise CliError(_one_line(err)) from err


def header_bytes(path: str) -> int:
    try:
        return read_safetensors_header(path)[1]
    except ValueError as err:
        raise CliError(_one_line(err)) from err


# ---------------------------------------------------------------- inspect
def change_table(state: dict[str, torch.Tensor], model_type: str | None) -> dict[str, Any]:
    """Mean absolute delta per bias term x layer (the paper's Figure 1) from decoded deltas; unknown terms by module name."""
    deltas = {
        k.removeprefix(PEFT_PREFIX).removesuffix(".bitfit_delta"): v
        for k, v in state.items()
        if k.endswith("bitfit_delta")
    }
    after = {f"{name}.bias": v for name, v in deltas.items()}
    changes = bias_changes_from_state_dicts({k: torch.zeros_like(v) for k, v in after.items()}, after, model_type)
    named = [
        c if c.term else BiasChange(c.module_name, _short_name(c.module_name), c.layer, c.value, c.numel)
        for c in changes
    ]
    terms = tuple(dict.fromkeys(c.term for c in named if c.term and c.layer is not None))
    rows, layers, matrix = change_matrix(named, terms)
    return {"terms": list(rows), "layers": layers, "mean_abs_delta": [[None if v != v else float(v) for v in r] for r in matrix]}  # fmt: skip


def _short_name(module_name: str) -> str:
    index = layer_index(module_name)
    return module_name.split(f".{index}.", 1)[-1] if index is not None else module_name


def _model_type(config: BitFitConfig, state: dict[str, torch.Tensor]) -> str | None:
    base = config.base_model_name_or_path
    if base and os.path.isfile(os.path.join(base, "config.json")):
        try:
            with open(os.path.join(base, "config.json")) as f:
                return json.load(f).get("model_type")
        except (OSError, ValueError):
            pass
    first = next((k.removeprefix(PEFT_PREFIX).split(".")[0] for k in state if k.endswith("bitfit_delta")), None)
    return first  # the backbone attribute is the model type for BERT-like models (bert, roberta, deberta, ...)


def cmd_inspect(args: argparse.Namespace) -> int:
    config, tensors, size = read_adapter(args.adapter)
    state = decoded(tensors)
    info = adapter_info(config.to_json_dict(), tensors, file_bytes=size, **saved_facts(args.adapter, config))
    info["header_bytes"] = header_bytes(os.path.join(args.adapter, WEIGHTS_NAME))
    info["tensors"] = {
        k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)} for k, v in tensors.items()
    }
    info["change_table"] = change_table(state, _model_type(config, state))
    if args.plot:
        plot_table(info["change_table"], args.plot)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"{args.adapter}: {info['peft_type']} adapter, task type {info['task_type']}")
    print(f"  base model   {info['base_model']}")
    print(f"  fingerprint  {info['base_model_fingerprint'] or 'not recorded'}")
    print(
        f"  bias terms   {', '.join(info['bias_terms']) if info['bias_terms'] else info['target_modules'] or 'every bias'}"
    )
    print(
        f"  deltas       {info['modules']} bias vectors, {info['delta_params']:,} values; head {info['head_params']:,} values"
    )
    keep = f", sparse (keep {info['keep_fraction']})" if info["keep_fraction"] else ""
    print(f"  storage      {info['dtype']}{keep}{', packed' if info['packed'] else ''}")
    print(f"  size         file {size:,} B = payload {info['payload_bytes']:,} B x {size / max(info['payload_bytes'], 1):.3f} (header {info['header_bytes']:,} B)")  # fmt: skip
    if info["labels"]:
        print(f"  labels       {', '.join(f'{i}: {name}' for i, name in enumerate(info['labels']))}")
    if info["metrics"]:
        on = f" on {info['task']}" if info["task"] else ""
        print(f"  metrics{on}  " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in info["metrics"].items()))  # fmt: skip
    print(f"  tensors      {len(tensors)}")
    for key, t in info["tensors"].items():
        print(f"    {key}  {t['dtype']} {tuple(t['shape'])}")
    table = info["change_table"]
    if table["terms"]:
        print("  mean |Δb| per term x layer:")
        width = max(len(t) for t in table["terms"])
        print("    " + " " * width + "".join(f"{layer:>9d}" for layer in table["layers"]))
        for term, row in zip(table["terms"], table["mean_abs_delta"], strict=True):
            print(f"    {term:<{width}}" + "".join(f"{v:9.2e}" if v is not None else f"{'-':>9}" for v in row))
    return 0


def plot_table(table: dict[str, Any], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise CliError("--plot needs matplotlib: pip install matplotlib (or bitfit-peft[examples]).") from err
    if not table["terms"]:
        raise CliError("--plot: the adapter has no per-layer bias deltas to plot.")
    data = [[float("nan") if v is None else v for v in row] for row in table["mean_abs_delta"]]
    fig, ax = plt.subplots(figsize=(1 + 0.6 * len(table["layers"]), 1 + 0.5 * len(table["terms"])))
    image = ax.imshow(data, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(table["layers"])), [str(x) for x in table["layers"]])
    ax.set_yticks(range(len(table["terms"])), table["terms"])
    ax.set_xlabel("layer")
    fig.colorbar(image, ax=ax, label="mean |Δb|")
    fig.tight_layout()
    try:
        fig.savefig(path)
    except OSError as err:
        raise CliError(f"--plot: cannot write {path} ({_one_line(err)}).") from err
    finally:
        plt.close(fig)


# ---------------------------------------------------------------- convert
def parse_target(text: str, current: str) -> tuple[str, float | None]:
    """`int8`, `int8:0.4`, `sparse:0.1` (the adapter's current dtype) -> (dtype, keep_fraction); the dtypes are
    `compact.CODECS`."""
    dtype, _, keep_text = text.partition(":")
    if dtype == "sparse":
        dtype = current if current in compact.CODECS else "float32"
        if not keep_text:
            raise CliError("--to sparse needs a fraction to keep, e.g. --to sparse:0.1.")
    if dtype not in compact.CODECS:
        raise CliError(f"--to {text!r}: unknown format. Use one of {list(compact.CODECS)}, DTYPE:KEEP or sparse:KEEP.")
    try:
        keep = float(keep_text) if keep_text else None
    except ValueError as err:
        raise CliError(f"--to {text!r}: {keep_text!r} is not a number; e.g. int8:0.4 keeps the largest 40%.") from err
    if keep is not None and not 0.0 < keep <= 1.0:
        raise CliError(f"--to {text!r}: the fraction to keep must be in (0, 1].")
    return dtype, keep


def cmd_convert(args: argparse.Namespace) -> int:
    config, tensors, size = read_adapter(args.adapter)
    state = decoded(tensors)
    current = adapter_info(config.to_json_dict(), tensors)["dtype"]
    dtype, keep = parse_target(args.to, current)
    if os.path.abspath(args.out) == os.path.abspath(args.adapter):
        raise CliError("OUT must be a new directory, not the adapter being converted.")
    out_file = os.path.join(args.out, WEIGHTS_NAME)
    if os.path.exists(out_file) and not args.force:
        raise CliError(f"{out_file} exists; pass --force to overwrite it.")
    if not compact.CODECS[dtype].packed_by_default and keep is None:
        new: dict[str, torch.Tensor] = {
            k: v.contiguous() for k, v in state.items()
        }  # the plain one-tensor-a-key layout
    else:
        try:
            new = compact.encode(state, dtype, keep)
        except ValueError as err:
            raise CliError(_one_line(err)) from err
    os.makedirs(args.out, exist_ok=True)
    save_file(new, out_file, metadata=compact.safetensors_metadata(new, module_order=not args.no_module_metadata))
    # The config says how the file is stored (transformers' load_adapter refuses packed ones by this field).
    stored = {"save_dtype": dtype, "keep_fraction": keep, "packed": compact.is_packed(new)}
    with open(os.path.join(args.out, CONFIG_NAME), "w") as f:
        json.dump({**config.to_json_dict(), **stored}, f, indent=2, sort_keys=True)
    new_size = os.path.getsize(out_file)
    back = compact.decode(new)
    error = max((float((back[k] - v).abs().max()) for k, v in state.items() if v.numel()), default=0.0)
    # The card keeps what the training run recorded (label names, dev metrics); the metrics file travels with it.
    facts = saved_facts(args.adapter, config)
    with open(os.path.join(args.out, CARD_NAME), "w", encoding="utf-8") as f:
        f.write(model_card(adapter_info(config.to_json_dict(), new, file_bytes=new_size, **facts)))
    if os.path.isfile(os.path.join(args.adapter, METRICS_NAME)):
        shutil.copyfile(os.path.join(args.adapter, METRICS_NAME), os.path.join(args.out, METRICS_NAME))
    keep_modes(args.adapter, args.out)
    print(f"{args.adapter} ({current}, {size:,} B) -> {args.out} ({args.to}, {new_size:,} B): "
          f"{new_size / size:.1%} of the size, max abs error introduced {error:.3e}")  # fmt: skip
    return 0


def keep_modes(source: str, out: str) -> None:
    """Give each file `convert` wrote the permission bits of its original (a new card: the config's), not the 0600
    that safetensors writes, which another user serving the adapter could not read."""
    for name in (WEIGHTS_NAME, CONFIG_NAME, METRICS_NAME, CARD_NAME):
        original, written = os.path.join(source, name), os.path.join(out, name)
        original = original if os.path.isfile(original) else os.path.join(source, CONFIG_NAME)
        if os.path.isfile(written):
            os.chmod(written, stat.S_IMODE(os.stat(original).st_mode))


# ---------------------------------------------------------------- verify
_AUTO_CLASSES = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
}


def check_base(base: str) -> None:
    """ "No such directory" for a --base that is not a directory and cannot be a Hub id (or any, offline), rather than
    the Hub's message about repo id characters that loading it would give."""
    from huggingface_hub import constants
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(base)
        hub_id = not base.startswith((".", "/", "~"))
    except HFValidationError:
        hub_id = False
    if not os.path.isdir(os.path.expanduser(base)) and (constants.HF_HUB_OFFLINE or not hub_id):
        offline = " (offline: Hub ids are not looked up)" if hub_id else ""
        raise CliError(
            f"--base {base}: no such directory{offline}; pass the base model's directory (save_pretrained)."
        )


def build_base(config: BitFitConfig, state: dict[str, torch.Tensor], base: str) -> torch.nn.Module:
    """The base model for an adapter: the Auto class of its task type, with num_labels from the saved head."""
    import transformers

    import bitfit_peft

    heads = {k: v for k, v in state.items() if not k.endswith("bitfit_delta") and k.endswith(".weight")}
    kwargs: dict[str, Any] = {}
    task_type = config.task_type
    if task_type in ("SEQ_CLS", "TOKEN_CLS") and heads:
        ends = ("classifier.weight", "score.weight", "classifier.out_proj.weight")
        sizes = [v.shape[0] for k, v in heads.items() if v.dim() == 2 and k.endswith(ends)]
        if sizes:
            kwargs["num_labels"] = sizes[0]
    mean_pooled = any(k.endswith("classifier.out_proj.weight") for k in heads) and not any(".classifier.dense." in k for k in heads)  # fmt: skip
    try:
        if task_type == "SEQ_CLS" and mean_pooled:
            return bitfit_peft.MeanPooledSequenceClassifier.from_pretrained(base, **kwargs)
        cls = getattr(transformers, _AUTO_CLASSES.get(str(task_type), "AutoModel"))
        return cls.from_pretrained(base, **kwargs)
    except (OSError, ValueError) as err:
        raise CliError(f"--base {base}: cannot load the base model ({_one_line(err)}).") from err


def cmd_verify(args: argparse.Namespace) -> int:
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    import bitfit_peft  # noqa: F401 - registers BITFIT with peft

    config, tensors, _ = read_adapter(args.adapter)
    state = decoded(tensors)
    check_base(args.base)
    model = build_base(config, state, args.base)
    problems: list[str] = []
    recorded = config.base_fingerprint
    actual = fingerprint(model, target_modules_of(list(state)))
    if recorded is None:
        print(f"fingerprint: not recorded in the adapter (base gives {actual})")
    elif recorded == actual:
        print(f"fingerprint: match ({actual})")
    else:
        problems.append(f"fingerprint mismatch: adapter trained on {recorded}, --base gives {actual}")
    bad = sorted(k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if bad:
        problems.append(f"non-finite values in {bad[:3]}")
    try:
        peft_model = get_peft_model(model, dataclasses.replace(config, inference_mode=True))
    except (ValueError, TypeError) as err:
        raise CliError(f"the adapter config does not fit --base {args.base} ({_one_line(err)}).") from err
    expected = compact.decode(get_peft_model_state_dict(peft_model))  # keys as the adapter stores them
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if k in state and state[k].shape != v.shape]  # fmt: skip
    print(f"keys: {len(expected)} expected, {len(missing)} missing, {len(unexpected)} unexpected, {len(shapes)} shape mismatches")  # fmt: skip
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            problems.append(f"{label}: {items[:3]}{' ...' if len(items) > 3 else ''}")
    if not problems:
        try:
            set_peft_model_state_dict(peft_model, state)
        except (ValueError, RuntimeError) as err:
            problems.append(f"loading failed: {_one_line(err)}")
    for problem in problems:
        print(f"FAIL {problem}")
    print("OK: the adapter loads onto this base model" if not problems else "FAILED")
    return 0 if not problems else 1


# ---------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bitfit-peft", description="Inspect, convert, verify and serve BitFit adapters."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("inspect", help="show what an adapter holds: base, bias terms, sizes, |Δb| per term x layer")
    p.add_argument("adapter", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--plot", metavar="FILE.png", help="write the term x layer heatmap of mean |Δb| (needs matplotlib)")
    p.set_defaults(func=cmd_inspect)

    formats = " | ".join(compact.CODECS)
    p = sub.add_parser("convert", help=f"rewrite an adapter as {', '.join(compact.CODECS)} and/or sparse")
    p.add_argument("adapter", help="adapter directory to convert (left as it is)")
    p.add_argument("out", help="output directory: the converted adapter, its config, model card and eval_results.json")
    p.add_argument("--to", required=True, help=f"{formats}, optionally :KEEP (e.g. int8:0.4), or sparse:KEEP")
    p.add_argument("--force", action="store_true", help="overwrite OUT/adapter_model.safetensors")
    p.add_argument("--no-module-metadata", action="store_true", help="leave the module order out of the file header")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("verify", help="load an adapter onto a base model and report whether it fits (exit 0/1)")
    p.add_argument("adapter", help="adapter directory to check")
    p.add_argument("--base", required=True, help="base model: a directory saved by save_pretrained, or a Hub id")
    p.set_defaults(func=cmd_verify)

    # Imported here, not at the top: the serving module pulls in nothing heavy itself, but keeping it out of the
    # module's imports means `inspect` never depends on the serve extra (fastapi, uvicorn).
    from .serving.cli import add_serve_parser

    add_serve_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 verify found problems, 2 usage or input error)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except CliError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.code


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


if __name__ == "__main__":
    raise SystemExit(main())
