"""Convert checkpoints between our megatron format (any TP x PP x DP layout) and Hugging Face.

    # megatron -> HF (newest complete checkpoint under SAVE, or one iter_XXXXXXX directory)
    python tools/convert_checkpoint.py mcore-to-hf --load outputs/run/ckpt --out outputs/hf [--dtype bfloat16]

    # HF -> megatron (model only, TP1; loads into any layout, e.g. with --checkpoint.load)
    python tools/convert_checkpoint.py hf-to-mcore --hf outputs/hf --out outputs/ckpt_from_hf

The HF side is a transformers directory: config.json, safetensors shards, generation_config.json, the
tokenizer (tokenizer.json + chat template) and our tokenizer.model (none when the run trained with a
Hugging Face tokenizer.json; an HF directory without tokenizer.model is imported with its tokenizer.json,
our special tokens added). hf-to-mcore refuses, by name, configs the decoder cannot compute (RoPE
scaling, a non-SiLU activation). The architecture follows the
checkpoint: ``LlamaForCausalLM`` for a text model, ``Lfm2VlForConditionalGeneration`` for the
multimodal one (ViT + adapter + decoder); ``--architecture`` states it explicitly and fails on a
checkpoint of the other kind. See docs/CHECKPOINTS.md and docs/MULTIMODAL.md.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_bluelm.config.errors import ConfigError  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="direction", required=True)
    to_hf = sub.add_parser("mcore-to-hf", help="megatron checkpoint -> HF directory")
    to_hf.add_argument("--load", required=True, help="save dir (uses 'latest') or one iter_XXXXXXX dir")
    to_hf.add_argument("--out", required=True)
    to_hf.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                       help="default: the dtype the checkpoint came from HF with, else float32")
    to_hf.add_argument("--tokenizer", default=None, help="SentencePiece model (default: the run's)")
    to_hf.add_argument("--max-shard-gb", type=float, default=2.0)
    to_hf.add_argument("--architecture", default="auto",
                       choices=("auto", "LlamaForCausalLM", "Lfm2VlForConditionalGeneration"),
                       help="HF architecture to export as (default: the checkpoint's: text -> Llama, "
                            "multimodal -> Lfm2Vl); a checkpoint of the other kind is an error")
    from_hf = sub.add_parser("hf-to-mcore", help="HF directory -> megatron checkpoint (model only)")
    from_hf.add_argument("--hf", required=True)
    from_hf.add_argument("--out", required=True)
    from_hf.add_argument("--seq-length", type=int, default=None)
    args = ap.parse_args(argv)
    from megatron_bluelm.config.cli import filter_known_warnings

    filter_known_warnings()
    from megatron_bluelm.convert.api import hf_to_megatron, megatron_to_hf

    try:
        if args.direction == "mcore-to-hf":
            out = megatron_to_hf(args.load, args.out, tokenizer_model=args.tokenizer, dtype=args.dtype,
                                 max_shard_bytes=int(args.max_shard_gb * 2**30), hf_architecture=args.architecture)
        else:
            out = hf_to_megatron(args.hf, args.out, seq_length=args.seq_length)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
