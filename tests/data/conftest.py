"""Fixtures: the bundled tokenizer and corpus, preprocessed once per session into a temp dir."""
import warnings

import pytest

from megatron_bluelm.config.data import BUNDLED_TOKENIZER
from megatron_bluelm.data.demo import DOCSTRINGS, PYTHON_DOCS
from megatron_bluelm.data.preprocess import Options, preprocess

warnings.filterwarnings("ignore", message="Transformer Engine and Apex")


@pytest.fixture(scope="session")
def tokenizer_path():
    return BUNDLED_TOKENIZER


@pytest.fixture(scope="session")
def sp(tokenizer_path):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=tokenizer_path)


@pytest.fixture(scope="session")
def demo_prefixes(tmp_path_factory, tokenizer_path):
    """{'python_docs': prefix, 'docstrings': prefix, 'corpus': prefix} with EOD appended."""
    out = tmp_path_factory.mktemp("demo")
    jobs = {"python_docs": [PYTHON_DOCS], "docstrings": [DOCSTRINGS], "corpus": [PYTHON_DOCS, DOCSTRINGS]}
    prefixes = {}
    for name, inputs in jobs.items():
        s = preprocess(Options(inputs=inputs, output_prefix=str(out / name), tokenizer_model=tokenizer_path,
                               append_eod=True, workers=1, progress=False))
        prefixes[name] = s.outputs[0]
    return prefixes


