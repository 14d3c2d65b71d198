"""Attention core: causal, or causal within packed documents; GQA without repeating K/V.

q [b, nq, s, d], k/v [b, nkv, s, d], nq a multiple of nkv. Paths:
* plain causal / full: `F.scaled_dot_product_attention(..., enable_gqa=True)` (flash or cuDNN on
  GPU; the backends index the shared K/V head, no repeat_interleave in memory).
* packed documents (document_ids [b, s] ints; a token attends to earlier-or-same positions of
  its own document): on CUDA, `torch.nn.attention.flex_attention` with a block mask (fully
  masked blocks are skipped, so cost scales with sum(len_doc^2), not s^2), compiled once per
  process (torch.compile then specializes per shape); elsewhere SDPA with an explicit boolean
  [b, 1, s, s] mask.

Training passes the same ``document_ids`` tensor to every layer; ``cached_document_block_mask``
builds its BlockMask on the first layer's call and hands the same object to all the others (and to
the recomputation in backward, which sees the same storage).
"""

import collections
import functools

import torch
import torch.nn.functional as F


def document_mask(document_ids, causal):
    """Boolean [b, 1, s, s]: True where query i may attend key j."""
    same = document_ids[:, :, None] == document_ids[:, None, :]
    if causal:
        s = document_ids.shape[1]
        same = same & torch.ones(s, s, dtype=torch.bool, device=same.device).tril()
    return same[:, None]


def attention_ref(q, k, v, *, causal=True, document_ids=None, scale=None):
    """Math reference: explicit K/V repeat, fp32 softmax, masked scores."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    s = q.shape[2]
    if document_ids is not None:
        allowed = document_mask(document_ids, causal)
    elif causal:
        allowed = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    else:
        allowed = None
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ v.float()).to(q.dtype)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _mask_mod(document_ids, causal):
    def mask_mod(b, h, q_idx, kv_idx):
        ok = document_ids[b, q_idx] == document_ids[b, kv_idx]
        return ok & (q_idx >= kv_idx) if causal else ok

    return mask_mod


def _sorted_blocks(selected):
    """[b, nq, nk] bool -> (counts [b, 1, nq], indices [b, 1, nq, nk]) int32, selected blocks first."""
    counts = selected.sum(-1, dtype=torch.int32)
    order = torch.argsort((~selected).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return counts[:, None], order[:, None]


def sorted_document_block_mask(document_ids, causal=True, block_size=128):
    """BlockMask for document ids that never decrease along a row (how packed rows number their
    documents), from per-block first / last ids: O((s / block)^2) tensor ops on the device and no
    evaluation of the mask function over all s^2 pairs, which is what ``create_block_mask`` does.

    With sorted ids a block's ids span [first, last], and two blocks share a document iff their
    spans overlap; a block pair is *full* (no per-element masking) iff both blocks lie in one and
    the same document (and, causal, the key block is strictly earlier)."""
    from torch.nn.attention.flex_attention import BlockMask

    b, s = document_ids.shape
    n = s // block_size
    blocks = document_ids.view(b, n, block_size)
    first, last = blocks[..., 0], blocks[..., -1]
    fq, lq, fk, lk = first[:, :, None], last[:, :, None], first[:, None, :], last[:, None, :]
    shared = (fq <= lk) & (fk <= lq)
    full = (fq == lq) & (fk == lk) & (fq == fk)
    if causal:
        ones = torch.ones(n, n, dtype=torch.bool, device=document_ids.device)
        shared = shared & ones.tril()
        full = full & ones.tril(-1)
    partial = shared & ~full
    kv_num, kv_idx = _sorted_blocks(partial)
    full_num, full_idx = _sorted_blocks(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block_size,
                                    mask_mod=_mask_mod(document_ids, causal), seq_lengths=(s, s))


def document_block_mask(document_ids, causal=True, block_size=128):
    """flex_attention BlockMask for packed documents. Build it once per micro-batch and pass it to
    every layer's `attention(..., block_mask=...)` (or let `cached_document_block_mask` do so).

    Sorted ids (every packed row of data/) and a length that is a multiple of the block take the
    block-level construction above; anything else ``create_block_mask`` over every element."""
    from torch.nn.attention.flex_attention import create_block_mask

    b, s = document_ids.shape
    if s % block_size == 0 and bool((document_ids[:, 1:] >= document_ids[:, :-1]).all()):
        return sorted_document_block_mask(document_ids, causal, block_size)
    # H=None broadcasts over heads.
    return create_block_mask(_mask_mod(document_ids, causal), b, None, s, s, device=document_ids.device,
                             BLOCK_SIZE=block_size)


_BLOCK_MASKS: "collections.OrderedDict" = collections.OrderedDict()
# Micro-batches whose mask may still be wanted (recomputation in backward); an evicted one is rebuilt,
# so the size bounds memory (a 32k-token row's mask is ~1 MB), never correctness.
_CACHE_SIZE = 16


def cached_document_block_mask(document_ids, causal=True):
    """``document_block_mask`` memoized on the ids tensor's storage. The entry keeps the ids alive,
    so no other tensor can take their address while it is cached; a view or ``detach()`` of the
    same ids (what activation recomputation passes) finds the same mask."""
    key = (document_ids.data_ptr(), tuple(document_ids.shape), document_ids.stride(), document_ids.device,
           document_ids._version, bool(causal))
    hit = _BLOCK_MASKS.get(key)
    if hit is not None:
        _BLOCK_MASKS.move_to_end(key)
        return hit[1]
    mask = document_block_mask(document_ids, causal)
    _BLOCK_MASKS[key] = (document_ids, mask)
    while len(_BLOCK_MASKS) > _CACHE_SIZE:
        _BLOCK_MASKS.popitem(last=False)
    return mask


def attention(q, k, v, *, causal=True, document_ids=None, scale=None, block_mask=None):
    """Scaled dot-product attention, [b, heads, s, d] layout; see the module docstring.

    block_mask: optional prebuilt `document_block_mask(document_ids, causal)` (CUDA path only)."""
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"nq={q.shape[1]} must be a multiple of nkv={k.shape[1]}")
    gqa = q.shape[1] != k.shape[1]
    if document_ids is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                              enable_gqa=gqa)
    if q.is_cuda:
        if block_mask is None:
            block_mask = cached_document_block_mask(document_ids, causal)
        return _compiled_flex()(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)
    mask = document_mask(document_ids, causal)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
