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
