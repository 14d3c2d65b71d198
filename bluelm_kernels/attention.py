"""Attention core: causal, or causal within packed documents; GQA without repeating K/V.

q [b, nq, s, d], k/v [b, nkv, s, d], nq a multiple of nkv. Paths (``PATHS`` counts the calls):
* ``sdpa``: plain causal / full, `F.scaled_dot_product_attention(..., enable_gqa=True)` (flash or
  cuDNN on GPU; the backends index the shared K/V head, no repeat_interleave in memory). Also every
  micro-batch whose rows each hold ONE document: document masking changes nothing there.
* ``varlen`` (CUDA, bf16/fp16, ids that never decrease along a row, i.e. every packed row of
  data/): the documents are independent sequences of one flattened [b * s] token stream, run by the
  same flash-attention kernel as SDPA's flash backend in its variable-length form
  (``aten._flash_attention_forward`` with cumulative lengths): cost Σ len_doc², at the speed of the
  unmasked path. (FlexAttention's generated kernels ran at ~37% of cuDNN SDPA's FLOP rate on an
  H200, and text pretraining with document masks lost 17% of its throughput at 4k.)
* ``flex`` (CUDA, anything else): `torch.nn.attention.flex_attention` with a block mask (fully
  masked blocks are skipped), compiled once per process (torch.compile specializes per shape).
* ``dense`` (CPU): SDPA with an explicit boolean [b, 1, s, s] mask, the exact reference.

What a micro-batch's ids imply (``DocumentLayout``: one document per row? sorted? the cumulative
lengths) is computed once per ids tensor, on the host, and cached with the ids; training registers
it from the loader's CPU ids (``register_document_layout``) so the device never syncs for it. The
same ids tensor reaches every layer (and the recomputation in backward, which sees the same
storage), so all of them find the one entry; a block mask is built into the entry on first use.
"""

import collections
import dataclasses
import functools
import logging

import torch
import torch.nn.functional as F

from .transfer import tensor_key, to_device

log = logging.getLogger(__name__)

PATHS: "collections.Counter" = collections.Counter()  # calls per path (module docstring) and builds:
# "layout" (a micro-batch's DocumentLayout computed) and "block_mask" (a BlockMask built).


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


def document_block_mask(document_ids, causal=True, block_size=128, sorted_ids=None):
    """flex_attention BlockMask for packed documents. Build it once per micro-batch and pass it to
    every layer's `attention(..., block_mask=...)` (or let `cached_document_block_mask` do so).

    Sorted ids (every packed row of data/) and a length that is a multiple of the block take the
    block-level construction above; anything else ``create_block_mask`` over every element.
    ``sorted_ids``: whether the ids are sorted, when known (None: checked here, a device sync)."""
    from torch.nn.attention.flex_attention import create_block_mask

    PATHS["block_mask"] += 1
    b, s = document_ids.shape
    if sorted_ids is None:
        sorted_ids = bool((document_ids[:, 1:] >= document_ids[:, :-1]).all())
    if s % block_size == 0 and sorted_ids:
        return sorted_document_block_mask(document_ids, causal, block_size)
    # H=None broadcasts over heads.
    return create_block_mask(_mask_mod(document_ids, causal), b, None, s, s, device=document_ids.device,
                             BLOCK_SIZE=block_size)


@dataclasses.dataclass(frozen=True)
class DocumentLayout:
    """The documents of a [b, s] ids tensor, host-side facts the attention dispatches on."""

    single: bool  # every row holds one document: plain causal (or full) attention
    sorted: bool  # ids never decrease along a row: every document is one contiguous run
    cu_seqlens: torch.Tensor  # int32 [runs + 1], CPU: run starts in the flattened [b * s] stream, then b * s
    max_len: int  # the longest run


def document_layout(document_ids) -> DocumentLayout:
    """``DocumentLayout`` of ids on any device (a device tensor is copied to the host: one sync).
    Runs of equal ids are split at row ends, so rows never attend to each other."""
    ids = document_ids.detach().to("cpu")
    if ids.dim() != 2:
        raise ValueError(f"document ids must be [batch, sequence], got shape {tuple(ids.shape)}")
    b, s = ids.shape
    step = ids[:, 1:] != ids[:, :-1]
    starts = torch.ones(b, s, dtype=torch.bool)
    starts[:, 1:] = step
    first = starts.reshape(-1).nonzero().squeeze(1)
    cu = torch.cat([first, torch.tensor([b * s])]).to(torch.int32)
    PATHS["layout"] += 1
    return DocumentLayout(single=not bool(step.any()), sorted=bool((ids[:, 1:] >= ids[:, :-1]).all()),
                          cu_seqlens=cu, max_len=int((cu[1:] - cu[:-1]).max()))


