"""Image-text preprocessing and loading: errors name file:line / record; exact image-token slots."""
import io
import json
import shutil

import numpy as np
import pytest
import torch
from mm_workers import CAPTIONS
from PIL import Image

from megatron_bluelm.config.data import BUNDLED_TOKENIZER
from megatron_bluelm.config.errors import ConfigError
from megatron_bluelm.config.schema import RunConfig
from megatron_bluelm.data.images import ImageError, ImageProcessor
from megatron_bluelm.data.multimodal import MultimodalOptions, preprocess_multimodal
from megatron_bluelm.data.multimodal_dataset import MultimodalRecords, build_multimodal_datasets, collate
from megatron_bluelm.data.tokenizer import load_tokenizer


def _write(tmp_path, records):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _run(tmp_path, records, on_error="fail"):
    opts = MultimodalOptions([_write(tmp_path, records)], str(tmp_path / "out"), BUNDLED_TOKENIZER, on_error)
    return preprocess_multimodal(opts)


@pytest.fixture
def images(tmp_path):
    src = CAPTIONS.rsplit("/", 1)[0]
    shutil.copy(f"{src}/chelsea.jpg", tmp_path / "cat.jpg")
    (tmp_path / "broken.jpg").write_bytes(open(f"{src}/chelsea.jpg", "rb").read()[:300])  # truncated JPEG
    (tmp_path / "text.jpg").write_text("not an image")
    return tmp_path


def test_missing_image_names_file_line_and_path(images):
    recs = [{"images": ["cat.jpg"], "text": "<image> a cat"}, {"images": ["nope.jpg"], "text": "<image> x"}]
    with pytest.raises(ConfigError, match=r"in.jsonl:2: image 0 'nope.jpg': cannot read .*No such file"):
        _run(images, recs)


@pytest.mark.parametrize("name", ["broken.jpg", "text.jpg"])
def test_corrupt_image_names_file_line(images, name):
    recs = [{"images": ["cat.jpg"], "text": "a"}, {"images": ["cat.jpg"], "text": "b"},
            {"images": ["cat.jpg", name], "text": "c"}]
    with pytest.raises(ConfigError, match=rf"in.jsonl:3: image 1 '{name}': cannot decode image"):
        _run(images, recs)
    assert not list(images.glob("out*.idx")), "a failed run must leave no dataset behind"


def test_bad_records_are_skipped_and_counted_on_request(images):
    recs = [{"images": ["cat.jpg"], "text": "<image> a cat"}, {"images": ["broken.jpg"], "text": "x"},
            {"images": ["cat.jpg"], "text": "<image><image> two slots, one image"}, {"images": ["cat.jpg"]}]
    summary = _run(images, recs, on_error="skip")
    assert summary.records == 1 and summary.skipped == {"bad image": 1, "bad record": 2}


def test_demo_set_loads_with_exact_image_slots(mm_prefix):
    cfg = RunConfig()
    cfg.data.prefix, cfg.data.seq_length, cfg.data.split = mm_prefix, 256, "1,0,0"
    cfg.vision.preset, cfg.vision.max_tiles = "vit-tiny", 4
    cfg.vision.resolve()
    tok = load_tokenizer(BUNDLED_TOKENIZER)
    train, valid, _ = build_multimodal_datasets(cfg, tok, num_samples=(24, 0, 0), seed=1)
    assert valid is None and len(train) == 24
    proc = ImageProcessor.from_config(cfg.vision)
    records = MultimodalRecords(mm_prefix)
    seen_counts = set()
    for i in range(12):
        s = train[i]
        r = int(train.order[i])
        sizes = [Image.open(io.BytesIO(b)).size for b in records.image_bytes(r)]
        n_slots = int((s["tokens"] == tok.special_ids["<image>"]).sum())
        assert s["pixel_values"].shape[0] == s["num_tiles"] == sum(proc.num_tiles(*wh) for wh in sizes)
        assert n_slots == s["num_tiles"] * proc.tokens_per_tile
        image_tokens = [tok.special_ids[t] for t in ("<image>", "<img_start>", "<img_end>")]
        assert not s["loss_mask"][np.isin(s["labels"].numpy(), image_tokens)].any()
        seen_counts.add(len(sizes))
    assert seen_counts == {0, 1, 2}  # records with no, one and two images
    batch = collate([train[i] for i in range(4)])
    assert batch["tokens"].shape == (4, 256)
    assert batch["pixel_values"].shape[0] == int(batch["num_tiles"].sum())


