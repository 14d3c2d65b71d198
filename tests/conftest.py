"""Shared fixtures: the bundled corpus preprocessed once per session; tests/ on sys.path so test
modules anywhere below can ``from distributed import run_distributed``."""
import os
import sys
import warnings

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")


@pytest.fixture(scope="session")
def demo_prefix(tmp_path_factory):
    """Indexed dataset prefix of the bundled demo corpus (both files, EOD appended)."""
    from megatron_bluelm.config.data import BUNDLED_TOKENIZER
    from megatron_bluelm.data.demo import DOCSTRINGS, PYTHON_DOCS
    from megatron_bluelm.data.preprocess import Options, preprocess

    out = tmp_path_factory.mktemp("demo_corpus")
    summary = preprocess(Options(inputs=[PYTHON_DOCS, DOCSTRINGS], output_prefix=str(out / "corpus"),
                                 tokenizer_model=BUNDLED_TOKENIZER, append_eod=True, workers=1, progress=False))
    return summary.outputs[0]


# ---- tests write under tmp_path / the temporary directory, never into the working tree ----------

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_WATCHED = ("outputs", "runs", "wandb")  # where the stages write by default (ignored by git, so unseen)


def _tree_state() -> set:
    """Paths under the watched folders. New paths only: a fresh checkout (CI) has none, and on a shared
    working tree a file that another program rewrites meanwhile is not blamed on the tests."""
    return {os.path.join(root, name) for top in _WATCHED for root, dirs, files in os.walk(os.path.join(_REPO, top))
            for name in dirs + files}


def pytest_sessionstart(session):
    session.config._bluelm_tree = _tree_state()


def pytest_sessionfinish(session, exitstatus):
    before = getattr(session.config, "_bluelm_tree", None)
    if before is None:
        return
    written = sorted(_tree_state() - before)
    if written:
        shown = "\n  ".join(os.path.relpath(p, _REPO) for p in written[:20])
        print(f"\nERROR: tests wrote into the working tree (use tmp_path or tempfile):\n  {shown}", file=sys.stderr)
        session.exitstatus = 1
