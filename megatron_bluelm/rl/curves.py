"""Training curves of an RL run as one PNG (matplotlib, headless): reward, KL to the reference,
policy entropy, response length, and held-out accuracy when the run evaluated."""
from __future__ import annotations

import math
import os

PANELS = (("reward", "mean reward"), ("kl", "KL to reference (k3)"), ("entropy", "policy entropy (nats/token)"),
          ("response_len", "response length (tokens)"))


def write_curves(history: list, evals: list, output_dir: str, name: str = "rl_curves.png") -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(output_dir, exist_ok=True)
    panels = list(PANELS) + ([("accuracy", "held-out accuracy (greedy)")] if evals else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.0))
    steps = list(range(1, len(history) + 1))
    for ax, (key, title) in zip(axes, panels):
        if key == "accuracy":
            xs, ys = [e["step"] for e in evals], [e["accuracy"] for e in evals]
            ax.plot(xs, ys, marker="o")
        else:
            ys = [h.get(key, math.nan) if h.get(key) is not None else math.nan for h in history]
            ax.plot(steps, ys)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("RL step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(output_dir, name)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
