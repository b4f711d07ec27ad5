"""Planted-bug audit: plant realistic one-line bugs in a copy of the package, one at a time, and run the test files a
developer would run for that code; a bug the tests pass with "survived" (docs/testing.md, "Planted-bug audit").

Each bug is `(name, file, old text, new text, tests)`: the old text must occur exactly once in the file. The bugs were
chosen from the package's code alone (what a reviewer would plant: off-by-one, wrong comparison, swapped arguments,
dropped call, wrong default, wrong dtype/device, missing copy, wrong key), and the tests by their file names.

The checkout is never modified: `git ls-files` is copied to a temporary directory once, and each bug is applied to
that copy and reverted after its run (no bytecode is written, so a reverted file is never read from a stale cache).

    python -m benchmarks.planted_bugs                 # every bug
    python -m benchmarks.planted_bugs --only NAME ... # some
    python -m benchmarks.planted_bugs --list
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

CORE, STORAGE, COMPACT, UNTRUSTED = (
    "tests/test_core.py",
    "tests/test_storage.py",
    "tests/test_compact.py",
    "tests/test_untrusted.py",
)
ENGINE, OPENAI, SERVER, STORE = "tests/test_generation_engine.py", "tests/test_openai.py", "tests/test_server.py", "tests/test_serving_store.py"  # fmt: skip
LAYER, MODEL, SAMPLING = "bitfit_peft/layer.py", "bitfit_peft/model.py", "bitfit_peft/serving/sampling.py"


@dataclass(frozen=True)
class Bug:
    """One planted bug: replace `old` (found exactly once in `file`) by `new`, then run `tests`."""

    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


# fmt: off
BUGS = [
    # --- layer.py
    Bug('layer-unmerge-keeps-merged-list', LAYER, '        self.merged_adapters = []\n', '        self.merged_adapters = list(self.merged_adapters)\n', (CORE,)),
    Bug('layer-premerge-snapshot-every-merge', LAYER, '            if not self.merged_adapters:\n                self._premerge_bias', '            if True:\n                self._premerge_bias', (CORE,)),
    Bug('layer-safe-merge-misses-inf', LAYER, 'if safe_merge and not torch.isfinite(merged).all():', 'if safe_merge and torch.isnan(merged).any():', (CORE,)),
    Bug('layer-active-delta-skips-second', LAYER, '        for name in names[1:]:', '        for name in names[2:]:', (CORE,)),
    Bug('layer-bias-cache-ignores-version', LAYER, 'key = (tuple((id(p), p._version) for p in params),', 'key = (tuple((id(p), 0) for p in params),', (CORE,)),
    Bug('layer-new-adapter-trainable', LAYER, 'nn.Parameter(delta, requires_grad=adapter_name in self.active_adapters)', 'nn.Parameter(delta, requires_grad=True)', (CORE,)),
    Bug('layer-delta-keeps-float32', LAYER, '        delta = delta.to(dtype)\n', '        delta = delta.to(torch.float32)\n', (CORE, STORAGE,)),
    # --- model.py (tuner)
    Bug('model-weighted-drops-weight', MODEL, 'total += weight * layer.full_delta(name)', 'total += layer.full_delta(name)', (CORE,)),
    Bug('model-weighted-name-check', MODEL, '        if adapter_name in self.peft_config:\n', '        if adapter_name in adapters:\n', (CORE,)),
    # kept, though it changes only the error: a layer's row check refuses the same batches, less clearly
    Bug('model-mixed-batch-size-check', MODEL, 'if batch is not None and batch.shape[0] != len(names):', 'if batch is not None and batch.shape[0] < len(names):', (CORE,)),
    Bug('model-keep-one-packs', MODEL, 'keep = keep if keep is not None and keep < 1.0 else None', 'keep = keep if keep is not None and keep <= 1.0 else None', (STORAGE,)),
    Bug('model-save-ignores-own-dtype', MODEL, 'store = compact.codec(save_dtype or (own if own in compact.CODECS else "float32"))', 'store = compact.codec(save_dtype or "float32")', (STORAGE,)),
    # --- loading.py (load checks, hotswap)
    Bug('loading-fingerprint-policy-key', 'bitfit_peft/loading.py', 'if current_policy().on_fingerprint_mismatch == "error":', 'if current_policy().on_fingerprint_mismatch == "raise":', ('tests/test_fingerprint.py',)),
    Bug('loading-hotswap-ignores-unexpected', 'bitfit_peft/loading.py', '    if missing or unexpected:\n        raise ValueError(\n            f"Cannot hotswap', '    if missing:\n        raise ValueError(\n            f"Cannot hotswap', (CORE, 'tests/test_checkpointing.py',)),
    Bug('loading-shape-check-by-numel', 'bitfit_peft/loading.py', 'if target is not None and tuple(value.shape) != tuple(target.shape):', 'if target is not None and value.numel() != target.numel():', (UNTRUSTED, STORAGE,)),
    # --- config.py
    Bug('config-keep-fraction-zero', 'bitfit_peft/config.py', 'or not 0.0 < self.keep_fraction <= 1.0', 'or not 0.0 <= self.keep_fraction <= 1.0', (STORAGE, CORE,)),
    Bug('config-unpacked-sparse-allowed', 'bitfit_peft/config.py', 'if self.packed is False and ((store is not None and store.scaled) or self.keep_fraction is not None):', 'if self.packed is False and (store is not None and store.scaled):', (STORAGE, CORE,)),
    # --- compact.py (packed layout, sparse positions)
    Bug('compact-keep-count-truncates', 'bitfit_peft/compact.py', 'k = max(1, round(keep_fraction * flat.numel()))', 'k = max(1, int(keep_fraction * flat.numel()))', (COMPACT,)),
    Bug('compact-topk-without-abs', 'bitfit_peft/compact.py', 'index = flat.abs().topk(k).indices.sort().values', 'index = flat.topk(k).indices.sort().values', (COMPACT,)),
    Bug('compact-offset-of-kept-values', 'bitfit_peft/compact.py', '        offset += tensor.numel()\n', '        offset += flat.numel()\n', (COMPACT,)),
    Bug('compact-counts-side-left', 'bitfit_peft/compact.py', 'np.searchsorted(np.cumsum(sizes), positions, side="right")', 'np.searchsorted(np.cumsum(sizes), positions, side="left")', (COMPACT,)),
    Bug('compact-int8-scale-128', 'bitfit_peft/compact.py', 'np.float32(absmax / 127.0)', 'np.float32(absmax / 128.0)', (COMPACT,)),
    Bug('compact-position-bound-off-by-one', 'bitfit_peft/compact.py', 'positions[-1] >= total', 'positions[-1] > total', (UNTRUSTED,)),
    Bug('compact-duplicate-keys-accepted', 'bitfit_peft/compact.py', '    if len(set(keys)) != len(keys):\n', '    if len(set(keys)) > len(keys):\n', (UNTRUSTED,)),
    # --- files.py (untrusted safetensors)
    # kept, though it changes only the error: the short-parsed header fails as bad JSON instead
    Bug('files-header-limit-ignores-size', 'bitfit_peft/files.py', 'if length > min(MAX_HEADER_BYTES, len(data) - 8):', 'if length > MAX_HEADER_BYTES:', (UNTRUSTED,)),
    Bug('files-finite-check-misses-inf', 'bitfit_peft/files.py', 'if check_finite and floats and not torch.isfinite(torch.cat([t.reshape(-1).float() for _, t in floats])).all():', 'if check_finite and floats and torch.isnan(torch.cat([t.reshape(-1).float() for _, t in floats])).any():', (UNTRUSTED,)),
    Bug('files-overlap-check-begin', 'bitfit_peft/files.py', '            if begin_b < end_a:\n', '            if begin_b < end_a - 1:\n', (UNTRUSTED,)),
    Bug('files-module-metadata-limit', 'bitfit_peft/files.py', 'if os.path.getsize(path) <= limit * payload:', 'if os.path.getsize(path) >= limit * payload:', (STORAGE,)),
    # --- fingerprint.py
    Bug('fingerprint-drops-last-row', 'bitfit_peft/fingerprint.py', '_rows(weight, [0, n // 2, n - 1])', '_rows(weight, [0, n // 2])', ('tests/test_fingerprint.py',)),
    # --- routing.py (MixedBatch rows, RWLock)
    Bug('routing-repeat-without-divisibility', 'bitfit_peft/routing.py', 'repeat = batch // n if batch % n == 0 else 0', 'repeat = batch // n', (CORE, 'tests/test_tables.py',)),
    Bug('routing-rows-repeat-not-interleave', 'bitfit_peft/routing.py', 'rows = ids.repeat_interleave(repeat).to(device)', 'rows = ids.repeat(repeat).to(device)', (CORE, 'tests/test_tables.py',)),
    Bug('routing-rwlock-release-depth', 'bitfit_peft/routing.py', 'if depth > 1 or self._writer == threading.get_ident():', 'if depth > 0 or self._writer == threading.get_ident():', ('tests/test_concurrency.py',)),
    # --- serving/store.py
    Bug('store-multilabel-softmax', 'bitfit_peft/serving/store.py', 'probs = logits.sigmoid() if info.problem == "multi_label_classification" else logits.softmax(-1)', 'probs = logits.softmax(-1)', (STORE,)),
    Bug('store-base-embeddings-refused', 'bitfit_peft/serving/store.py', 'if task not in info and not (embed and task == BASE):', 'if task not in info:', ('tests/test_embeddings.py',)),
    Bug('store-reserved-name-loadable', 'bitfit_peft/serving/store.py', 'if not name or name == BASE or "/" in name:', 'if not name or "/" in name:', (STORE,)),
    Bug('store-max-length-off-by-one', 'bitfit_peft/serving/store.py', '        if size <= self.max_length:\n', '        if size < self.max_length:\n', (STORE,)),
    Bug('store-load-keeps-refused', 'bitfit_peft/serving/store.py', '        self.refused.pop(info.name, None)\n', '', (STORE, SERVER,)),
    # --- serving/engine.py, kv.py, sampling.py (continuous batching)
    Bug('engine-max-tokens-off-by-one', 'bitfit_peft/serving/engine.py', 'if len(row.out) >= row.params.max_tokens:', 'if len(row.out) > row.params.max_tokens:', (ENGINE,)),
    Bug('engine-exact-fit-refused', 'bitfit_peft/serving/engine.py', '            if need > self._pool.free:\n', '            if need >= self._pool.free:\n', (ENGINE,)),
    Bug('engine-decode-position-off-by-one', 'bitfit_peft/serving/engine.py', 'positions = [len(r.prompt) + len(r.out) - 1 for r in rows]', 'positions = [len(r.prompt) + len(r.out) for r in rows]', (ENGINE,)),
    Bug('kv-mask-hides-own-token', 'bitfit_peft/serving/kv.py', 'allowed = keys.view(1, 1, -1) <= queries.clamp(min=0)', 'allowed = keys.view(1, 1, -1) < queries.clamp(min=0)', (ENGINE,)),
    Bug('sampling-stop-at-last-match', SAMPLING, 'cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)', 'cut = max((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)', (ENGINE,)),
    Bug('sampling-top-p-drops-top-token', SAMPLING, 'before = sorted_probs.cumsum(-1) - sorted_probs', 'before = sorted_probs.cumsum(-1)', (ENGINE,)),
    # --- OpenAI routes, errors, batcher
    Bug('openai-usage-total', 'bitfit_peft/serving/routes/generate.py', 'total_tokens=done.prompt_tokens + done.completion_tokens)', 'total_tokens=done.completion_tokens)', (OPENAI, SERVER,)),
    Bug('openai-stream-finish-always-stop', 'bitfit_peft/serving/routes/generate.py', 'yield chunk(piece(None, done.finish_reason))', 'yield chunk(piece(None, "stop"))', (OPENAI, SERVER,)),
    Bug('openai-max-completion-tokens-ignored', 'bitfit_peft/serving/openai_schemas.py', 'return self.max_completion_tokens or self.max_tokens', 'return self.max_tokens', (OPENAI, SERVER,)),
    Bug('openai-invalid-is-422', 'bitfit_peft/serving/server.py', '        status = 400 if status == 422 else status', '        status = status', (OPENAI, SERVER,)),
    Bug('errors-overloaded-503', 'bitfit_peft/serving/errors.py', 'status=429, error_type="overloaded"', 'status=503, error_type="overloaded"', (SERVER,)),
    Bug('batcher-queue-bound-ignores-batch', 'bitfit_peft/serving/batcher.py', 'if len(self._queue) + len(items) > self.max_queue:', 'if len(self._queue) > self.max_queue:', (SERVER, 'tests/test_concurrency.py',)),
    Bug('batcher-no-one-by-one-retry', 'bitfit_peft/serving/batcher.py', '            if len(items) == 1:\n                _fail(items[0]', '            if len(items) >= 1:\n                _fail(items[0]', (SERVER, 'tests/test_concurrency.py',)),
    Bug('batcher-deadline-from-now', 'bitfit_peft/serving/batcher.py', 'deadline = self._queue[0].queued_at + self.max_wait', 'deadline = time.perf_counter() + self.max_wait', (SERVER, 'tests/test_concurrency.py',)),
    # --- cli.py, lean.py
    Bug('cli-verify-exit-zero', 'bitfit_peft/cli.py', 'return 0 if not problems else 1', 'return 0', ('tests/test_cli.py',)),
    Bug('cli-convert-keep-zero', 'bitfit_peft/cli.py', 'if keep is not None and not 0.0 < keep <= 1.0:', 'if keep is not None and not 0.0 <= keep <= 1.0:', ('tests/test_cli.py',)),
    Bug('lean-loss-not-normalised', 'bitfit_peft/lean.py', '        scale = grad / divisor\n', '        scale = grad\n', ('tests/test_lean.py',)),
    Bug('lean-divisor-counts-ignored', 'bitfit_peft/lean.py', 'divisor = (shifted != ignore_index).sum().to(torch.float32)', 'divisor = torch.tensor(float(shifted.numel()))', ('tests/test_lean.py',)),
]
# fmt: on


def copy_checkout(root: str, dest: str) -> None:
    """Copy the tracked files of `root` to `dest` (the tests, examples and benchmarks come with the package)."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=root, check=True, capture_output=True).stdout.split(b"\0")
    for rel in (f.decode() for f in files if f):
        src = os.path.join(root, rel)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, rel))


