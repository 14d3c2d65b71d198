"""The generation engine's per-token decisions in three launches instead of ~70 small ones.

A decode step ends with the choice of each row's next token and the update of the row's state
(forced budget close, thinking-budget state machine, UTF-8 guard, stop ids, limits, the output
record). Written as torch ops that is ~70 kernels of a few microseconds each on [rows]-sized
tensors: at batch 1 more time than the attention of all layers. Here:

* ``greedy_pick``: per row, the masked argmax of the logits and the log-softmax at it, in one pass
  over the vocabulary (online max / sum-exp, the vocabulary split over programs and combined by a
  second small kernel), reading the logits in their own dtype (the matmul's bf16 output: no fp32
  copy). Masks: the call's ban vector, ``<think>`` once thinking has started, ``</think>`` after the
  close.
* ``update_rows``: the state machine, one program per block of rows.

The torch references (``*_ref``) are the definition; ``megatron_bluelm.inference.decode_state``
documents the semantics. Rows are the first ``rows`` slots; every buffer is updated in place (the
engine's CUDA graphs hold their addresses).
"""
from __future__ import annotations

import torch

from ._triton import tl, triton
from .dispatch import use_triton

BEFORE, THINKING, CLOSED = 0, 1, 2
FINISH_STOP = 1


# -- token choice ------------------------------------------------------------------------------------
def masked_logits_ref(logits: torch.Tensor, ban: torch.Tensor, think_ids: torch.Tensor,
                      bstate: torch.Tensor) -> torch.Tensor:
    """fp32 logits + ban, with <think> masked once a row thinks and </think> once it has closed."""
    lg = logits.float() + ban
    banned = torch.stack((bstate >= THINKING, bstate == CLOSED), dim=1)
    lg[:, think_ids] = torch.where(banned, float("-inf"), lg[:, think_ids])
    return lg


def greedy_pick_ref(logits, ban, think_ids, bstate):
    lg = masked_logits_ref(logits, ban, think_ids, bstate)
    best = lg.argmax(-1)
    return best, lg.log_softmax(-1).gather(1, best[:, None]).squeeze(1)


@triton.jit
def _greedy_part_kernel(Logits, Ban, Think, Bstate, PM, PI, PS, V, stride, chunk, nsplit, BLOCK: tl.constexpr):
    # Program (row, split) covers logits [split * chunk, +chunk) of its row with per-lane running
    # max / index / sum-exp (a plain stream of loads), reduced across lanes once at the end.
    r = tl.program_id(0)
    sp = tl.program_id(1)
    state = tl.load(Bstate + r)
    think = tl.load(Think)
    end_think = tl.load(Think + 1)
    offs = tl.arange(0, BLOCK)
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    idx = tl.zeros([BLOCK], tl.int32)
    lo = sp * chunk
    hi = tl.minimum(lo + chunk, V)
    for v0 in range(lo, hi, BLOCK):
        v = v0 + offs
        ok = v < hi
        z = tl.load(Logits + r * stride + v, mask=ok, other=float("-inf")).to(tl.float32)
        z = z + tl.load(Ban + v, mask=ok, other=0.0)
        z = tl.where((v == think) & (state >= 1), float("-inf"), z)
        z = tl.where((v == end_think) & (state == 2), float("-inf"), z)
        better = z > m  # strict: a lane keeps its first maximum
        new_m = tl.maximum(m, z)
        live = new_m > float("-inf")  # nothing seen yet but -inf: no inf - inf
        s = tl.where(live, s * tl.exp(m - new_m) + tl.exp(z - new_m), 0.0)
        idx = tl.where(better, v, idx)
        m = new_m
    top = tl.max(m, 0)
    best = tl.min(tl.where(m == top, idx, V), 0)  # the first index of the maximum, as torch.argmax
    total = tl.sum(tl.where(m > float("-inf"), s * tl.exp(m - top), 0.0), 0)
    tl.store(PM + r * nsplit + sp, top)
    tl.store(PI + r * nsplit + sp, best)
    tl.store(PS + r * nsplit + sp, total)


@triton.jit
def _greedy_combine_kernel(PM, PI, PS, Tok, Lp, V, nsplit, BLOCK_S: tl.constexpr):
    r = tl.program_id(0)
    offs = tl.arange(0, BLOCK_S)
    ok = offs < nsplit
    m = tl.load(PM + r * nsplit + offs, mask=ok, other=float("-inf"))
    i = tl.load(PI + r * nsplit + offs, mask=ok, other=0)
    s = tl.load(PS + r * nsplit + offs, mask=ok, other=0.0)
    top = tl.max(m, 0)
    best = tl.min(tl.where(m == top, i, V), 0)  # splits are in vocabulary order: the first maximum
    total = tl.sum(tl.where(m > float("-inf"), s * tl.exp(m - top), 0.0), 0)
    tl.store(Tok + r, best.to(tl.int64))
    tl.store(Lp + r, -tl.log(total))


