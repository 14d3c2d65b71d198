"""The top-level import names this project installs do not collide with well-known packages a user's
environment may hold: ``kernels`` is the Hugging Face kernel hub package that transformers probes for
(installing both would overwrite one with the other)."""
import ast
from pathlib import Path

from setuptools import find_packages

ROOT = Path(__file__).resolve().parents[1]
TAKEN = {"kernels", "utils", "models", "data", "config", "training"}


def _include_patterns() -> list[str]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "find_packages":
            for kw in node.keywords:
                if kw.arg == "include":
                    return ast.literal_eval(kw.value)
    raise AssertionError("setup.py: no find_packages(include=...)")


def test_installed_top_level_names_do_not_collide():
    packages = find_packages(where=str(ROOT), include=_include_patterns())
    top = {p.split(".")[0] for p in packages}
    assert "bluelm_kernels" in top and "megatron_bluelm" in top
    assert not top & TAKEN, sorted(top & TAKEN)
