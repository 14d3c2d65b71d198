import pytest

from megatron_bluelm.config.errors import ConfigError
from megatron_bluelm.data import SPECIAL_TOKENS, load_tokenizer


def test_special_tokens_have_fixed_single_ids(tokenizer_path):
    tok = load_tokenizer(tokenizer_path)
    assert [tok.special_ids[t] for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (tok.pad, tok.unk, tok.bos, tok.eod) == (0, 1, 2, 3)
    for t in SPECIAL_TOKENS[4:]:
        # never split, even glued to text
        ids = tok.encode(f"x{t}y")
        assert tok.token_to_id(t) in ids, t


def test_round_trip_and_byte_fallback(tokenizer_path):
    tok = load_tokenizer(tokenizer_path)
    text = "def f(x):\n    return x  # 你好 — ü <think>ok</think>"
    ids = tok.encode(text)
    assert tok.unk not in ids
    assert tok.decode(ids) == text
    assert tok.vocab_size == 8192


def test_default_is_bundled_and_missing_file_is_clear(tmp_path):
    assert load_tokenizer().vocab_size == 8192
    with pytest.raises(ConfigError, match="no such file"):
        load_tokenizer(str(tmp_path / "nope.model"))
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ConfigError, match="could not be loaded"):
        load_tokenizer(str(bad))