class _Entry:
    """One micro-batch's cached facts. It keeps the ids alive, so no other tensor can take their
    address while it is cached."""

    def __init__(self, ids, layout: DocumentLayout):
        self.ids, self.layout = ids, layout
        self.cu_seqlens = to_device(layout.cu_seqlens, ids.device)
        self.block_masks = {}

    def block_mask(self, causal):
        if causal not in self.block_masks:
            self.block_masks[causal] = document_block_mask(self.ids, causal, sorted_ids=self.layout.sorted)
        return self.block_masks[causal]


_ENTRIES: "collections.OrderedDict" = collections.OrderedDict()
# Micro-batches whose entry may still be wanted (recomputation in backward); an evicted one is rebuilt,
# so the size bounds memory (a 32k-token row's mask is ~1 MB), never correctness.
_CACHE_SIZE = 16




def _store(key, entry: _Entry) -> _Entry:
    _ENTRIES[key] = entry
    while len(_ENTRIES) > _CACHE_SIZE:
        _ENTRIES.popitem(last=False)
    return entry


def _entry(document_ids) -> _Entry:
    """The cached entry of these ids (a view or ``detach()`` of the same ids, what activation
    recomputation passes, finds the same one); on a miss the layout is computed from the ids."""
    key = tensor_key(document_ids)
    hit = _ENTRIES.get(key)
    if hit is not None:
        _ENTRIES.move_to_end(key)
        return hit
    return _store(key, _Entry(document_ids, document_layout(document_ids)))


def register_document_layout(document_ids, host_ids) -> DocumentLayout:
    """Cache the layout of device ``document_ids`` computed from ``host_ids``, their CPU original (the
    loader's): the device never waits for it. Returns the layout."""
    if tuple(host_ids.shape) != tuple(document_ids.shape):
        raise ValueError(f"host ids {tuple(host_ids.shape)} and device ids {tuple(document_ids.shape)} differ in shape")
    key = tensor_key(document_ids)
    hit = _ENTRIES.get(key)
    if hit is not None:
        return hit.layout
    return _store(key, _Entry(document_ids, document_layout(host_ids))).layout


def cached_document_block_mask(document_ids, causal=True):
    """``document_block_mask`` memoized with the ids' entry (see ``_entry``)."""
    return _entry(document_ids).block_mask(bool(causal))


# ------------------------------------------------------------------ variable-length flash attention

def _flash_forward(*args, **kwargs):
    return torch.ops.aten._flash_attention_forward(*args, **kwargs)


def _flash_backward(*args, **kwargs):
    return torch.ops.aten._flash_attention_backward(*args, **kwargs)


def varlen_usable(q, k) -> bool:
    """Whether the flash kernel takes these inputs: CUDA sm80+, half precision, head dim a multiple of
    8 up to 256 (what SDPA's flash backend accepts)."""
    if not (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and k.dtype == q.dtype):
        return False
    d = q.shape[-1]
    return d % 8 == 0 and d <= 256 and _sm80_or_later(q.device)


@functools.cache
def _sm80_or_later(device) -> bool:
    # asked by every layer's attention call: the device properties lookup once per device, not per call
    return torch.cuda.get_device_capability(device)[0] >= 8


_VARLEN_CHECKED: dict = {}  # (device, dtype, head dim, q heads per kv head) -> the check passed


