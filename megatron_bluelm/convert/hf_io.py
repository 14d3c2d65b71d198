"""Hugging Face checkpoint directories: safetensors shards (+ index), config.json, generation_config."""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file

from megatron_bluelm.convert.mapping import ConversionError

INDEX = "model.safetensors.index.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    return shards + [current]


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _bar(desc: str, total: int):
    """Bytes written / read, for conversions of multi-GB checkpoints (tqdm on stderr)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False)


def save_tensors(out: str, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> None:
    shards = _shards(tensors, max_shard_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    with _bar(f"writing {out}", _nbytes(tensors)) as bar:
        for fname, shard in zip(names, shards):
            save_file(shard, os.path.join(out, fname), metadata={"format": "pt"})
            weight_map.update({name: fname for name in shard})
            bar.update(_nbytes(shard))
    if len(shards) > 1:
        write_json(os.path.join(out, INDEX), {"metadata": {"total_size": _nbytes(tensors)}, "weight_map": weight_map})


def load_tensors(hf_dir: str) -> dict[str, torch.Tensor]:
    index = os.path.join(hf_dir, INDEX)
    single = os.path.join(hf_dir, "model.safetensors")
    if os.path.isfile(index):
        files = sorted(set(read_json(index)["weight_map"].values()))
    elif os.path.isfile(single):
        files = ["model.safetensors"]
    else:
        raise ConversionError(f"'{hf_dir}' has no model.safetensors nor {INDEX}")
    out = {}
    with _bar(f"reading {hf_dir}", sum(os.path.getsize(os.path.join(hf_dir, f)) for f in files)) as bar:
        for f in files:
            out.update(load_file(os.path.join(hf_dir, f)))
            bar.update(os.path.getsize(os.path.join(hf_dir, f)))
    return out


def read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConversionError(f"missing file '{path}'")
    with open(path) as f:
        return json.load(f)


def write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def generation_config(config: dict) -> dict:
    return {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
            "pad_token_id": config["pad_token_id"], "do_sample": False}