def run_bug(bug: Bug, copy: str, timeout: float) -> tuple[str, float, str]:
    """Apply `bug` in `copy`, run its tests, revert; (outcome, seconds, last line of pytest's output)."""
    path = os.path.join(copy, bug.file)
    with open(path, encoding="utf-8") as f:
        original = f.read()
    if original.count(bug.old) != 1:
        raise ValueError(f"{bug.name}: the old text occurs {original.count(bug.old)} times in {bug.file}, not once.")
    env = {**os.environ, "PYTHONPATH": f"{copy}:{copy}/examples/glue", "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *bug.tests]
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(original.replace(bug.old, bug.new))
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=copy, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True, text=True)  # fmt: skip
        try:
            out, _ = proc.communicate(timeout=timeout)
            outcome = "survived" if proc.returncode == 0 else "caught"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            outcome = "timeout"
        seconds = time.perf_counter() - start
    finally:
        with open(path, "w", encoding="utf-8") as f:
            f.write(original)
    last = next((line for line in reversed((out or "").splitlines()) if line.strip()), "")
    return outcome, seconds, last


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these bugs")
    parser.add_argument("--list", action="store_true", help="list the bugs and their tests, run nothing")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per bug before it counts as timeout")
    args = parser.parse_args(argv)
    names = {b.name for b in BUGS}
    if len(names) != len(BUGS):
        raise ValueError("Two planted bugs share a name: give each its own.")
    unknown = sorted(set(args.only or ()) - names)
    if unknown:
        raise SystemExit(f"Unknown bugs {unknown}; see --list.")
    bugs = [b for b in BUGS if not args.only or b.name in args.only]
    if args.list:
        for b in bugs:
            print(f"{b.name:40} {b.file:40} {' '.join(b.tests)}")
        return 0
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], check=True, capture_output=True, text=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="planted-") as copy:
        copy_checkout(root.stdout.strip(), copy)
        for bug in bugs:
            outcome, seconds, last = run_bug(bug, copy, args.timeout)
            results.append((bug, outcome))
            print(f"{bug.name:40} {outcome:9} {seconds:6.1f}s  {last[:70]}", flush=True)
    caught = sum(outcome != "survived" for _, outcome in results)
    print(f"\ncaught {caught} / {len(results)} ({100 * caught / max(len(results), 1):.0f}%); timeouts count as caught")
    survivors = [b.name for b, outcome in results if outcome == "survived"]
    if survivors:
        print("survived: " + " ".join(survivors))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
