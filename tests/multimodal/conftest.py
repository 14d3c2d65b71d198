"""The bundled demo images preprocessed once per session (tools/preprocess_data.py --multimodal)."""
import pytest
from mm_workers import CAPTIONS

from megatron_bluelm.config.data import BUNDLED_TOKENIZER


@pytest.fixture(scope="session")
def mm_prefix(tmp_path_factory):
    """data.prefix (the token dataset) of the preprocessed demo image-text set."""
    from megatron_bluelm.data.multimodal import MultimodalOptions, preprocess_multimodal

    out = tmp_path_factory.mktemp("mm") / "demo"
    summary = preprocess_multimodal(MultimodalOptions([CAPTIONS], str(out), BUNDLED_TOKENIZER))
    assert summary.records == 12 and summary.images == 13
    return f"{out}_text_document"
