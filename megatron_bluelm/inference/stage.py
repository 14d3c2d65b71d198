"""The decoder forward for generation, over the training model's own parameter tensors.

The generation engine does not run megatron-core's module forward (a Python call per module per
token, a [b, 1, q, k] mask per step, its own KV-cache bookkeeping: what made decode host-bound).
Instead it reads the parameters of this rank's pipeline stage — the *same* tensors the optimizer
updates, no copy, no weight sync — and runs the layer math directly:

    x = embed(token)                                   (vocab-parallel: masked lookup + TP all-reduce)
    per layer: h = rmsnorm(x); q, k, v = split(h @ Wqkv^T)   (megatron's per-query-group layout)
               rope(q, k) at each row's own position; k, v -> the KV cache
               x = x + allreduce(attention(q, cache) @ Wproj^T)
               x = x + allreduce(swiglu(rmsnorm(x) @ Wfc1^T) @ Wfc2^T)
    logits = allgather(rmsnorm(x) @ Wout^T)            (last stage only)

The math is megatron-core's (same split of the fused QKV weight, the same rotate-half RoPE with
fp32 angles cast to the activation dtype, RMSNorm statistics in fp32, SwiGLU on fc1's [gate, up]),
which the tests check token for token against the model's own forward. Every shape is static in
the batch, so a decode step can be captured in a CUDA graph.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from bluelm_kernels.attention import attention as document_attention
from bluelm_kernels.attention import register_document_layout
from bluelm_kernels.dispatch import use_triton
from megatron_bluelm.inference.attention import (
    continued_prefill_attention,
    prefill_attention,
    rope_cache_attention,
)
from megatron_bluelm.inference.errors import GenerationError


@dataclass
class LayerWeights:
    norm1: torch.Tensor
    qkv: torch.Tensor
    proj: torch.Tensor
    norm2: torch.Tensor
    fc1: torch.Tensor
    fc2: torch.Tensor


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module") and not hasattr(model, "decoder") and not hasattr(model, "language_model"):
        model = model.module  # DDP / Float16Module wrappers
    return model


def _param(module, name: str, where: str) -> torch.Tensor:
    p = getattr(module, name, None)
    if p is None:
        raise GenerationError(f"generation engine: {where} has no '{name}' (a layer spec this engine does not know)")
    return p


class StageWeights:
    """Views of one pipeline stage's decoder parameters (not copies), plus the shapes the math needs."""

    def __init__(self, model: torch.nn.Module, tp_group=None):
        model = _unwrap(model)
        self.vlm = model if hasattr(model, "language_model") else None
        lm = getattr(model, "language_model", model)
        cfg = lm.config
        self.tp_group = tp_group
        self.tp = 1 if tp_group is None else dist.get_world_size(tp_group)
        self.heads = cfg.num_attention_heads // self.tp
        self.groups = (cfg.num_query_groups or cfg.num_attention_heads) // self.tp
        self.head_dim = cfg.kv_channels
        self.hidden = cfg.hidden_size
        self.eps = cfg.layernorm_epsilon
        self.pre_process = getattr(lm, "pre_process", True)
        self.post_process = getattr(lm, "post_process", True)
        self.layers = []
        for i, layer in enumerate(lm.decoder.layers):
            where = f"decoder layer {i}"
            att, mlp = layer.self_attention, layer.mlp
            self.layers.append(LayerWeights(
                _param(layer.input_layernorm, "weight", where), _param(att.linear_qkv, "weight", where),
                _param(att.linear_proj, "weight", where), _param(layer.pre_mlp_layernorm, "weight", where),
                _param(mlp.linear_fc1, "weight", where), _param(mlp.linear_fc2, "weight", where)))
        self.embedding = self.vocab_start = None
        if self.pre_process:
            emb = lm.embedding.word_embeddings
            self.embedding = emb.weight
            self.vocab_start = int(getattr(emb, "vocab_start_index", 0))
        self.final_norm = self.output = None
        if self.post_process:
            self.final_norm = _param(lm.decoder.final_layernorm, "weight", "the final norm")
            self.output = _param(lm.output_layer, "weight", "the output layer")
        rope = getattr(lm, "rotary_pos_emb", None)
        if rope is None:  # GPTModel builds RoPE on every pipeline stage; without it there are no positions
            raise GenerationError("generation engine: the model has no rotary_pos_emb (RoPE) module")
        self.inv_freq = rope.inv_freq
        ref = self.layers[0].qkv if self.layers else (self.embedding if self.embedding is not None else self.output)
        self.dtype, self.device = ref.dtype, ref.device

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    # -- pieces -------------------------------------------------------------------------------------
    def _all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp > 1:
            dist.all_reduce(x, group=self.tp_group)
        return x

    def _norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if use_triton(x):
            from bluelm_kernels.rmsnorm import rmsnorm

            return rmsnorm(x, w, self.eps)
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return (y * w.float()).to(x.dtype)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids (any shape) -> embeddings [..., hidden]; vocab-parallel under TP."""
        if self.tp == 1:
            return F.embedding(tokens, self.embedding)
        local = tokens - self.vocab_start
        outside = (local < 0) | (local >= self.embedding.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.embedding)
        out = out.masked_fill(outside[..., None], 0.0)
        return self._all_reduce(out)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Hidden [n, hidden] -> logits over the (padded) vocabulary [n, V] in the activation dtype
        (``decode_state.advance`` reads them as fp32: no fp32 copy of [n, V] in memory)."""
        local = self._norm(x, self.final_norm) @ self.output.t()
        if self.tp > 1:
            parts = [torch.empty_like(local) for _ in range(self.tp)]
            dist.all_gather(parts, local.contiguous(), group=self.tp_group)
            local = torch.cat(parts, dim=-1)
        return local

    def rope_tables(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [length, head_dim] in the activation dtype (megatron: fp32 angles, cast)."""
        pos = torch.arange(length, device=self.device, dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq.to(self.device, torch.float32))
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def _split_qkv(self, h: torch.Tensor, w: torch.Tensor):
        """h [..., hidden] -> q [..., heads, d], k, v [..., groups, d] (megatron's grouped layout)."""
        per_group = self.heads // self.groups
        qkv = (h @ w.t()).view(*h.shape[:-1], self.groups, per_group + 2, self.head_dim)
        q = qkv[..., :per_group, :].reshape(*h.shape[:-1], self.heads, self.head_dim)
        return q, qkv[..., per_group, :], qkv[..., per_group + 1, :]

    def _mlp(self, x: torch.Tensor, lw: LayerWeights) -> torch.Tensor:
        f = self._norm(x, lw.norm2) @ lw.fc1.t()
        if use_triton(f):
            from bluelm_kernels.swiglu import swiglu

            a = swiglu(f)
        else:
            gate, up = f.chunk(2, dim=-1)
            a = F.silu(gate) * up
        return x + self._all_reduce(a @ lw.fc2.t())

    # -- steps --------------------------------------------------------------------------------------
    def decode(self, x: torch.Tensor, pos: torch.Tensor, cache, cos: torch.Tensor, sin: torch.Tensor,
               rows: int) -> torch.Tensor:
        """One token per row for the first ``rows`` cache slots. x [rows, hidden] at positions
        ``pos`` [rows]; writes each row's k, v at its position and attends to positions 0..pos."""
        if use_triton(x):
            return self._decode_fused(x, pos, cache, cos, sin, rows)
        lengths = pos + 1
        for i, lw in enumerate(self.layers):
            kc, vc = cache.k[i], cache.v[i]
            o = rope_cache_attention(self._norm(x, lw.norm1) @ lw.qkv.t(), lengths, cos, sin, kc, vc, self.heads,
                                     self.groups, cache.splits(rows))
            x = x + self._all_reduce(o.reshape(rows, -1) @ lw.proj.t())
            x = self._mlp(x, lw)
        return x

    def _decode_fused(self, x, pos, cache, cos, sin, rows):
        """The same step in 8 launches per layer: Triton RMSNorm with the residual add fused in,
        RoPE + cache write + decode attention with its key-chunk merge in one kernel, SwiGLU; cuBLAS for
        the matmuls (a fused few-row GEMV measured slower than cuBLAS on the H200: docs/KERNELS.md).
        At a few rows, proj, fc1 and fc2 run split over K (``bluelm_kernels.split_k``): their fp32
        partials are summed by the RMSNorm / SwiGLU kernel that reads them. proj and fc2 are split only
        without TP (their all-reduce would carry every partial)."""
        from bluelm_kernels import split_k
        from bluelm_kernels.rmsnorm import rmsnorm, rmsnorm_partials
        from bluelm_kernels.swiglu import swiglu, swiglu_partials

        lengths, splits = pos + 1, cache.splits(rows)
        ffn = self.layers[0].fc2.shape[1] if self.layers else 0
        sp = {"proj": split_k.splits_for("proj", rows, self.heads * self.head_dim) if self.tp == 1 else 1,
              "fc1": split_k.splits_for("fc1", rows, self.hidden),
              "fc2": split_k.splits_for("fc2", rows, ffn) if self.tp == 1 else 1}

        def norm(y, w, residual):
            if y.dim() == 3:  # split-K partials
                return rmsnorm_partials(y, w, self.eps, residual=residual)
            return rmsnorm(y, w, self.eps, residual=residual)

        def product(a, w, name):  # a @ w.T, as fp32 split-K partials where it is split
            return split_k.partials(a, w, sp[name]) if sp[name] > 1 else a @ w.t()

        h = rmsnorm(x, self.layers[0].norm1, self.eps) if self.layers else x
        for i, lw in enumerate(self.layers):
            kc, vc = cache.k[i], cache.v[i]
            o = rope_cache_attention(h @ lw.qkv.t(), lengths, cos, sin, kc, vc, self.heads, self.groups,
                                     splits)
            # the all-reduces are no-ops where proj / fc2 are split (TP 1)
            h, x = norm(self._all_reduce(product(o.reshape(rows, -1), lw.proj, "proj")), lw.norm2, x)
            f = product(h, lw.fc1, "fc1")
            o = self._all_reduce(product(swiglu_partials(f, self.dtype) if f.dim() == 3 else swiglu(f), lw.fc2, "fc2"))
            if i + 1 < len(self.layers):
                h, x = norm(o, self.layers[i + 1].norm1, x)
            else:
                x = x + (o.sum(0).to(x.dtype) if o.dim() == 3 else o)
        return x

    def prefill(self, x: torch.Tensor, start: int, slots: list[list[int]], cache,
                cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rows of prompt positions start..start+P-1 (right-padded to P): write their k, v into every
        slot of ``slots[r]`` (a group's samples share the prefill) and return the hidden states
        [n, P, hidden]. The padded positions write keys past each row's length, which decode overwrites
        before it reads them. Rows with start > 0 attend to the positions their first slot already holds
        (chunked prefill)."""
        flat = torch.tensor([s for group in slots for s in group], device=x.device)
        src = torch.tensor([r for r, group in enumerate(slots) for _ in group], device=x.device)
        first = torch.tensor([group[0] for group in slots], device=x.device)
        return self.prefill_indexed(x, start, flat, src, first, cache, cos, sin)

    def prefill_indexed(self, x: torch.Tensor, start: int, flat: torch.Tensor, src: torch.Tensor,
                        first: torch.Tensor | None, cache, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``prefill`` with the slot layout as device tensors (what a CUDA graph captures): row
        ``src[j]`` is written into slot ``flat[j]``; ``first[r]`` is row r's slot to read when
        start > 0 (unused at start 0). Repeated (slot, row) pairs write the same values twice."""
        n, p = x.shape[0], x.shape[1]
        c, s = cos[start:start + p][:, None, :], sin[start:start + p][:, None, :]
        mask = None
        if start > 0:  # queries start+j see keys 0..start+j of their row
            qpos = torch.arange(start, start + p, device=x.device)
            mask = torch.arange(start + p, device=x.device)[None, :] <= qpos[:, None]
        for i, lw in enumerate(self.layers):
            q, k, v = self._split_qkv(self._norm(x, lw.norm1), lw.qkv)  # [n, P, heads|groups, d]
            q, k = _rotate(q, c, s), _rotate(k, c, s)
            kc, vc = cache.k[i], cache.v[i]
            kt, vt = k.transpose(1, 2), v.transpose(1, 2)  # [n, groups, P, d]
            kc[flat, :, start:start + p] = kt[src]
            vc[flat, :, start:start + p] = vt[src]
            if start > 0:
                kt, vt = kc[first, :, :start + p], vc[first, :, :start + p]
            o = prefill_attention(q.transpose(1, 2), kt, vt, mask)  # [n, heads, P, d]
            x = x + self._all_reduce(o.transpose(1, 2).reshape(n, p, -1) @ lw.proj.t())
            x = self._mlp(x, lw)
        return x

    def prefill_packed(self, x: torch.Tensor, row: "PackedRow", cache, cos: torch.Tensor,
                       sin: torch.Tensor) -> torch.Tensor:
        """Prompt pieces packed back to back in one row (``PackedRow``): x [T, hidden] -> the hidden
        states [T, hidden] (``row.last`` indexes each piece's last position). Positions restart per
        prompt; each piece's k, v go into every slot of its group at its own positions; a piece that
        starts its prompt attends causally within itself (bluelm_kernels.attention's document path, its
        layout registered once per row and shared by the layers: variable-length flash attention on
        CUDA, FlexAttention where that is not usable, the exact SDPA mask on CPU), the continued
        piece at the row's head attends to what its slot holds."""
        c, s = cos[row.pos][:, None, :], sin[row.pos][:, None, :]
        for i, lw in enumerate(self.layers):
            q, k, v = self._split_qkv(self._norm(x, lw.norm1), lw.qkv)  # [T, heads|groups, d]
            q, k = _rotate(q, c, s), _rotate(k, c, s)
            kc, vc = cache.k[i], cache.v[i]
            kc[row.write_slot, :, row.write_pos] = k[row.write_src]
            vc[row.write_slot, :, row.write_pos] = v[row.write_src]
            o = self._packed_attention(q, k, v, row, kc, vc)
            x = x + self._all_reduce(o.reshape(row.tokens, -1) @ lw.proj.t())
            x = self._mlp(x, lw)
        return x

    def _packed_attention(self, q, k, v, row: "PackedRow", kc, vc) -> torch.Tensor:
        """q [T, heads, d], k/v [T, groups, d] -> [T, heads, d]."""
        h, out = row.head, []
        if h:
            end = row.head_start + h
            o = continued_prefill_attention(q[None, :h].transpose(1, 2), kc[row.head_slot, :, :end][None],
                                            vc[row.head_slot, :, :end][None])
            out.append(o[0].transpose(0, 1))
        if row.doc is not None:
            fresh = row.tokens - h
            pad = row.doc.shape[1] - fresh  # the attention's length is bucketed (see attention_length)
            qt, kt, vt = (F.pad(t[h:], (0, 0, 0, 0, 0, pad)).transpose(0, 1)[None] for t in (q, k, v))
            o = document_attention(qt, kt, vt, causal=True, document_ids=row.doc)
            out.append(o[0].transpose(0, 1)[:fresh])
        return torch.cat(out) if len(out) > 1 else out[0]


def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """megatron-core's rotate-half RoPE: t * cos + rotate_half(t) * sin, cos/sin broadcast over heads."""
    t1, t2 = t.chunk(2, dim=-1)
    return t * cos + torch.cat((-t2, t1), dim=-1) * sin


# FlexAttention (the document path's CUDA fallback) compiles once per shape, so the part of a packed
# row that starts prompts is padded (for the attention only; the matmuls see the real tokens) to a
# few lengths: powers of two from this one, multiples of its 128-token blocks, at most the row
# capacity rounded up to a block. The padding is cut into documents of one block each, so its
# attention costs ~pad x 128 on every path, not pad^2.
_MIN_ATTENTION_LENGTH = 512
_PAD_DOCUMENT = 128


def attention_length(tokens: int, capacity: int) -> int:
    """The padded attention length of ``tokens`` fresh tokens in rows of ``capacity``."""
    bucket = max(_MIN_ATTENTION_LENGTH, 1 << max(0, tokens - 1).bit_length())
    return max(tokens, min(bucket, -(-capacity // 128) * 128))


@dataclass
class PackedRow:
    """One packed prefill call: prompt pieces back to back in a row of ``tokens`` tokens.

    The first piece may continue a prompt its slots already hold (``head`` tokens from position
    ``head_start``, reading the cache of ``head_slot``); every other piece starts a prompt at
    position 0 and has its own document id in ``doc`` ([1, S] int32, non-decreasing, S >= the
    fresh tokens; the padding in documents of ``_PAD_DOCUMENT`` tokens)."""
    tokens: int
    pos: torch.Tensor  # [T] each token's position in its prompt
    head: int
    head_start: int
    head_slot: int
    doc: torch.Tensor | None
    write_slot: torch.Tensor  # cache writes, one per (token, slot of its group): slot, position, row index
    write_pos: torch.Tensor
    write_src: torch.Tensor
    last: torch.Tensor  # [pieces] the row index of each piece's last token

    @classmethod
    def build(cls, pieces: list[tuple[int, int, list[int]]], device, capacity: int) -> "PackedRow":
        """pieces: (start position, tokens, slots) in row order; capacity: the engine's row size."""
        pos, wslot, wpos, wsrc, last, fresh = [], [], [], [], [], []
        off = 0
        for j, (start, n, slots) in enumerate(pieces):
            if start and j:
                raise ValueError("packed prefill: only the first piece of a row may continue a prompt")
            p = torch.arange(start, start + n)
            src = torch.arange(off, off + n)
            pos.append(p)
            for slot in slots:
                wslot.append(torch.full((n,), slot))
                wpos.append(p)
                wsrc.append(src)
            if not start:
                fresh.append(n)
            off += n
            last.append(off - 1)
        head_start, head, slots0 = pieces[0][0], pieces[0][1], pieces[0][2]
        if not head_start:
            head = 0
        doc = None
        if fresh:
            pad = attention_length(sum(fresh), capacity) - sum(fresh)
            ids = torch.cat([torch.repeat_interleave(torch.arange(len(fresh), dtype=torch.int32), torch.tensor(fresh)),
                             len(fresh) + torch.arange(pad, dtype=torch.int32) // _PAD_DOCUMENT])[None]
            doc = ids.to(device)
            register_document_layout(doc, ids)  # from the host copy: the device never syncs for it
        pos, wslot, wpos, wsrc = (torch.cat(t).to(device) for t in (pos, wslot, wpos, wsrc))
        return cls(off, pos, head, head_start, slots0[0], doc, wslot, wpos, wsrc, torch.tensor(last, device=device))