def test_sequence_too_short_for_the_images_is_a_clear_error(mm_prefix):
    cfg = RunConfig()
    cfg.data.prefix, cfg.data.seq_length, cfg.data.split = mm_prefix, 40, "1,0,0"
    cfg.vision.preset = "vit-tiny"
    cfg.vision.resolve()
    train, _, _ = build_multimodal_datasets(cfg, load_tokenizer(BUNDLED_TOKENIZER), num_samples=(12, 0, 0), seed=1)
    with pytest.raises(ImageError, match=r"record \d+ of .*raise data.seq_length or lower vision.max_tiles"):
        for i in range(12):
            train[i]


def test_corrupt_bytes_at_load_time_name_the_record(mm_prefix, tmp_path):
    """A dataset damaged after preprocessing: decoding fails with the record number."""
    for suffix in ("_text_document", "_loss_mask_document", "_images"):
        for ext in (".bin", ".idx"):
            shutil.copy(mm_prefix.replace("_text_document", suffix) + ext, tmp_path / f"d{suffix}{ext}")
    blob = tmp_path / "d_images.bin"
    blob.write_bytes(b"\0" * blob.stat().st_size)
    cfg = RunConfig()
    cfg.data.prefix, cfg.data.seq_length, cfg.data.split = str(tmp_path / "d_text_document"), 256, "1,0,0"
    cfg.vision.preset = "vit-tiny"
    cfg.vision.resolve()
    train, _, _ = build_multimodal_datasets(cfg, load_tokenizer(BUNDLED_TOKENIZER), num_samples=(12, 0, 0), seed=1)
    r = next(i for i in range(12) if len(train.records.image_bytes(int(train.order[i]))))
    with pytest.raises(ImageError, match=rf"record {int(train.order[r])} of .*image 0: cannot decode image"):
        train[r]
    assert torch.is_tensor(train[[i for i in range(12) if int(train.order[i]) == 9][0]]["tokens"])  # no images


def test_messages_records_use_the_chat_template(images):
    # One chat layout everywhere: a multimodal "messages" record tokenizes exactly as the chat
    # template renders it (what SFT trains on and `tools/generate.py --chat` prompts with), and
    # the loss covers the assistant turn (its think block and answer) only.
    from megatron_bluelm.data.chat_template import render_chat
    from megatron_bluelm.data.multimodal import encode_record

    tok = load_tokenizer(BUNDLED_TOKENIZER)
    msgs = [{"role": "user", "content": "<image> What is it?"},
            {"role": "assistant", "content": "A cat.", "thinking": "Fur, whiskers."}]
    tokens, mask = encode_record({"images": ["cat.jpg"], "messages": msgs}, tok, "in.jsonl:1")
    assert tokens.tolist() == tok.encode(render_chat(msgs, thinking=True)) + [tok.eod]
    learned = tok.decode([t for t, m in zip(tokens.tolist(), mask.tolist()) if m])
    assert "Fur, whiskers." in learned and "A cat." in learned and "What is it?" not in learned
    plain = [msgs[0], {"role": "assistant", "content": "A cat."}]  # no thinking: an empty think block
    tokens, _ = encode_record({"images": ["cat.jpg"], "messages": plain}, tok, "in.jsonl:2")
    assert tokens.tolist() == tok.encode(render_chat(plain, thinking=False)) + [tok.eod]


def test_bad_messages_name_the_record(images):
    recs = [{"images": ["cat.jpg"], "messages": [{"role": "robot", "content": "<image> hi"}]}]
    with pytest.raises(ConfigError, match=r"in.jsonl:1: messages\[0\]: role 'robot' is not one of"):
        _run(images, recs)
    with pytest.raises(ConfigError, match=r"in.jsonl:1: \"messages\" must be a list"):
        _run(images, [{"images": ["cat.jpg"], "messages": "hi"}])