def greedy_pick(logits: torch.Tensor, ban: torch.Tensor, think_ids: torch.Tensor, bstate: torch.Tensor,
                chunk: int = 8192):
    """logits [rows, V] (any float dtype) -> (token [rows] int64, log-softmax at it [rows] fp32). The
    vocabulary is split in ``chunk``-wide pieces over programs (a single row still fills the GPU),
    then one small kernel per row combines the pieces."""
    if not use_triton(logits):
        return greedy_pick_ref(logits, ban, think_ids, bstate)
    rows, vocab = logits.shape
    assert logits.stride(1) == 1
    nsplit = triton.cdiv(vocab, chunk)
    dev = logits.device
    pm = torch.empty(rows, nsplit, dtype=torch.float32, device=dev)
    pi = torch.empty(rows, nsplit, dtype=torch.int32, device=dev)
    ps = torch.empty(rows, nsplit, dtype=torch.float32, device=dev)
    tok = torch.empty(rows, dtype=torch.long, device=dev)
    lp = torch.empty(rows, dtype=torch.float32, device=dev)
    _greedy_part_kernel[(rows, nsplit)](logits, ban, think_ids, bstate, pm, pi, ps, vocab, logits.stride(0),
                                        chunk, nsplit, BLOCK=1024, num_warps=4)
    _greedy_combine_kernel[(rows,)](pm, pi, ps, tok, lp, vocab, nsplit,
                                    BLOCK_S=max(2, triton.next_power_of_2(nsplit)), num_warps=1)
    return tok, lp


# -- state update ------------------------------------------------------------------------------------
STATE_FIELDS = ("token", "pos", "gen", "limit", "limit_reason", "active", "finish", "bstate", "bcount", "grace",
                "budget", "force_idx", "utf8_pending", "out_token", "out_logp", "out_forced")
SHARED_FIELDS = ("close_ids", "close_len", "think_ids", "utf8", "sentence_end", "stop_ids")


def update_rows_ref(st, tok: torch.Tensor, lp: torch.Tensor, rows: int) -> None:
    """``st`` has the fields above ([slots] or [slots, max_new] per row; shared tables)."""
    sl = slice(0, rows)
    active, bstate = st.active[sl].clone(), st.bstate[sl]
    think, end_think = st.think_ids[0], st.think_ids[1]
    # forced close
    fidx = st.force_idx[sl]
    forcing = fidx >= 0
    tok = torch.where(forcing, st.close_ids[fidx.clamp(min=0)], tok)
    lp = torch.where(forcing, torch.zeros_like(lp), lp)
    fidx = torch.where(forcing, fidx + 1, fidx)
    fidx = torch.where(fidx >= st.close_len, torch.full_like(fidx, -1), fidx)
    # thinking-budget state
    thinking = bstate == THINKING
    counted = thinking & ~forcing & (tok != end_think) & active
    bcount = st.bcount[sl] + counted.long()
    new_state = torch.where((bstate == BEFORE) & (tok == think), THINKING, bstate)
    new_state = torch.where(thinking & (tok == end_think), CLOSED, new_state)
    role = st.utf8[tok]
    pending = st.utf8_pending[sl]
    pending = torch.where(role > 0, role, torch.where(role < 0, (pending - 1).clamp(min=0), torch.zeros_like(pending)))
    budget = st.budget[sl]
    reached = (new_state == THINKING) & (budget >= 0) & (bcount >= budget) & (fidx < 0) & ~forcing
    graceful = (st.grace[sl] == 0) | st.sentence_end[tok] | (bcount >= budget + st.grace[sl])
    start_force = reached & (pending == 0) & graceful & active
    fidx = torch.where(start_force, torch.zeros_like(fidx), fidx)
    # record
    gen = st.gen[sl]
    max_new = st.out_token.shape[1]
    col = gen.clamp(max=max_new - 1)[:, None]
    st.out_token[sl].scatter_(1, col, torch.where(active, tok, st.out_token[sl].gather(1, col).squeeze(1))[:, None])
    st.out_logp[sl].scatter_(1, col, torch.where(active, lp, st.out_logp[sl].gather(1, col).squeeze(1))[:, None])
    kept = st.out_forced[sl].gather(1, col) & ~active[:, None]
    st.out_forced[sl].scatter_(1, col, (forcing & active)[:, None] | kept)
    gen = gen + active.long()
    stop = (tok[:, None] == st.stop_ids[None, :]).any(-1) & ~forcing
    limit = gen >= st.limit[sl]
    finish = st.finish[sl]
    finish = torch.where(active & limit, st.limit_reason[sl], finish)
    finish = torch.where(active & stop, FINISH_STOP, finish)
    still = active & ~stop & ~limit
    # write back (inactive rows keep their state)
    st.token[sl].copy_(torch.where(active, tok, st.token[sl]))
    st.pos[sl].add_(still.long())
    st.gen[sl].copy_(gen)
    st.finish[sl].copy_(finish)
    st.active[sl].copy_(still)
    st.bstate[sl].copy_(torch.where(active, new_state, bstate))
    st.bcount[sl].copy_(torch.where(active, bcount, st.bcount[sl]))
    st.force_idx[sl].copy_(torch.where(active, fidx, st.force_idx[sl]))
    st.utf8_pending[sl].copy_(torch.where(active, pending, st.utf8_pending[sl]))


