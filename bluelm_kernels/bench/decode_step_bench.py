"""The generation engine's per-token decisions: bluelm_kernels.decode_step against the torch ops they replace
(their references), checked and timed on the device.

    python -m bluelm_kernels.bench.decode_step_bench                 # CUDA; --out writes JSON
    TRITON_INTERPRET=1 python -m bluelm_kernels.bench.decode_step_bench --smoke    # CPU: small shapes, checks only

Per row count: GPU time (one CUDA graph, replayed) of the masked greedy pick over a [rows, 100352]
bf16 logits matrix and of the row-state update, for the kernels and for the torch references, and
whether the kernels' outputs equal the references' (tokens and every state buffer exactly; the
log-probability to the largest difference printed).
"""
from __future__ import annotations

import argparse
import json
import types

import torch

from bluelm_kernels.bench import graph_ms
from bluelm_kernels.decode_step import greedy_pick, greedy_pick_ref, update_rows, update_rows_ref

VOCAB = 100352


def state(rows, dev, vocab=50, max_new=8):
    def ri(lo, hi, *shape):
        return torch.randint(lo, hi, shape or (rows,), device=dev)

    return types.SimpleNamespace(
        token=ri(0, vocab), pos=ri(0, 50), gen=ri(0, max_new + 1), limit=ri(1, max_new + 1), limit_reason=ri(2, 4),
        active=ri(0, 4) > 0, finish=ri(0, 2), bstate=ri(0, 3), bcount=ri(0, 8), grace=ri(0, 3), budget=ri(-1, 8),
        force_idx=ri(-1, 4), utf8_pending=ri(0, 3), out_token=ri(0, vocab, rows, max_new),
        out_logp=torch.randn(rows, max_new, device=dev), out_forced=ri(0, 2, rows, max_new) > 0,
        close_ids=ri(0, vocab, 128), close_len=torch.tensor([3], device=dev),
        think_ids=torch.tensor([4, 5], device=dev), utf8=ri(-1, 4, vocab), sentence_end=ri(0, 3, vocab) == 0,
        stop_ids=torch.cat([torch.tensor([3, 7], device=dev), torch.full((14,), -1, device=dev)]))


def run(rows, dev, vocab, timed):
    logits = torch.randn(rows, vocab, device=dev).bfloat16()
    ban = torch.zeros(vocab, device=dev)
    ban[-min(352, vocab // 4):] = float("-inf")  # the padded vocabulary rows
    think = torch.tensor([4, 5], device=dev)
    bstate = torch.randint(0, 3, (rows,), device=dev)
    tok, lp = greedy_pick(logits, ban, think, bstate)
    tok_r, lp_r = greedy_pick_ref(logits, ban, think, bstate)
    st = state(rows, dev)
    ref = types.SimpleNamespace(**{k: v.clone() for k, v in vars(st).items()})
    t, p = torch.randint(0, 50, (rows,), device=dev), torch.randn(rows, device=dev)
    update_rows(st, t, p, rows)
    update_rows_ref(ref, t, p, rows)
    out = {"rows": rows, "greedy_tokens_equal": bool(torch.equal(tok, tok_r)),
           "greedy_logprob_max_diff": float((lp - lp_r).abs().max()),
           "update_equal": all(torch.equal(getattr(st, k), getattr(ref, k)) for k in vars(st))}
    if timed:
        out["greedy_ms"] = graph_ms(lambda: greedy_pick(logits, ban, think, bstate))
        out["greedy_torch_ms"] = graph_ms(lambda: greedy_pick_ref(logits, ban, think, bstate))
        out["update_ms"] = graph_ms(lambda: update_rows(st, t, p, rows))
        out["update_torch_ms"] = graph_ms(lambda: update_rows_ref(st, t, p, rows))
    print(json.dumps(out), flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="small shapes on CPU under the interpreter")
    ap.add_argument("--rows", default="1,32,256")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dev = torch.device("cpu" if a.smoke else "cuda")
    res = [run(int(r), dev, 3000 if a.smoke else VOCAB, not a.smoke) for r in a.rows.split(",")]
    if not a.smoke:
        print(f"\n{'rows':>5} {'greedy ms':>9} {'torch ms':>8} {'update ms':>9} {'torch ms':>8} {'equal':>6}")
        for r in res:
            ok = r["greedy_tokens_equal"] and r["update_equal"]
            print(f"{r['rows']:>5} {r['greedy_ms']:>9.4f} {r['greedy_torch_ms']:>8.4f} {r['update_ms']:>9.4f} "
                  f"{r['update_torch_ms']:>8.4f} {str(ok):>6}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
