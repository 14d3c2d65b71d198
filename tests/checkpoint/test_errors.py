"""Clear errors: missing or incomplete checkpoint directories, shape mismatches, unknown architectures."""
import json
import os
from types import SimpleNamespace

import pytest
import torch

from megatron_bluelm.config.schema import RunConfig
from megatron_bluelm.convert import llama
from megatron_bluelm.convert.api import architecture, hf_to_megatron
from megatron_bluelm.convert.mapping import ConversionError, Dims, find, from_hf, merge_tp, split_tp, to_hf
from megatron_bluelm.training.checkpointing import (
    LATEST,
    Checkpointer,
    CheckpointError,
    iter_dir,
    prune,
    resolve_checkpoint,
)

DIMS = Dims(num_heads=4, num_groups=2, head_dim=8, vocab_size=10, padded_vocab_size=16)


def _checkpointer(tmp_path, load, save=None):
    cfg = RunConfig()
    cfg.checkpoint.load, cfg.checkpoint.save = load, save
    return Checkpointer(SimpleNamespace(cfg=cfg, logger=SimpleNamespace(print=lambda msg: None)))


def _complete(root, it):
    os.makedirs(iter_dir(root, it))
    open(os.path.join(iter_dir(root, it), "meta.json"), "w").write("{}")


def test_missing_checkpoint_dir(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match="holds no complete checkpoint"):
        _checkpointer(tmp_path, str(tmp_path))._find_resume_dir()
    # Loading from the save dir itself (resume after preemption) starts fresh when there is nothing yet.
    assert _checkpointer(tmp_path, str(tmp_path / "s"), str(tmp_path / "s"))._find_resume_dir() is None


def test_incomplete_checkpoints_are_ignored_and_reported(tmp_path):
    root = str(tmp_path)
    _complete(root, 2)
    open(os.path.join(root, LATEST), "w").write("2")
    os.makedirs(iter_dir(root, 4))  # killed mid-save: no meta.json
    path, notes = resolve_checkpoint(root)
    assert path == iter_dir(root, 2) and "iter_0000004" in notes[0] and "interrupted" in notes[0]
    with pytest.raises(CheckpointError, match="incomplete"):
        resolve_checkpoint(iter_dir(root, 4))
    open(os.path.join(root, LATEST), "w").write("4")
    with pytest.raises(CheckpointError, match="names iteration 4"):
        resolve_checkpoint(root)


def test_prune_keeps_last_k_and_latest(tmp_path):
    root = str(tmp_path)
    for it in (1, 2, 3, 4):
        _complete(root, it)
    prune(root, keep_last=2, latest=4)
    assert sorted(os.listdir(root)) == ["iter_0000003", "iter_0000004"]


def test_shape_mismatch_names_tensor_and_shapes():
    hf = to_hf(llama.TABLE, {"decoder.layers.0.mlp.linear_fc2.weight": torch.zeros(16, 32)}, DIMS)
    with pytest.raises(ConversionError, match=r"linear_fc2.weight.*\(16, 32\).*\(16, 64\)"):
        from_hf(llama.TABLE, hf, DIMS, {"decoder.layers.0.mlp.linear_fc2.weight": (16, 64)})
    with pytest.raises(ConversionError, match="no mapping"):
        to_hf(llama.TABLE, {"decoder.layers.0.mystery.weight": torch.zeros(2)}, DIMS)


def test_unknown_architecture(tmp_path):
    with pytest.raises(ConversionError, match="unsupported architecture 'gpt2'"):
        architecture("gpt2")
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ConversionError, match="unsupported HF architecture.*GPT2LMHeadModel"):
        hf_to_megatron(str(tmp_path), str(tmp_path / "out"))


def test_table_fusing_and_tp_split_round_trip():
    """QKV per KV group and GLU gate/up: HF -> megatron -> HF is exact, and TP shards merge back."""
    hidden = 16
    q, k, v = torch.randn(32, hidden), torch.randn(16, hidden), torch.randn(16, hidden)
    qkv = find(llama.TABLE, "decoder.layers.3.self_attention.linear_qkv.weight")
    m = from_hf(llama.TABLE, {"model.layers.3.self_attn.q_proj.weight": q, "model.layers.3.self_attn.k_proj.weight": k,
                              "model.layers.3.self_attn.v_proj.weight": v}, DIMS,
                {"decoder.layers.3.self_attention.linear_qkv.weight": (64, hidden)})
    fused = m["decoder.layers.3.self_attention.linear_qkv.weight"]
    assert torch.equal(fused[:16], q[:16]) and torch.equal(fused[16:24], k[:8]) and torch.equal(fused[24:32], v[:8])
    back = to_hf(llama.TABLE, m, DIMS)
    assert torch.equal(back["model.layers.3.self_attn.q_proj.weight"], q)
    fc1 = find(llama.TABLE, "decoder.layers.0.mlp.linear_fc1.weight")
    for pm, full in ((qkv, fused), (fc1, torch.randn(12, hidden))):
        shards = [split_tp(pm, full, 2, r) for r in range(2)]
        assert torch.equal(merge_tp(pm, shards), full)
    gate_up = torch.arange(8.0)[:, None]
    assert split_tp(fc1, gate_up, 2, 1).flatten().tolist() == [2, 3, 6, 7]  # [gate_1; up_1]


def test_resume_into_other_shape_names_tensor_and_shapes(reference_run, demo_prefix, tmp_path):
    from ckpt_workers import pretrain, tiny_overrides
    from distributed import run_distributed

    _, save = reference_run
    args = tiny_overrides(demo_prefix, str(tmp_path), load=save) + ["--model.ffn_hidden_size", "256"]
    with pytest.raises(RuntimeError, match=r"shape mismatch for 'decoder.layers.mlp.linear_fc2.weight'.*has \(4, 128, "
                                           r"344\), the configured model has \(4, 128, 256\)"):
        run_distributed(pretrain, 1, args)
