"""HF shards are written and read with a byte progress bar (multi-GB conversions are not silent), and the
shard layout round-trips: one file, or several with their index."""
import os

import torch

from megatron_bluelm.convert import hf_io


def test_shards_round_trip_with_progress(tmp_path, capsys):
    tensors = {f"w{i}": torch.randn(64, 64) for i in range(4)}  # 16 KiB each
    for max_bytes, files in ((1 << 30, {"model.safetensors"}), (20_000, {f"model-0000{i}-of-00004.safetensors"
                                                                        for i in range(1, 5)} | {hf_io.INDEX})):
        out = tmp_path / str(max_bytes)
        out.mkdir()
        hf_io.save_tensors(str(out), tensors, max_bytes)
        assert set(os.listdir(out)) == files
        back = hf_io.load_tensors(str(out))
        assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    err = capsys.readouterr().err
    assert f"writing {tmp_path / '20000'}:" in err and "/64.0k" in err  # 4 x 16 KiB of tensors
    assert f"reading {tmp_path / '20000'}:" in err


def _tiny(megatron_io):
    from megatron_bluelm.config.presets import apply_preset
    from megatron_bluelm.config.schema import RunConfig

    cfg = RunConfig()
    cfg.model.preset = "tiny"
    apply_preset(cfg.model)
    cfg.training.precision = "fp32"
    megatron_io.start_single_process()
    return cfg


def _save_and_load(root: str):
    """A tiny decoder with random values everywhere (build_model leaves the weights to the load), saved
    as a model-only checkpoint, then read by the conversion's loader into a second model: (path, saved
    tensors, loaded tensors, the bytes the bar counts, the number of loads)."""
    from megatron_bluelm.convert import megatron_io
    from megatron_bluelm.training.checkpointing import SHARDED_METADATA

    cfg = _tiny(megatron_io)
    model = megatron_io.build_model(cfg, 512)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    path = megatron_io.save_model_only(model, cfg, root, {})
    fresh = megatron_io.build_model(cfg, 512)
    got = megatron_io.load_full(fresh, path)
    groups = megatron_io._load_groups(fresh.sharded_state_dict(metadata=SHARDED_METADATA))
    return path, megatron_io._tensors(model), got, sum(map(megatron_io._nbytes, groups)), len(groups)


def test_megatron_checkpoint_load_shows_byte_progress(tmp_path, capfd):
    """The conversion reads a megatron checkpoint one checkpoint tensor at a time under a byte bar
    (megatron-core's dist_checkpointing.load is one silent call): the bar names the checkpoint, its
    total is the model's tensor bytes, and the tensors read are the saved ones."""
    from distributed import run_distributed

    path, saved, got, nbytes, groups = run_distributed(_save_and_load, 1, str(tmp_path / "ckpt"))[0]
    err = capfd.readouterr().err
    assert got.keys() == saved.keys() and all(torch.equal(got[k], saved[k]) for k in saved) and groups > 10
    from tqdm import tqdm

    total = tqdm.format_sizeof(nbytes, divisor=1024)
    assert nbytes == sum(t.numel() * t.element_size() for t in saved.values())  # every byte, counted once
    assert f"reading {path}:" in err and f"/{total} [" in err, err[-2000:]
