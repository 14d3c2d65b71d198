"""PNG plots with matplotlib (Agg, no display): accuracy against thinking tokens spent, and training
metrics (``tools/plot_metrics.py``)."""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence

from megatron_bluelm.eval.harness import budget_points

_LINESTYLES = ("-", "--", ":", "-.")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def budget_plot(runs: Sequence[tuple[str, dict]], path: str, title: Optional[str] = None) -> str:
    """Accuracy (y) against mean thinking tokens spent (x): one line per benchmark through the thinking
    budgets (each point labelled with its budget), the non-thinking mode as a star marker; several
    runs (``--compare``) share the axes, one line style each."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    benches = sorted({b for _, s in runs for b in s["benchmarks"]})
    for r, (label, summary) in enumerate(runs):
        style = _LINESTYLES[r % len(_LINESTYLES)]
        for b, bench in enumerate(benches):
            if bench not in summary["benchmarks"]:
                continue
            colour = colours[b % len(colours)]
            points, nothink = budget_points(summary, bench)
            name = bench if len(runs) == 1 else f"{label}: {bench}"
            if points:
                xs, ys = [p[0] for p in points], [p[1] for p in points]
                ax.plot(xs, ys, style, marker="o", color=colour, label=f"{name} (thinking)")
                labels: dict = {}  # budgets that spent the same tokens for the same accuracy share a label
                for x, y, budget in points:
                    labels.setdefault((round(x, 6), round(y, 6)), []).append("none" if budget is None else str(budget))
                for (x, y), names in labels.items():
                    ax.annotate(", ".join(names), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7,
                                color=colour)
            if nothink is not None:
                ax.plot([nothink[0]], [nothink[1]], marker="*", markersize=13, linestyle="none", color=colour,
                        markeredgecolor="black", label=f"{name} (non-thinking)")
    ax.set_xlabel("mean thinking tokens spent per response")
    ax.set_ylabel("accuracy (pass@1)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title or "Accuracy against the thinking budget (point labels: budget)")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- training metrics

# (panel title, [(split, key)], y label, log scale)
PANELS = [
    ("loss", [("train", "loss"), ("valid", "loss"), ("rl", "loss")], "loss", True),
    ("learning rate", [("train", "lr")], "lr", False),
    ("grad norm", [("train", "grad_norm")], "grad norm", True),
    ("throughput", [("train", "tokens_per_s"), ("rl", "rollout_tokens_per_s")], "tokens / s", False),
    ("MFU", [("train", "mfu")], "MFU", False),
    ("RL reward", [("rl", "reward")], "mean reward", False),
    ("RL KL", [("rl", "kl")], "KL", False),
    ("RL entropy", [("rl", "entropy")], "entropy", False),
    ("RL response length", [("rl", "response_len"), ("rl", "thinking_len")], "tokens", False),
]


def read_metrics(path: str) -> list[dict]:
    """A run's metrics.jsonl (``training/logging.py``); bad lines named by file:line."""
    from megatron_bluelm.config.errors import ConfigError
    from megatron_bluelm.data.jsonl import read_json_records

    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    rows = []
    missing = f"no metrics file '{path}' (a run's logging.output_dir holds metrics.jsonl)"
    for lineno, rec in read_json_records(path, missing):
        if not isinstance(rec, dict) or "step" not in rec:
            raise ConfigError(f"{path}:{lineno}: a metrics record needs 'step'")
        rows.append(rec)
    return rows


def _series(rows: list, split: str, key: str) -> tuple[list, list]:
    pts = [(r["step"], r[key]) for r in rows if r.get("split", "train") == split
           and isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) and math.isfinite(r[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def eval_keys(rows: list) -> list[str]:
    """Periodic-evaluation accuracies: ``<bench>/<budget>/accuracy`` keys of the ``eval`` split."""
    return sorted({k for r in rows if r.get("split") == "eval" for k in r if k.endswith("/accuracy")})


def metrics_plot(runs: Sequence[tuple[str, list]], path: str, panels: Optional[Sequence[str]] = None) -> list[str]:
    """One figure, a panel per metric any run has (loss, lr, grad norm, throughput, MFU, RL reward / KL /
    entropy / response length, eval accuracy per benchmark and budget); one colour per run.
    Returns the panel titles drawn."""
    plt = _pyplot()
    chosen = []
    for title, series, ylabel, log in PANELS:
        if panels and title not in panels:
            continue
        if any(_series(rows, sp, k)[0] for _, rows in runs for sp, k in series):
            chosen.append((title, series, ylabel, log))
    evals = sorted({k for _, rows in runs for k in eval_keys(rows)})
    if evals and (not panels or "eval accuracy" in panels):
        chosen.append(("eval accuracy", [("eval", k) for k in evals], "accuracy", False))
    if not chosen:
        from megatron_bluelm.config.errors import ConfigError

        raise ConfigError("no plottable metrics (loss, lr, grad_norm, ...) in the given metrics files")
    cols = min(3, len(chosen))
    nrows = math.ceil(len(chosen) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.2 * nrows), dpi=100, squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, series, ylabel, log) in zip(axes.flat, chosen):
        for r, (label, rows) in enumerate(runs):
            for j, (split, key) in enumerate(series):
                xs, ys = _series(rows, split, key)
                if not xs:
                    continue
                name = key.rsplit("/accuracy", 1)[0] if title == "eval accuracy" else f"{split} {key}"
                name = name if len(runs) == 1 else f"{label}: {name}"
                colour = colours[(r if title != "eval accuracy" else r * len(series) + j) % len(colours)]
                ax.plot(xs, ys, _LINESTYLES[j % len(_LINESTYLES)], color=colour,
                        marker="o" if len(xs) < 30 else None, markersize=3, label=name)
        if log and all(y > 0 for _, rows in runs for sp, k in series for y in _series(rows, sp, k)[1]):
            ax.set_yscale("log")
            from matplotlib.ticker import FuncFormatter

            # plain numbers rather than 2x10^0; minor ticks labelled at 2 and 5 only (no crowding)
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(
                lambda v, _: f"{v:g}" if v > 0 and f"{v:.0e}"[0] in "25" else ""))
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(chosen):]:
        ax.set_visible(False)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return [c[0] for c in chosen]
