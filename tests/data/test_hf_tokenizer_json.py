"""A Hugging Face tokenizer.json (one without our special tokens) for preprocessing, training and
export: the project's tokens are added after its own, documents encode exactly as the tokenizer does."""
import gzip
import json
import os

import pytest
from jsonl_files import write_jsonl

tokenizers = pytest.importorskip("tokenizers")

from megatron_bluelm.data.tokenizer import USER_SYMBOLS, load_tokenizer  # noqa: E402

CORPUS = os.path.join(os.path.dirname(__file__), "..", "..", "megatron_bluelm", "assets", "corpus",
                      "python_docs.jsonl.gz")


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    """A byte-level BPE tokenizer.json trained here (600 ids, eos <|endoftext|>), as a third party ships one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    with gzip.open(CORPUS, "rt") as f:
        texts = [json.loads(line)["text"] for line in f]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path_factory.mktemp("hf_tok") / "tokenizer.json"
    tok.save(str(path))
    return str(path)


def test_special_tokens_are_added_after_the_tokenizers_own(tokenizer_json):
    raw = tokenizers.Tokenizer.from_file(tokenizer_json)
    tok = load_tokenizer(tokenizer_json)
    base = raw.get_vocab_size()
    assert [tok.special_ids[t] for t in USER_SYMBOLS] == list(range(base, base + len(USER_SYMBOLS)))
    assert tok.vocab_size == base + len(USER_SYMBOLS) and tok.eod == raw.token_to_id("<|endoftext|>") == tok.pad
    text = "def f(x):\n    return x  # naïve"
    assert tok.encode(text) == raw.encode(text, add_special_tokens=False).ids
    mixed = "<|user|>\nhi<|end|>\n<|assistant|>\n<think>\nwhy\n</think>\nok<|end|>"
    ids = tok.encode(mixed)
    assert all(ids.count(tok.special_ids[t]) == mixed.count(t) for t in USER_SYMBOLS)
    assert tok.decode(ids) == mixed


@pytest.mark.parametrize("workers", [1, 2])
def test_preprocessing_with_a_tokenizer_json_is_token_exact(tokenizer_json, tmp_path, workers):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_bluelm.data.preprocess import Options, preprocess

    docs = ["first document", "second <think>one</think> two", "ünïcode 🙂 and\ttabs"] * 50
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": d} for d in docs])
    s = preprocess(Options(inputs=[path], output_prefix=str(tmp_path / "o"), tokenizer_model=tokenizer_json,
                           append_eod=True, workers=workers, progress=False, chunk_bytes=500))
    tok = load_tokenizer(tokenizer_json)
    ds = IndexedDataset(s.outputs[0])
    assert [ds[i].tolist() for i in range(len(docs))] == [tok.encode(d) + [tok.eod] for d in docs]


def test_train_and_export_with_a_tokenizer_json(tokenizer_json, tmp_path):
    """Pretrain two steps on data made with the tokenizer.json, export to HF (its tokenizer is that
    tokenizer.json, our tokens included) and import the export back."""
    from distributed import run_distributed

    from megatron_bluelm.data.preprocess import Options, preprocess

    with gzip.open(CORPUS, "rt") as f:
        docs = [json.loads(line)["text"] for line in f][:300]
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": d} for d in docs])
    s = preprocess(Options(inputs=[path], output_prefix=str(tmp_path / "o"), tokenizer_model=tokenizer_json,
                           append_eod=True, progress=False))
    result = run_distributed(_train_export_import, 1, s.outputs[0], tokenizer_json, str(tmp_path))[0]
    assert result["steps"] == 2 and all(x == x for x in result["losses"])  # trained, finite
    hf_dir = tmp_path / "hf"
    config = json.load(open(hf_dir / "config.json"))
    tok = load_tokenizer(tokenizer_json)
    assert config["vocab_size"] == tok.vocab_size == 610 and not (hf_dir / "tokenizer.model").exists()
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    text = "<|user|>\nsum a list<|end|>\n"
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
    assert hf.pad_token_id == config["pad_token_id"] and hf.padding_side == "left"
    assert result["reimported_vocab"] == 610


def _train_export_import(prefix, tokenizer_json, out):
    from megatron_bluelm.config.loader import load_config
    from megatron_bluelm.stages.pretrain import run_pretrain

    cfg = load_config(None, [
        "--data.prefix", prefix, "--data.tokenizer_model", tokenizer_json, "--data.seq_length", "64",
        "--data.cache_dir", f"{out}/cache", "--training.train_steps", "2", "--training.global_batch_size", "2",
        "--training.micro_batch_size", "2", "--training.eval_interval", "0", "--schedule.warmup_steps", "0",
        "--logging.tensorboard", "false", "--logging.output_dir", f"{out}/log", "--checkpoint.save",
        f"{out}/ckpt", "--model.backend", "torch", "--data.split", "1,0,0"])
    res = run_pretrain(cfg)
    import torch.distributed as dist

    from megatron_bluelm.parallel.setup import teardown

    teardown() if dist.is_initialized() else None
    from megatron_bluelm.convert.api import hf_to_megatron, megatron_to_hf

    megatron_to_hf(f"{out}/ckpt", f"{out}/hf")
    teardown()
    hf_to_megatron(f"{out}/hf", f"{out}/back")
    from megatron_bluelm.training.checkpointing import read_meta, resolve_checkpoint

    meta = read_meta(resolve_checkpoint(f"{out}/back")[0])
    return {"steps": res["step"], "losses": res["losses"], "reimported_vocab": meta["config"]["model"]["vocab_size"]}
