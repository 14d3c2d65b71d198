"""Parameter counts and model FLOPs of the BlueLM decoder, from its config alone.

Model FLOPs per token of one training step (forward + backward = 3x forward), the convention of
Megatron-LM and torchtitan, so MFU figures are comparable with theirs:

    6 * P_matmul  +  12 * L * s * (heads * head_dim)

P_matmul counts every weight used in a matrix product (all linears of every layer and the output
layer; not the input embedding, which is a lookup, nor the norms). The second term is attention's
two s x s products (QK^T and PV) per layer, forward 2 * 2 * s * d_attn per token, counted in full
for a causal mask (as Megatron-LM does; causal kernels skip about half of it, so the "hardware"
FLOPs are lower). Recomputation is not counted (model FLOPs, not hardware FLOPs).

    python -m megatron_bluelm.models.counting bluelm-2.5-3b
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(frozen=True)
class DecoderShape:
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    vocab_size: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_model_config(cls, m, vocab_size: int | None = None) -> "DecoderShape":
        return cls(m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads,
                   m.num_query_groups, vocab_size or m.vocab_size)


def layer_matmul_params(d: DecoderShape) -> int:
    h, q = d.hidden_size, d.num_attention_heads * d.head_dim
    kv = 2 * d.num_query_groups * d.head_dim
    return h * (q + kv) + q * h + 3 * h * d.ffn_hidden_size  # QKV, output proj, SwiGLU (gate, up, down)


def param_counts(d: DecoderShape) -> dict[str, int]:
    per_layer = layer_matmul_params(d) + 2 * d.hidden_size  # + two RMSNorm weights
    counts = {
        "embedding": d.vocab_size * d.hidden_size,
        "layers": d.num_layers * per_layer,
        "final_norm": d.hidden_size,
        "output_layer": d.vocab_size * d.hidden_size,  # untied
    }
    counts["total"] = sum(counts.values())
    counts["non_embedding"] = counts["layers"] + counts["final_norm"]
    return counts


def train_flops_per_token(d: DecoderShape, seq_length: int) -> float:
    matmul = d.num_layers * layer_matmul_params(d) + d.vocab_size * d.hidden_size
    attention = 12 * d.num_layers * seq_length * d.num_attention_heads * d.head_dim
    return 6.0 * matmul + attention


def report(d: DecoderShape, seq_length: int) -> str:
    c = param_counts(d)
    lines = [f"{k:>14}: {v:>15,d}  ({v / 1e9:.3f} B)" for k, v in c.items()]
    lines.append(f"{'train FLOPs/tok':>14}: {train_flops_per_token(d, seq_length):,.0f} (seq {seq_length})")
    return "\n".join(lines)


def main(argv=None) -> None:
    from megatron_bluelm.config.presets import PRESETS

    ap = argparse.ArgumentParser(description="Parameter count and FLOPs of a decoder preset")
    ap.add_argument("preset", choices=sorted(PRESETS))
    ap.add_argument("--vocab-size", type=int, default=None,
                    help="needed for presets whose vocab comes from the tokenizer")
    ap.add_argument("--seq-length", type=int, default=4096)
    args = ap.parse_args(argv)
    p = PRESETS[args.preset]
    vocab = args.vocab_size or p["vocab_size"]
    if vocab is None:
        ap.error(f"preset {args.preset} takes its vocabulary from the tokenizer: pass --vocab-size")
    d = DecoderShape(p["num_layers"], p["hidden_size"], p["ffn_hidden_size"], p["num_attention_heads"],
                     p["num_query_groups"], vocab)
    print(f"{args.preset}:\n{report(d, args.seq_length)}")


if __name__ == "__main__":
    main()