@triton.jit
def _update_kernel(TokIn, LpIn, Token, Pos, Gen, Limit, LimitReason, Active, Finish, Bstate, Bcount, Grace,
                   Budget, ForceIdx, Pending, OutTok, OutLp, OutForced, CloseIds, CloseLen, Think, Utf8,
                   SentenceEnd, StopIds, rows, max_new,
                   N_STOP: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = r < rows
    active = tl.load(Active + r, mask=ok, other=0) != 0
    bstate = tl.load(Bstate + r, mask=ok, other=0)
    think = tl.load(Think)
    end_think = tl.load(Think + 1)
    tok = tl.load(TokIn + r, mask=ok, other=0)
    lp = tl.load(LpIn + r, mask=ok, other=0.0)
    # forced close
    fidx = tl.load(ForceIdx + r, mask=ok, other=-1)
    forcing = fidx >= 0
    forced_tok = tl.load(CloseIds + tl.maximum(fidx, 0), mask=ok, other=0)
    tok = tl.where(forcing, forced_tok, tok)
    lp = tl.where(forcing, 0.0, lp)
    fidx = tl.where(forcing, fidx + 1, fidx)
    fidx = tl.where(fidx >= tl.load(CloseLen), -1, fidx)
    # thinking-budget state
    thinking = bstate == 1
    counted = thinking & (~forcing) & (tok != end_think) & active
    bcount = tl.load(Bcount + r, mask=ok, other=0) + counted.to(tl.int64)
    new_state = tl.where((bstate == 0) & (tok == think), 1, bstate)
    new_state = tl.where(thinking & (tok == end_think), 2, new_state)
    role = tl.load(Utf8 + tok, mask=ok, other=0)
    pending = tl.load(Pending + r, mask=ok, other=0)
    pending = tl.where(role > 0, role, tl.where(role < 0, tl.maximum(pending - 1, 0), 0))
    budget = tl.load(Budget + r, mask=ok, other=-1)
    grace = tl.load(Grace + r, mask=ok, other=0)
    reached = (new_state == 1) & (budget >= 0) & (bcount >= budget) & (fidx < 0) & (~forcing)
    sent_end = tl.load(SentenceEnd + tok, mask=ok, other=0) != 0
    graceful = (grace == 0) | sent_end | (bcount >= budget + grace)
    start_force = reached & (pending == 0) & graceful & active
    fidx = tl.where(start_force, 0, fidx)
    # record
    gen = tl.load(Gen + r, mask=ok, other=0)
    col = tl.minimum(gen, max_new - 1)
    at = r.to(tl.int64) * max_new + col
    tl.store(OutTok + at, tok, mask=ok & active)
    tl.store(OutLp + at, lp, mask=ok & active)
    tl.store(OutForced + at, (forcing & active).to(tl.int1), mask=ok & active)
    gen = gen + active.to(tl.int64)
    stop = tl.zeros([BLOCK], tl.int1)
    for i in tl.static_range(N_STOP):
        stop = stop | (tok == tl.load(StopIds + i))
    stop = stop & (~forcing)
    limit = gen >= tl.load(Limit + r, mask=ok, other=0)
    finish = tl.load(Finish + r, mask=ok, other=0)
    finish = tl.where(active & limit, tl.load(LimitReason + r, mask=ok, other=0), finish)
    finish = tl.where(active & stop, 1, finish)
    still = active & (~stop) & (~limit)
    wr = ok & active  # inactive rows keep every field
    tl.store(Token + r, tok, mask=wr)
    tl.store(Pos + r, tl.load(Pos + r, mask=ok, other=0) + still.to(tl.int64), mask=wr)
    tl.store(Gen + r, gen, mask=wr)
    tl.store(Finish + r, finish, mask=wr)
    tl.store(Active + r, still.to(tl.int1), mask=wr)
    tl.store(Bstate + r, new_state, mask=wr)
    tl.store(Bcount + r, bcount, mask=wr)
    tl.store(ForceIdx + r, fidx, mask=wr)
    tl.store(Pending + r, pending, mask=wr)


def update_rows(st, tok: torch.Tensor, lp: torch.Tensor, rows: int) -> None:
    """Apply the chosen tokens ``tok`` / log-probs ``lp`` [rows] to the first ``rows`` slots of ``st``."""
    if not use_triton(tok):
        return update_rows_ref(st, tok, lp, rows)
    block = 128
    for name in STATE_FIELDS + SHARED_FIELDS:
        assert getattr(st, name).is_contiguous(), name
    _update_kernel[(triton.cdiv(rows, block),)](
        tok, lp, *(getattr(st, n) for n in STATE_FIELDS), *(getattr(st, n) for n in SHARED_FIELDS),
        rows, st.out_token.shape[1], N_STOP=st.stop_ids.shape[0], BLOCK=block, num_warps=4)
