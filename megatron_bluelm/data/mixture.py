"""Key-data resampling: turn a mixture (weights and/or epochs per source) into exact sample counts.

Rules (documented in docs/DATA.md):
  * `epochs: r` — the source contributes exactly round(r * samples_per_epoch) training samples,
    where samples_per_epoch = (tokens in its train split - 1) // seq_length (megatron-core's count).
  * `weight: w` — sources with weights share the remaining samples in proportion to w
    (largest-remainder rounding, so the counts add up exactly).
  * only `epochs` given — the factors are relative: counts are scaled to the run's sample count.
The counts are handed to megatron-core's BlendedDataset as weights chosen so that its own
rounding reproduces them exactly (`exact_blend_weights`), so what is planned is what is drawn.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from megatron_bluelm.config.data import MixtureSource
from megatron_bluelm.config.errors import ConfigError


@dataclass
class SourcePlan:
    name: str
    prefix: str
    tokens: int  # tokens in the train split (one epoch)
    samples_per_epoch: int
    samples: int  # planned training samples drawn from this source

    @property
    def epochs(self) -> float:
        return self.samples / max(self.samples_per_epoch, 1)


def split_evenly(total: int, weights: list[float]) -> list[int]:
    """Integers proportional to `weights` that sum to `total` exactly (largest remainder)."""
    w = np.asarray(weights, dtype=np.float64)
    raw = total * w / w.sum()
    counts = np.floor(raw).astype(np.int64)
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[: total - int(counts.sum())]] += 1
    return counts.tolist()


def plan_counts(sources: list[MixtureSource], samples_per_epoch: list[int], total: int) -> list[int]:
    """Training samples per source for a run of `total` samples."""
    for s, e in zip(sources, samples_per_epoch):
        if e <= 0:
            raise ConfigError(f"mixture source '{s.name}': its train split holds less than one sequence")
    fixed = {i: round(s.epochs * e) for i, (s, e) in enumerate(zip(sources, samples_per_epoch)) if s.epochs}
    weighted = [i for i, s in enumerate(sources) if s.weight is not None]
    if not weighted:  # epochs only: relative resample factors, scaled to the run
        return split_evenly(total, [s.epochs * e for s, e in zip(sources, samples_per_epoch)])
    rest = total - sum(fixed.values())
    if rest < len(weighted):
        raise ConfigError(
            f"mixture: the `epochs` sources alone need {sum(fixed.values()):,} samples but the run has "
            f"{total:,}; lower their epochs or train longer"
        )
    counts = [0] * len(sources)
    for i, n in fixed.items():
        counts[i] = n
    for i, n in zip(weighted, split_evenly(rest, [sources[i].weight for i in weighted])):
        counts[i] = n
    return counts


def exact_blend_weights(counts: list[int]) -> list[float]:
    """Weights for which megatron-core's blend rounding yields exactly `counts` samples each.

    megatron-core normalizes the weights and asks each dataset for ceil(size * w) samples; with
    w = n / size that ceil overshoots by one for ~4% of inputs (float rounding), so nudge w by ulps.
    """
    from megatron.core.datasets.utils import normalize

    target = np.asarray(counts, dtype=np.int64)
    size = int(target.sum())
    w = target / size
    for _ in range(1000):
        got = np.array([math.ceil(size * x) for x in normalize(normalize(w.tolist()))])
        if (got == target).all():
            return w.tolist()
        w = np.where(got > target, np.nextafter(w, 0), np.where(got < target, np.nextafter(w, 1), w))
    raise RuntimeError(f"could not find exact blend weights for {counts}")


def format_report(plans: list[SourcePlan], seq_length: int, total: int) -> str:
    rows = [f"{'source':<22}{'tokens/epoch':>14}{'samples':>12}{'share':>8}{'eff. tokens':>14}{'epochs':>8}"]
    for p in plans:
        rows.append(
            f"{p.name[:21]:<22}{p.tokens:>14,}{p.samples:>12,}{p.samples / total:>8.1%}"
            f"{p.samples * seq_length:>14,}{p.epochs:>8.2f}"
        )
    rows.append(f"{'total':<22}{sum(p.tokens for p in plans):>14,}{total:>12,}{1:>8.0%}{total * seq_length:>14,}")
    return "\n".join(rows)
