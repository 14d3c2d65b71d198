#!/usr/bin/env python
"""Plot training metrics from one or several runs' metrics.jsonl to one PNG (a panel per metric).

  python tools/plot_metrics.py outputs/run --output docs/images/demo_loss.png
  python tools/plot_metrics.py outputs/sft_a outputs/sft_b --labels lr3e-3,lr1e-3 --output cmp.png
  python tools/plot_metrics.py outputs/rl_toy/run --panels "RL reward,RL KL,RL entropy,RL response length"

Panels, each drawn when some run logged it: loss (train / valid / RL), learning rate, grad norm,
throughput (tokens/s), MFU, RL reward, RL KL, RL entropy, RL response length (and thinking length),
eval accuracy (periodic benchmark evaluation: one line per benchmark and budget). A run is its
``logging.output_dir`` (which holds metrics.jsonl) or the metrics.jsonl file itself.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_bluelm.config.errors import ConfigError  # noqa: E402


def main(argv=None) -> int:
    from megatron_bluelm.eval.plots import PANELS, metrics_plot, read_metrics

    names = [p[0] for p in PANELS] + ["eval accuracy"]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories (logging.output_dir) or metrics.jsonl files")
    p.add_argument("--labels", default=None, help="comma-separated names, one per run (default: the folder)")
    p.add_argument("--panels", default=None, help=f"comma-separated subset of: {', '.join(names)}")
    p.add_argument("--output", default="metrics.png")
    args = p.parse_args(argv)
    try:
        labels = args.labels.split(",") if args.labels else None
        if labels and len(labels) != len(args.runs):
            raise ConfigError(f"--labels: {len(labels)} names for {len(args.runs)} runs")
        panels = [s.strip() for s in args.panels.split(",")] if args.panels else None
        unknown = [x for x in panels or [] if x not in names]
        if unknown:
            raise ConfigError(f"--panels: unknown panel {unknown[0]!r}; known: {', '.join(names)}")
        runs = []
        for i, path in enumerate(args.runs):
            label = labels[i] if labels else os.path.basename(os.path.normpath(path if os.path.isdir(path)
                                                                                else os.path.dirname(path)))
            runs.append((label, read_metrics(path)))
        drawn = metrics_plot(runs, args.output, panels)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output} ({', '.join(drawn)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
