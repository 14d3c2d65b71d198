"""Hugging Face export of the multimodal model as ``Lfm2VlForConditionalGeneration``: transformers loads
it offline and computes our logits on real images (several tiles + thumbnail, two images in one
sequence) from a checkpoint trained under TP2; HF -> megatron -> HF is bit-identical; HF weights of
any value import exactly; configs that are not our structure fail with a clear error. The exported
processor (remote code) loads with AutoProcessor on the oldest and newest declared transformers and
makes training's inputs; pipeline("image-text-to-text") answers as our engine does."""
import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from distributed import run_distributed
from hf_export_workers import IMAGES, PROMPT, convert, our_greedy, our_logits, sample, train_and_save
from mm_workers import overrides

from megatron_bluelm.convert import lfm2_vl
from megatron_bluelm.convert.api import hf_to_megatron, megatron_to_hf
from megatron_bluelm.convert.mapping import ConversionError, Dims, find, unfuse
from megatron_bluelm.models.adapter import pixel_unshuffle

transformers = pytest.importorskip("transformers")
hf_pixel_inputs = pytest.importorskip("megatron_bluelm.convert.processing_bluelm").hf_pixel_inputs
os.environ["HF_HUB_OFFLINE"] = "1"
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def exported(mm_prefix, tmp_path_factory):
    """(checkpoint saved by a 2-step TP2 multimodal run, its HF export)."""
    out = tmp_path_factory.mktemp("mm_hf")
    ckpt, hf_dir = str(out / "ckpt"), str(out / "hf")
    args = overrides(mm_prefix, str(out / "run"), 2, ["--parallel.tp", "2", "--training.global_batch_size", "2",
                                                      "--checkpoint.save", ckpt])
    run_distributed(train_and_save, 2, args)
    run_distributed(convert, 1, "to_hf", ckpt, hf_dir)
    return ckpt, hf_dir


def _hf_logits(hf_dir, ids, tiles, patch_size):
    model = transformers.AutoModelForImageTextToText.from_pretrained(hf_dir, dtype=torch.float32).eval()
    assert type(model).__name__ == "Lfm2VlForConditionalGeneration"
    with torch.no_grad():
        return model(input_ids=ids, **hf_pixel_inputs(tiles, patch_size)).logits[0]


@pytest.mark.parametrize("grid", [4, 8, 26])  # 26: vit-so400m's 364-pixel tiles
def test_lfm2_vl_pieces_are_ours_exactly(grid):
    """Lfm2Vl's pixel unshuffle is ours (same channel order: no permutation of linear_1 needed), and
    Siglip2's position-embedding resize is the identity at the native patch grid."""
    from transformers.models.lfm2_vl.modeling_lfm2_vl import Lfm2VlMultiModalProjector
    from transformers.models.siglip2.modeling_siglip2 import Siglip2VisionEmbeddings

    feats = torch.randn(3, grid * grid, 5)
    cfg = SimpleNamespace(vision_config=SimpleNamespace(hidden_size=5), text_config=SimpleNamespace(hidden_size=6),
                          **{k: v for k, v in lfm2_vl.FIXED.items() if k != "tie_word_embeddings"},
                          projector_hidden_size=6)
    projector = Lfm2VlMultiModalProjector(cfg)
    theirs = torch.stack([projector.pixel_unshuffle(f.reshape(1, grid, grid, 5)).reshape(-1, 20) for f in feats])
    assert torch.equal(pixel_unshuffle(feats, grid), theirs)
    pos = torch.randn(grid, grid, 7)
    resized = Siglip2VisionEmbeddings.resize_positional_embeddings(pos, torch.tensor([[grid, grid]]), grid * grid)
    assert torch.equal(resized[0], pos.reshape(grid * grid, 7))
    # The patch layout: our Conv2d equals the Linear over hf_pixel_inputs' patches with the mapped weight.
    conv = torch.nn.Conv2d(3, 6, 14, stride=14, dtype=torch.float64)
    tiles = torch.randn(2, 3, 14 * grid, 14 * grid, dtype=torch.float64)
    (w,) = unfuse(find(lfm2_vl.TABLE, "vision_model.patch_embedding.weight"), conv.weight.detach(),
                  {"vision": Dims(num_heads=1, num_groups=1, head_dim=1, patch_size=14)})
    patches = hf_pixel_inputs(tiles, 14)["pixel_values"]
    torch.testing.assert_close(patches @ w.T + conv.bias, conv(tiles).flatten(2).transpose(1, 2).detach())


