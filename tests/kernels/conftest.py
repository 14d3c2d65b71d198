"""Run the Triton kernels on CPU through Triton's interpreter.

Triton picks interpreter vs compiler when a kernel is decorated, i.e. when `kernels.*` is
imported, so TRITON_INTERPRET=1 is set here at import time, before that (and the kernel modules
are reloaded if something imported them earlier). The variable is then restored, so that other
test packages keep the fast torch references on CPU; the autouse fixture below sets it again
for each kernel test only (spawned gloo ranks inherit it).
"""

import importlib
import os
import sys
from pathlib import Path

# The repo root, for `import bluelm_kernels` under a plain `pytest` (no install, no cwd on sys.path).
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

_previous = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
_MODULES = [f"bluelm_kernels.{m}" for m in ("_triton", "dispatch", "rmsnorm", "layernorm", "swiglu", "rope",
                                             "cross_entropy", "bias_grad", "qkv_split", "attention",
                                             "decode_attention", "decode_step")]
_MODULES += ["bluelm_kernels"]
for _name in _MODULES:
    if _name in sys.modules:
        importlib.reload(sys.modules[_name])
    else:
        importlib.import_module(_name)
if _previous is None:
    del os.environ["TRITON_INTERPRET"]
else:
    os.environ["TRITON_INTERPRET"] = _previous

import pytest  # noqa: E402  (after the interpreter switch above)
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(0)
    yield
