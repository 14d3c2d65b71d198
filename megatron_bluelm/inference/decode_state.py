"""Per-slot generation state on the device: sampling, the thinking budget, stop detection.

Everything a decode step decides per token is a tensor operation on these buffers, so the step runs
without the host (and can be captured in a CUDA graph); the host reads ``active`` every few steps.

Sampling. Each sample draws one uniform number per step from a counter-based hash of (its key,
its step): the same sample gets the same tokens whatever its slot, batch-mates or refill order,
and on every rank of a model replica. The token is the inverse CDF of the sampling distribution at
that number: temperature, then top-k / top-p in sorted order when any row asks for them. The
returned log-probability is that of the token under exactly this distribution (greedy rows: the
raw logits' log-softmax, since a point mass has none).

Thinking budget (one state machine per row: before / thinking / closed). It counts the tokens the
row *samples* while thinking — prompt tokens and forced tokens never count, so budget B means B
sampled thinking tokens and a non-thinking prompt reports 0. When the count reaches the budget the
next tokens are forced from the close sequence (``\\n</think>\\n`` + bridge: ``budget_close_ids``,
the text SFT teaches), after an optional grace window that waits for a sentence end, and never
between the bytes of one UTF-8 character (byte-fallback tokens). After the close, ``<think>`` and
``</think>`` are masked; while thinking, ``<think>`` is.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from bluelm_kernels.decode_step import (  # noqa: F401  (the states and FINISH_STOP: one definition)
    BEFORE,
    CLOSED,
    FINISH_STOP,
    THINKING,
    greedy_pick,
    masked_logits_ref,
    update_rows,
)

FINISH_RUNNING, FINISH_LENGTH, FINISH_CONTEXT = 0, 2, 3
MAX_STOP_IDS = 16
MAX_CLOSE_IDS = 128
_M32 = 0xFFFFFFFF


def uniform_from_key(key: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Counter-based uniform numbers in (0, 1): a 32-bit integer hash of (key, step), int64 math
    with every product < 2^63 (no overflow on any device)."""
    x = (key ^ ((step * 0x2C1B3C6D) & _M32)) & _M32
    for _ in range(3):
        x = x ^ (x >> 16)
        x = (x * 0x45D9F3B) & _M32
    x = x ^ (x >> 16)
    return ((x >> 8).to(torch.float32) + 0.5) / float(1 << 24)


def sample_key(seed: int, sample: int) -> int:
    """The per-sample RNG key: sample ``sample`` of a call seeded ``seed``."""
    x = (seed * 0x9E3779B1 + sample * 0x85EBCA77 + 0x165667B1) & _M32
    x ^= x >> 15
    x = (x * 0x2C1B3C6D) & _M32
    return x ^ (x >> 12)


@dataclass
class TokenTables:
    """Per-vocabulary facts the budget needs: UTF-8 byte role of byte-fallback tokens (n >= 1: a lead
    byte expecting n continuation bytes; -1: a continuation byte; 0: not a byte token) and
    whether a token ends a sentence (where a grace window may close the think block)."""
    utf8: torch.Tensor  # [V] int64
    sentence_end: torch.Tensor  # [V] bool

    @classmethod
    def empty(cls, vocab: int) -> "TokenTables":
        return cls(torch.zeros(vocab, dtype=torch.long), torch.zeros(vocab, dtype=torch.bool))

    @classmethod
    def from_tokenizer(cls, tok, vocab: int) -> "TokenTables":
        utf8 = torch.zeros(vocab, dtype=torch.long)
        end = torch.zeros(vocab, dtype=torch.bool)
        for i in range(min(vocab, tok.vocab_size)):
            piece = tok.id_to_token(i)
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                byte = int(piece[3:5], 16)
                if 0x80 <= byte < 0xC0:
                    utf8[i] = -1
                elif byte >= 0xC0:
                    utf8[i] = 1 if byte < 0xE0 else 2 if byte < 0xF0 else 3
                end[i] = byte == 0x0A
                continue
            text = piece.replace("\u2581", " ").rstrip(" ")
            end[i] = "\n" in piece or text.endswith((".", "!", "?", "\u3002", "\uff01", "\uff1f"))
        return cls(utf8, end)


