#!/usr/bin/env python
"""Print a mixture's plan without training: tokens, samples, share and epochs per source.

  python tools/mixture_report.py examples/mixture_demo.yaml [--train-tokens N] [--seq-length S]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_bluelm.config.data import DataConfig, load_mixture_yaml
from megatron_bluelm.config.errors import ConfigError
from megatron_bluelm.data.mixture import format_report
from megatron_bluelm.data.pretrain import plan_mixture
from megatron_bluelm.data.quality import apply_quality


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mixture", help="mixture YAML")
    p.add_argument("--train-tokens", type=float, help="planned training tokens (default: the YAML's)")
    p.add_argument("--seq-length", type=int, help="default: the YAML's, else 4096")
    p.add_argument("--split", default=DataConfig.split)
    p.add_argument("--cache-dir", default=DataConfig.cache_dir,
                   help="where quality-filtered sources are materialized (training's data.cache_dir reuses them)")
    p.add_argument("--tokenizer-model", default=DataConfig.tokenizer_model, help="checked to exist, as training does")
    a = p.parse_args(argv)
    try:
        cfg = DataConfig(mixture=a.mixture, split=a.split, cache_dir=a.cache_dir, tokenizer_model=a.tokenizer_model)
        cfg.validate()
        _, extra = load_mixture_yaml(a.mixture)
        seq = a.seq_length or int(extra.get("seq_length", 4096))
        tokens = a.train_tokens or float(extra.get("train_tokens", 0))
        if tokens <= 0:
            raise ConfigError("give --train-tokens or `train_tokens:` in the YAML")
        samples = int(tokens) // seq
        # What training draws from: quality rules applied exactly as the trainer applies them.
        sources = [apply_quality(s, cfg.cache_dir) if s.quality else s for s in cfg.sources()]
        plans = plan_mixture(sources, cfg.split, seq, samples)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"mixture {a.mixture}: {samples:,} samples x {seq} tokens = {samples * seq:,} training tokens")
    print(format_report(plans, seq, samples))
    return 0


if __name__ == "__main__":
    sys.exit(main())