def _varlen_checked(q, k) -> bool:
    """The first varlen call for a (device, dtype, head dim, GQA ratio) runs the kernel on three small
    documents, forward and backward, against the reference; an error or a mismatch is logged and that
    case falls back to FlexAttention (correct, slower) instead of training on a wrong kernel. The
    inputs come from a private generator: the process's RNG streams are untouched."""
    key = (q.device, q.dtype, q.shape[-1], q.shape[1] // k.shape[1])
    if key not in _VARLEN_CHECKED:
        _VARLEN_CHECKED[key] = _check_varlen(*key)
    return _VARLEN_CHECKED[key]


def _check_varlen(device, dtype, d, ratio) -> bool:
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.tensor([[0] * 37 + [1] * 64 + [2] * 27], device=device)
    nq, s = 2 * ratio, ids.shape[1]

    def split(fused):  # q, k, v as strided views of one [1, s, heads, d] buffer, like a fused QKV output
        q, k, v = fused.split([nq, 2, 2], dim=2)
        return [t.transpose(1, 2) for t in (q, k, v)]  # [1, heads, s, d]

    try:
        with torch.inference_mode(False), torch.enable_grad():
            fused = torch.randn(1, s, nq + 4, d, generator=gen, device=device, dtype=dtype).requires_grad_(True)
            grad = torch.randn(1, nq, s, d, generator=gen, device=device, dtype=dtype)
            out = varlen_attention(*split(fused), _Entry(ids, document_layout(ids)), True, None)
            got = [out, torch.autograd.grad(out, fused, grad)[0]]
            ref_fused = fused.detach().float().requires_grad_(True)
            ref = attention_ref(*split(ref_fused), causal=True, document_ids=ids)
            want = [ref, torch.autograd.grad(ref, ref_fused, grad.float())[0]]
        errors = [float((a.float() - b).abs().max() / b.abs().max().clamp_min(1e-6)) for a, b in zip(got, want)]
    except Exception as exc:  # noqa: BLE001  (any failure of the kernel means: do not use it)
        log.warning("bluelm_kernels.attention: variable-length flash attention failed its check on %s %s (head dim %d, "
                    "GQA %d): %s; packed documents use FlexAttention", device, dtype, d, ratio, exc)
        return False
    if max(errors) > 0.05:
        log.warning("bluelm_kernels.attention: variable-length flash attention differs from the reference on %s %s "
                    "(head dim %d, GQA %d; relative errors of the output / the q, k, v gradients %s); packed documents "
                    "use FlexAttention",
                    device, dtype, d, ratio, [f"{e:.3g}" for e in errors])
        return False
    return True


class _VarlenAttention(torch.autograd.Function):
    """q [T, nq, d], k/v [T, nkv, d] (unit last stride), documents at ``cu_seqlens``; positional
    arguments only, the aten schema every torch since 2.3 shares."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_len, causal, scale):
        out, lse, rng, unused, _ = _flash_forward(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, 0.0, causal,
                                                  False, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, rng, unused)
        ctx.max_len, ctx.causal, ctx.scale = max_len, causal, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu, rng, unused = ctx.saved_tensors
        dq, dk, dv = _flash_backward(dout.contiguous(), q, k, v, out, lse, cu, cu, ctx.max_len, ctx.max_len, 0.0,
                                     ctx.causal, rng, unused, scale=ctx.scale)
        return dq, dk, dv, None, None, None, None


def _unit_last(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def varlen_attention(q, k, v, entry: _Entry, causal, scale):
    """[b, heads, s, d] in and out; the rows are folded into one token stream (a view when b == 1,
    the layout SDPACoreAttention passes from megatron's [s, b, heads, d])."""
    b, nq, s, d = q.shape
    fold = [_unit_last(t.transpose(1, 2).reshape(b * s, t.shape[1], d)) for t in (q, k, v)]
    out = _VarlenAttention.apply(*fold, entry.cu_seqlens, entry.layout.max_len, bool(causal), scale)
    return out.view(b, s, nq, d).transpose(1, 2)


def attention(q, k, v, *, causal=True, document_ids=None, scale=None, block_mask=None):
    """Scaled dot-product attention, [b, heads, s, d] layout; see the module docstring.

    block_mask: optional prebuilt `document_block_mask(document_ids, causal)`: forces the flex path
    (CUDA only; benchmarks compare it with the others)."""
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"nq={q.shape[1]} must be a multiple of nkv={k.shape[1]}")
    gqa = q.shape[1] != k.shape[1]
    if document_ids is None:
        PATHS["sdpa"] += 1
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)
    if q.is_cuda and block_mask is not None:
        PATHS["flex"] += 1
        return _compiled_flex()(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)
    entry = _entry(document_ids)
    if entry.layout.single:
        PATHS["sdpa"] += 1
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)
    if entry.layout.sorted and varlen_usable(q, k) and _varlen_checked(q, k):
        PATHS["varlen"] += 1
        return varlen_attention(q, k, v, entry, causal, scale)
    if q.is_cuda:
        PATHS["flex"] += 1
        return _compiled_flex()(q, k, v, block_mask=entry.block_mask(bool(causal)), scale=scale, enable_gqa=gqa)
    PATHS["dense"] += 1
    mask = document_mask(document_ids, causal)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
