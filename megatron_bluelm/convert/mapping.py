"""The conversion engine: a declarative table of parameter mappings, applied in either direction.

A table row (:class:`ParamMap`) says, for one megatron parameter name pattern:

* which Hugging Face tensor(s) it corresponds to (``{layer}`` stands for the layer index in its block);
* ``tp_dim``: the dimension megatron shards it on under tensor parallelism (None: replicated);
* ``fuse``: how several HF tensors are fused into the one megatron tensor —
  ``"qkv"``: megatron's ``linear_qkv`` rows grouped per KV group ``[q heads of g; k_g; v_g]`` for each
  group g, from HF ``q_proj, k_proj, v_proj``; ``"glu"``: ``linear_fc1`` = ``[gate; up]`` from HF
  ``gate_proj, up_proj`` (under TP each shard is ``[gate_i; up_i]``);
* ``vocab``: rows are the vocabulary: megatron pads them (``models.decoder.padded_vocab_size``), HF
  holds exactly the tokenizer's;
* ``dims``: which tower's sizes (:class:`Dims`) the fused layouts use — a multimodal model has two
  (``"text"``: the decoder, ``"vision"``: the ViT); the engine takes one ``Dims`` or a dict of them.

``fuse`` also names pure layout changes of one tensor: ``"patch"``: megatron's patch convolution
``[D, C, p, p]`` <-> an HF linear over flattened patches ``[D, p * p * C]`` in (row, column, channel)
order. ``"qkv"`` applies to biases too (1-D tensors, same row grouping).

The engine works on *full* (TP1, all layers) state dicts; :func:`split_tp` / :func:`merge_tp` give a
TP rank's shard of a full tensor and back, with the same table (megatron's own dist_checkpointing does
the resharding of checkpoints; these serve in-memory conversions and check the table against it).
One module per HF architecture holds its table (``convert/llama.py``, ``convert/lfm2_vl.py``).
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional, Union

import torch

from megatron_bluelm.config.errors import ConfigError


class ConversionError(ConfigError):
    """A checkpoint cannot be converted: unknown architecture, unmapped or mis-shaped tensor."""


@dataclass(frozen=True)
class ParamMap:
    megatron: str
    hf: tuple[str, ...]
    tp_dim: Optional[int] = None
    fuse: Optional[str] = None  # None | "qkv" | "glu" | "patch"
    vocab: bool = False
    dims: str = "text"  # the key of this row's Dims when the engine gets one per tower


@dataclass(frozen=True)
class Dims:
    """The sizes the fused layouts depend on."""

    num_heads: int
    num_groups: int
    head_dim: int
    vocab_size: int = 0  # the tokenizer's (HF side)
    padded_vocab_size: int = 0  # the embedding's rows (megatron side)
    patch_size: int = 0  # the ViT's patch side (``fuse="patch"``)


DimsArg = Union[Dims, Mapping[str, Dims]]


def _dims_of(pm: ParamMap, d: DimsArg) -> Dims:
    if isinstance(d, Dims):
        return d
    if pm.dims not in d:
        raise ConversionError(f"no sizes given for the '{pm.dims}' tower (needed by '{pm.megatron}')")
    return d[pm.dims]


def _regex(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(re.escape("{layer}"), r"(?P<layer>\d+)") + "$")


def _fill(pattern: str, layer: Optional[str]) -> str:
    return pattern.replace("{layer}", layer) if layer is not None else pattern


def _match(name: str, patterns: list[tuple[re.Pattern, ParamMap]]) -> Optional[tuple[ParamMap, Optional[str]]]:
    for regex, pm in patterns:
        m = regex.match(name)
        if m:
            return pm, m.groupdict().get("layer")
    return None


# ----------------------------------------------------------------------------- fusing

def _qkv_split(w: torch.Tensor, d: Dims) -> tuple[torch.Tensor, ...]:
    per_group = d.num_heads // d.num_groups
    rest = tuple(w.shape[1:])  # (hidden,) for a weight, () for a bias
    g = w.reshape(d.num_groups, (per_group + 2) * d.head_dim, *rest)
    q, k, v = torch.split(g, [per_group * d.head_dim, d.head_dim, d.head_dim], dim=1)
    return tuple(t.reshape(-1, *rest).contiguous() for t in (q, k, v))


def _qkv_fuse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, d: Dims) -> torch.Tensor:
    per_group = d.num_heads // d.num_groups
    rest = tuple(q.shape[1:])
    parts = (q.reshape(d.num_groups, per_group * d.head_dim, *rest), k.reshape(d.num_groups, d.head_dim, *rest),
             v.reshape(d.num_groups, d.head_dim, *rest))
    return torch.cat(parts, dim=1).reshape(-1, *rest).contiguous()


def _conv_to_patch_linear(w: torch.Tensor) -> torch.Tensor:
    """[D, C, p, p] -> [D, p * p * C], input features in (row, column, channel) order."""
    return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1).contiguous()


def _patch_linear_to_conv(w: torch.Tensor, d: Dims) -> torch.Tensor:
    p = d.patch_size
    if p <= 0 or w.dim() != 2 or w.shape[1] % (p * p):
        raise ConversionError(f"patch embedding {tuple(w.shape)} is not a linear over {p} x {p} patches")
    return w.reshape(w.shape[0], p, p, -1).permute(0, 3, 1, 2).contiguous()


def unfuse(pm: ParamMap, t: torch.Tensor, d: DimsArg) -> tuple[torch.Tensor, ...]:
    """megatron tensor -> HF tensors (one per ``pm.hf``)."""
    d = _dims_of(pm, d)
    if pm.fuse == "patch":
        return (_conv_to_patch_linear(t),)
    if pm.fuse == "qkv":
        return _qkv_split(t, d)
    if pm.fuse == "glu":
        return tuple(x.contiguous() for x in t.chunk(2, dim=0))
    if pm.vocab:
        return (t[: d.vocab_size].contiguous(),)
    return (t,)


def fuse(pm: ParamMap, ts: tuple[torch.Tensor, ...], d: DimsArg) -> torch.Tensor:
    """HF tensors -> the megatron tensor."""
    d = _dims_of(pm, d)
    if pm.fuse == "patch":
        return _patch_linear_to_conv(ts[0], d)
    if pm.fuse == "qkv":
        return _qkv_fuse(*ts, d)
    if pm.fuse == "glu":
        return torch.cat(ts, dim=0)
    if pm.vocab:
        pad = ts[0].new_zeros((d.padded_vocab_size - ts[0].shape[0],) + tuple(ts[0].shape[1:]))
        return torch.cat([ts[0], pad], dim=0)
    return ts[0]


# ----------------------------------------------------------------------------- whole state dicts

def to_hf(table: tuple[ParamMap, ...], mstate: dict[str, torch.Tensor], d: DimsArg) -> dict[str, torch.Tensor]:
    patterns = [(_regex(pm.megatron), pm) for pm in table]
    out = {}
    for name, t in mstate.items():
        found = _match(name, patterns)
        if found is None:
            raise ConversionError(f"megatron tensor '{name}' {tuple(t.shape)} has no mapping in the table")
        pm, layer = found
        for hf_name, piece in zip(pm.hf, unfuse(pm, t, d)):
            out[_fill(hf_name, layer)] = piece
    return out


def from_hf(table: tuple[ParamMap, ...], hstate: dict[str, torch.Tensor], d: DimsArg,
            expected: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """HF tensors -> megatron names; ``expected`` (megatron name -> shape) is what the model needs."""
    patterns = [(_regex(pm.megatron), pm) for pm in table]
    out, used = {}, set()
    for name, shape in expected.items():
        found = _match(name, patterns)
        if found is None:
            raise ConversionError(f"megatron tensor '{name}' has no mapping in the table")
        pm, layer = found
        hf_names = [_fill(h, layer) for h in pm.hf]
        missing = [h for h in hf_names if h not in hstate]
        if missing:
            raise ConversionError(f"HF checkpoint lacks {missing} (needed for megatron '{name}')")
        t = fuse(pm, tuple(hstate[h] for h in hf_names), d)
        if tuple(t.shape) != tuple(shape):
            raise ConversionError(f"shape mismatch for '{name}' (from {hf_names}): the HF checkpoint gives "
                                  f"{tuple(t.shape)}, the model has {tuple(shape)}")
        out[name] = t
        used.update(hf_names)
    unused = sorted(set(hstate) - used)
    if unused:
        raise ConversionError(f"HF checkpoint has tensors the model does not use: {unused[:5]}"
                              + (f" (+{len(unused) - 5} more)" if len(unused) > 5 else ""))
    return out


# ----------------------------------------------------------------------------- tensor parallel

def split_tp(pm: ParamMap, full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """This TP rank's shard of a full megatron tensor (as megatron-core lays it out)."""
    if pm.tp_dim is None or tp == 1:
        return full
    if pm.fuse == "glu":  # each shard is [gate_i; up_i]
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]], dim=0)
    # qkv: KV groups are contiguous blocks of rows, so a plain split keeps whole groups per rank.
    return full.chunk(tp, dim=pm.tp_dim)[rank]


def merge_tp(pm: ParamMap, shards: list[torch.Tensor]) -> torch.Tensor:
    if pm.tp_dim is None or len(shards) == 1:
        return shards[0]
    if pm.fuse == "glu":
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=pm.tp_dim)


def find(table: tuple[ParamMap, ...], megatron_name: str) -> ParamMap:
    found = _match(megatron_name, [(_regex(pm.megatron), pm) for pm in table])
    if found is None:
        raise ConversionError(f"megatron tensor '{megatron_name}' has no mapping in the table")
    return found[0]
