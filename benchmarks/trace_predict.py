"""Count the functions of bitfit_peft/serving that one HTTP predict runs (all threads), outside the model forward.

python -m benchmarks.trace_predict   (from the repository root; tiny seeded BERT from tests/serving_helpers.py)

"The path" is what the request's data passes through (route, service, batcher, store). Beside it, listed apart:
observers (`metrics.py`: the middleware and the batcher's hooks), pydantic's validators (`schemas.py`) and the
head forward (`model.py`, part of the model). Comprehension and lambda frames (Python 3.11 gives each its own) are
expressions, not functions a reader follows, and are not counted.
"""

import os
import sys
import tempfile
import threading

sys.path.insert(0, "tests")
from pathlib import Path

import httpx
from serving_helpers import save_adapter, save_base
from test_server import running

from bitfit_peft.serving import TaskStore
from bitfit_peft.serving.server import ServeSettings, create_app

root = Path(tempfile.mkdtemp())
if not (root / "base").exists():
    base = save_base(root / "base")
    save_adapter(base, root / "adapters" / "t0", num_labels=2)
store = TaskStore.open(str(root / "base"), str(root / "adapters"))
app = create_app(ServeSettings(base=str(root / "base"), adapters=str(root / "adapters"), max_wait_ms=0), store)
PKG = os.path.realpath("bitfit_peft")
seen = {}
on = [False]


def prof(frame, event, arg):
    if event == "call" and on[0]:
        f = os.path.realpath(frame.f_code.co_filename)
        if f.startswith(PKG):
            seen.setdefault((os.path.relpath(f, PKG), frame.f_code.co_qualname), 0)
            seen[(os.path.relpath(f, PKG), frame.f_code.co_qualname)] += 1
    return None


threading.setprofile(prof)
with running(app) as url, httpx.Client(base_url=url) as c:
    c.post("/v1/predict", json={"task": "t0", "inputs": "w1 w2"})  # warm
    seen.clear()
    on[0] = True
    r = c.post("/v1/predict", json={"task": "t0", "inputs": "w1 w2"})
    on[0] = False
    assert r.status_code == 200
BESIDE = ("serving/metrics.py", "serving/schemas.py", "serving/model.py")
EXPRESSIONS = ("<listcomp>", "<genexpr>", "<dictcomp>", "<setcomp>", "<lambda>")
functions = sorted((f, q) for f, q in seen if f.startswith("serving/") and not q.endswith(EXPRESSIONS))
path = [(f, q) for f, q in functions if f not in BESIDE]
for f, q in functions:
    print(f"{'path' if (f, q) in path else 'beside':7s}{f:28s} {q}")
print(
    f"the path: {len(path)} functions in {len({f for f, _ in path})} files; "
    f"beside it: {len(functions) - len(path)} in {len({f for f, _ in functions} - {f for f, _ in path})} files"
)