class DecodeState:
    """The per-slot buffers (fixed size: the CUDA graphs capture their addresses)."""

    def __init__(self, slots: int, max_new: int, vocab: int, device: torch.device):
        def z(*shape, dtype=torch.long):
            return torch.zeros(*shape, dtype=dtype, device=device)

        self.slots, self.max_new, self.vocab, self.device = slots, max_new, vocab, device
        self.token, self.pos, self.gen, self.limit = z(slots), z(slots), z(slots), z(slots)
        self.limit_reason = z(slots)  # FINISH_LENGTH or FINISH_CONTEXT when gen reaches limit
        self.active = z(slots, dtype=torch.bool)
        self.finish = z(slots)
        self.key = z(slots)
        self.temperature = z(slots, dtype=torch.float32)
        self.top_p = torch.ones(slots, device=device)
        self.top_k = z(slots)
        self.bstate, self.bcount, self.grace = z(slots), z(slots), z(slots)
        self.budget = torch.full((slots,), -1, dtype=torch.long, device=device)
        self.force_idx = torch.full((slots,), -1, dtype=torch.long, device=device)
        self.utf8_pending = z(slots)
        self.out_token = z(slots, max_new)
        self.out_logp = z(slots, max_new, dtype=torch.float32)
        self.out_forced = z(slots, max_new, dtype=torch.bool)
        # shared by all rows of a call
        self.ban = z(vocab, dtype=torch.float32)  # 0 or -inf per token (padding rows, <image>)
        self.stop_ids = torch.full((MAX_STOP_IDS,), -1, dtype=torch.long, device=device)
        self.close_ids = z(MAX_CLOSE_IDS)
        self.close_len = z(1)
        self.think_ids = z(2)  # <think>, </think>
        self.utf8 = z(vocab)
        self.sentence_end = z(vocab, dtype=torch.bool)

    PER_ROW = ("token", "pos", "gen", "limit", "limit_reason", "active", "finish", "key", "temperature", "top_p",
               "top_k", "bstate", "bcount", "grace", "budget", "force_idx", "utf8_pending", "out_token",
               "out_logp", "out_forced")

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        for name in self.PER_ROW:
            t = getattr(self, name)
            t[dst] = t[src]


def _filtered_sample(z: torch.Tensor, u: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor):
    """Sorted-order top-k / top-p: returns (token, log-prob under the filtered distribution)."""
    sz, order = torch.sort(z, dim=-1, descending=True)
    rank = torch.arange(z.shape[-1], device=z.device)[None, :]
    keep = (top_k[:, None] <= 0) | (rank < top_k[:, None])
    sz = sz.masked_fill(~keep, float("-inf"))
    probs = sz.softmax(-1)
    keep = (probs.cumsum(-1) - probs) < top_p[:, None]  # drop a token once the ones before it reach p
    keep[:, 0] = True
    logp = sz.masked_fill(~keep, float("-inf")).log_softmax(-1)
    cdf = logp.exp().cumsum(-1)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp_(max=z.shape[-1] - 1)
    return order.gather(1, idx).squeeze(1), logp.gather(1, idx).squeeze(1)


def advance(st: DecodeState, logits: torch.Tensor, rows: int, mode: str) -> None:
    """Choose each of the first ``rows`` slots' next token from its logits [rows, V] (any float dtype)
    and update every per-row buffer in place (``bluelm_kernels.decode_step``: three launches on CUDA). ``mode``:
    "greedy" (no row samples), "sample", or "filtered" (some row uses top-k / top-p)."""
    if isinstance(mode, bool):  # filtered or not, sampling
        mode = "filtered" if mode else "sample"
    sl = slice(0, rows)
    bstate = st.bstate[sl]
    if mode == "greedy":
        tok, lp = greedy_pick(logits, st.ban, st.think_ids, bstate)
    else:
        lg = masked_logits_ref(logits, st.ban, st.think_ids, bstate)
        best = lg.argmax(-1)
        temp = st.temperature[sl]
        greedy = temp <= 0
        z = lg / torch.where(greedy, 1.0, temp)[:, None]
        logp_all = z.log_softmax(-1)
        u = uniform_from_key(st.key[sl], st.gen[sl])
        if mode == "filtered":
            sampled, sampled_lp = _filtered_sample(z, u, st.top_k[sl], st.top_p[sl])
        else:
            cdf = logp_all.exp().cumsum(-1)
            sampled = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp_(max=z.shape[-1] - 1).squeeze(1)
            sampled_lp = logp_all.gather(1, sampled[:, None]).squeeze(1)
        tok = torch.where(greedy, best, sampled)
        lp = torch.where(greedy, logp_all.gather(1, best[:, None]).squeeze(1), sampled_lp)
    update_rows(st, tok.contiguous(), lp.contiguous(), rows)