def test_hf_logits_equal_ours(exported):
    ckpt, hf_dir = exported
    ours, ids, tiles, per_image = run_distributed(our_logits, 1, ckpt)[0]
    assert per_image == [4, 5]  # rocket_tall: 1 x 3 + thumbnail; chelsea: 2 x 2 + thumbnail
    config = json.load(open(os.path.join(hf_dir, "config.json")))
    assert (ids == config["image_token_id"]).sum() == tiles.shape[0] * 16 and ids.shape[1] > tiles.shape[0] * 16
    theirs = _hf_logits(hf_dir, ids, tiles, config["vision_config"]["patch_size"])
    assert theirs.shape == (ids.shape[1], config["text_config"]["vocab_size"])
    torch.testing.assert_close(theirs, ours[:, : theirs.shape[1]], **TOL)


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OLDEST = os.environ.get("BLUELM_TRANSFORMERS_OLDEST", os.path.join(REPO, ".deps", "transformers-oldest"))
PROCESS = (  # run by the oldest transformers: the exported processor on IMAGES + PROMPT
    "import sys, torch, transformers\n"
    "hf_dir, images, (prompt, out) = sys.argv[1], sys.argv[2:-2], sys.argv[-2:]\n"
    "proc = transformers.AutoProcessor.from_pretrained(hf_dir, trust_remote_code=True)\n"
    "assert type(proc).__name__ == 'BlueLMProcessor', type(proc)\n"
    "torch.save({'version': transformers.__version__, **proc(images=images, text=prompt, return_tensors='pt')}, out)\n")


