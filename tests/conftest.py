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