@pytest.mark.parametrize("version", ["newest", "oldest"])
def test_exported_processor_makes_training_inputs(exported, tmp_path, version):
    """AutoProcessor (trust_remote_code) on the export: the ids with every <image> expanded and the
    pixels of every tile are exactly what training builds (data/images.py) for the same images. The
    oldest version runs in a process without the project on its path: the export stands alone."""
    import subprocess
    import sys

    from megatron_bluelm.convert.megatron_io import run_config_from_meta
    from megatron_bluelm.data.tokenizer import load_tokenizer
    from megatron_bluelm.training.checkpointing import read_meta, resolve_checkpoint

    ckpt, hf_dir = exported
    if version == "newest":
        proc = transformers.AutoProcessor.from_pretrained(hf_dir, trust_remote_code=True)
        assert type(proc).__name__ == "BlueLMProcessor"
        got = proc(images=IMAGES, text=PROMPT, return_tensors="pt")
    else:
        if not os.path.isdir(OLDEST):
            pytest.skip(f"no oldest transformers at {OLDEST} (make install puts it there)")
        env = dict(os.environ, PYTHONPATH=OLDEST, HF_MODULES_CACHE=str(tmp_path / "modules"))
        out = tmp_path / "inputs.pt"
        r = subprocess.run([sys.executable, "-c", PROCESS, hf_dir, *IMAGES, PROMPT, str(out)], capture_output=True,
                           text=True, env=env, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        # the model beside the processor needs 5.x: 4.x loads it with a random vision tower, silently
        assert "the model of this export needs transformers >= 5" in r.stderr, r.stderr[-2000:]
        got = torch.load(out)
        assert f'"transformers>={got.pop("version")}' in open(os.path.join(REPO, "setup.py")).read()
    cfg = run_config_from_meta(read_meta(resolve_checkpoint(ckpt)[0]))
    ids, tiles, _ = sample(cfg.vision, load_tokenizer(cfg.data.tokenizer_model))  # training's processing
    assert torch.equal(got["input_ids"], ids) and got["attention_mask"].all()
    config = json.load(open(os.path.join(hf_dir, "config.json")))
    pixels = hf_pixel_inputs(tiles, config["vision_config"]["patch_size"])
    assert sorted(got.keys()) == sorted(["input_ids", "attention_mask", *pixels])
    for key, value in pixels.items():
        assert torch.equal(got[key], value), key


def test_pipeline_answers_as_our_engine(exported):
    """transformers.pipeline("image-text-to-text") on the export (processor and model from the
    directory) generates greedily the same tokens as our engine on the checkpoint."""
    ckpt, hf_dir = exported
    pipe = transformers.pipeline("image-text-to-text", model=hf_dir, trust_remote_code=True, dtype=torch.float32)
    assert type(pipe.processor).__name__ == "BlueLMProcessor"
    stops = json.load(open(os.path.join(hf_dir, "generation_config.json")))["eos_token_id"]
    (result,) = pipe(images=IMAGES, text=PROMPT, max_new_tokens=8, return_tensors=True)
    prompt_len = len(pipe.processor(images=IMAGES, text=PROMPT)["input_ids"][0])
    ours = run_distributed(our_greedy, 1, ckpt, 8, stops)[0]
    assert len(ours) > 0 and result["generated_token_ids"][prompt_len:].tolist() == ours


def test_hf_to_megatron_to_hf_is_bit_identical(exported, tmp_path):
    from safetensors.torch import load_file

    _, hf_dir = exported
    run_distributed(convert, 1, "from_hf", hf_dir, str(tmp_path / "mcore"))
    run_distributed(convert, 1, "to_hf", str(tmp_path / "mcore"), str(tmp_path / "hf2"))
    a, b = load_file(os.path.join(hf_dir, "model.safetensors")), load_file(str(tmp_path / "hf2" / "model.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("model.vision_tower.") for k in a)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
              "tokenizer.model", "preprocessor_config.json", "processor_config.json", "processing_bluelm.py",
              "bluelm_images.py"):
        assert open(os.path.join(hf_dir, f), "rb").read() == open(tmp_path / "hf2" / f, "rb").read(), f


def test_any_hf_weights_import_exactly(exported, tmp_path):
    """Every HF tensor randomized (norms and biases too), saved by transformers itself: the import
    computes the same logits as transformers, and exporting it again gives the same tensors."""
    from safetensors.torch import load_file

    _, hf_dir = exported
    model = transformers.AutoModelForImageTextToText.from_pretrained(hf_dir, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(base + torch.randn(p.shape, generator=gen) * (0.05 if p.dim() > 1 else 0.1))
    rand_dir = str(tmp_path / "hf_random")
    model.save_pretrained(rand_dir)
    shutil.copy(os.path.join(hf_dir, "tokenizer.model"), rand_dir)
    run_distributed(convert, 1, "from_hf", rand_dir, str(tmp_path / "mcore"))
    ours, ids, tiles, _ = run_distributed(our_logits, 1, str(tmp_path / "mcore"))[0]
    theirs = _hf_logits(rand_dir, ids, tiles, model.config.vision_config.patch_size)
    torch.testing.assert_close(theirs, ours[:, : theirs.shape[1]], **TOL)
    run_distributed(convert, 1, "to_hf", str(tmp_path / "mcore"), str(tmp_path / "hf2"))
    a = load_file(os.path.join(rand_dir, "model.safetensors"))
    b = load_file(str(tmp_path / "hf2" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(projector_use_layernorm=True), r"projector_use_layernorm: True, our model has False"),
    (lambda c: c.update(projector_hidden_act="gelu_pytorch_tanh"), r"projector_hidden_act: 'gelu_pytorch_tanh'"),
    (lambda c: c.update(tie_word_embeddings=True), r"tie_word_embeddings: True"),
    (lambda c: c["text_config"].update(model_type="lfm2"), r"text_config.model_type: 'lfm2'"),
    (lambda c: c["vision_config"].update(num_patches=63), r"num_patches \(63\) must be g \* g"),
    (lambda c: c["vision_config"].update(vision_use_head=True), r"vision_config.vision_use_head: True"),
    (lambda c: c.update(image_token_id=5), r"image_token_id 5 is not the tokenizer's <image> id \(6\)"),
])
def test_mismatched_hf_config_is_a_clear_error(exported, tmp_path, edit, message):
    _, hf_dir = exported
    config = json.load(open(os.path.join(hf_dir, "config.json")))
    edit(config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    shutil.copy(os.path.join(hf_dir, "tokenizer.model"), tmp_path)
    with pytest.raises(ConversionError, match=message):
        hf_to_megatron(str(tmp_path), str(tmp_path / "out"))


def test_architecture_flag_must_match_the_checkpoint(exported, tmp_path, capsys):
    ckpt, _ = exported
    with pytest.raises(ConversionError, match=r"holds a multimodal .* cannot be exported as LlamaForCausalLM"):
        megatron_to_hf(ckpt, str(tmp_path / "hf"), hf_architecture="LlamaForCausalLM")
    from tools.convert_checkpoint import main

    with pytest.raises(SystemExit) as e:
        main(["mcore-to-hf", "--load", ckpt, "--out", str(tmp_path / "hf"), "--architecture", "LlamaForCausalLM"])
    assert e.value.code == 2 and "cannot be exported as LlamaForCausalLM" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()
