"""Budget sweeps: every benchmark item at every thinking budget, graded, written item by item, summarized.

    gen = engine_generate_fn(text_generator)               # or any GenerateFn (SFT, an HF model)
    summary = evaluate(gen, [load_benchmark("arithmetic")], EvalSettings(budgets=[0, 16, None]),
                       results_path="out/results.jsonl")

Budgets: 0 is the non-thinking mode (empty think block); N a thinking budget of N tokens (the engine
forces ``</think>`` + the bridge at N); None unlimited thinking. A run generates ``samples`` responses
per item and budget (greedy unless ``temperature`` > 0): pass@1 is the mean correctness over all
samples, pass@k the unbiased estimator 1 - C(n-c, k) / C(n, k) for each k of ``pass_k``.

The results file is JSONL: a header line with the settings, then one line per (benchmark, budget,
item) holding the prompt, every sample's response, thinking length, finish reason and verdict. It is
appended batch by batch; a run with the same file skips what it holds (resume after an interruption:
a torn last line is dropped), so the summary of a resumed run equals an uninterrupted one. The
summary is computed from the results file alone.
"""
from __future__ import annotations

import inspect
import json
import math
import os
import queue
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

from megatron_bluelm.config.errors import ConfigError
from megatron_bluelm.eval.benchmarks import Benchmark, Item
from megatron_bluelm.eval.graders import extract_answer, grade


@dataclass
class EvalSettings:
    budgets: list = field(default_factory=lambda: [0, None])  # 0: non-thinking, None: unlimited
    samples: int = 1  # responses per item and budget (n of pass@k)
    pass_k: list = field(default_factory=lambda: [1])
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    max_new_tokens: int = 512  # unlimited budget: the whole response
    answer_tokens: int = 64  # budget N: N + the forced close + this many answer tokens
    batch_size: int = 16  # items per generation call (x samples prompts)
    bridge_text: Optional[str] = None  # None: data/sft.DEFAULT_BRIDGE (what SFT teaches)

    def check(self) -> None:
        if not self.budgets:
            raise ConfigError("budgets: give at least one (0 = non-thinking, none = unlimited)")
        for b in self.budgets:
            if b is not None and (not isinstance(b, int) or b < 0):
                raise ConfigError(f"budgets: {b!r} is not a token count >= 0 or none")
        if self.samples < 1 or self.batch_size < 1:
            raise ConfigError("samples and batch_size must be >= 1")
        if any(k < 1 or k > self.samples for k in self.pass_k):
            raise ConfigError(f"pass_k {self.pass_k}: every k must be in 1..samples ({self.samples}); "
                              "raise --samples")
        if self.samples > 1 and self.temperature == 0.0:
            raise ConfigError(f"samples {self.samples} with temperature 0: greedy decoding gives the same response "
                              "every time; set a temperature > 0 for pass@k")

    def bridge(self) -> str:
        if self.bridge_text is not None:
            return self.bridge_text
        from megatron_bluelm.data.sft import DEFAULT_BRIDGE

        return DEFAULT_BRIDGE

    def max_tokens(self, budget: Optional[int], forced_length: int) -> int:
        """max_new_tokens of a call: budget N leaves room for the forced close and the answer."""
        return self.max_new_tokens if budget is None else budget + forced_length + self.answer_tokens

    def identity(self) -> dict:
        """Settings that change results: a resumed run must match them."""
        d = asdict(self)
        for k in ("budgets", "pass_k", "batch_size"):
            d.pop(k)
        d["bridge_text"] = self.bridge()
        return d


@dataclass
class Sample:
    response: str  # the generated text (thinking, then the answer; stop token removed)
    thinking_tokens: int  # tokens sampled inside the think block (the budget's forced close not counted)
    tokens: int  # generated tokens in all
    finish_reason: str
    forced_close: bool = False
    warnings: list = field(default_factory=list)  # the engine's, e.g. a budget clamped to the limits


# generate(conversations, images per conversation, budget, max_new_tokens, seed, samples)
#   -> samples responses per conversation, conversation-major.
# A GenerateFn may also take ``on_sample``: then it calls on_sample(index, make) once for every
# sample (conversation-major index) as soon as that sample is finished, ``make()`` returning its
# Sample, and its return value is not used (the harness grades samples while the rest generate).
GenerateFn = Callable[[list, list, Optional[int], int, int, int], list]


def budget_label(b: Optional[int]) -> str:
    return "nothink" if b == 0 else "inf" if b is None else str(b)


def _parse_budget_label(s: str) -> Optional[int]:
    return 0 if s == "nothink" else None if s == "inf" else int(s)


def response_for_grading(sample: Sample, budget: Optional[int]) -> str:
    """What the graders read: thinking-mode responses begin inside the think block the prompt opened."""
    return sample.response if budget == 0 else "<think>" + sample.response


# ----------------------------------------------------------------------------- the results file

class ResultsFile:
    def __init__(self, path: Optional[str], settings: EvalSettings, meta: dict, writer: bool = True):
        self.path, self.writer = path, writer
        self.rows: dict = {}  # (bench, budget label, item id) -> row
        header = {"header": {"settings": settings.identity(), **meta}}
        if path is None:
            return
        if os.path.exists(path):
            self._load(header)
        elif writer:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(json.dumps(header) + "\n")

    def _load(self, header: dict) -> None:
        with open(self.path, encoding="utf-8") as f:
            lines = f.readlines()
        good = 0  # bytes of complete lines
        for lineno, line in enumerate(lines, 1):
            try:
                rec = json.loads(line)
                if not line.endswith("\n"):
                    raise ValueError("torn line")
            except ValueError:
                if lineno == len(lines):  # the write an interruption cut short: redone below
                    break
                raise ConfigError(f"{self.path}:{lineno}: not a results line (invalid JSON)") from None
            good += len(line.encode("utf-8"))
            if lineno == 1:
                self._check_header(rec, header)
            else:
                self.rows[(rec["bench"], rec["budget"], rec["id"])] = rec
        if self.writer and good != os.path.getsize(self.path):
            with open(self.path, "r+b") as f:
                f.truncate(good)

    def _check_header(self, rec: dict, header: dict) -> None:
        old = rec.get("header", {}) if isinstance(rec, dict) else {}
        if "settings" not in old:
            raise ConfigError(f"{self.path}:1: not a results file of tools/evaluate.py (no header)")
        for key in sorted(set(old["settings"]) | set(header["header"]["settings"])):
            a, b = old["settings"].get(key), header["header"]["settings"].get(key)
            if a != b:
                raise ConfigError(f"{self.path}: written with {key}={a!r}, this run has {key}={b!r}; resume with the "
                                  "same settings or write to another output")
        for key in ("checkpoint",):
            if old.get(key) != header["header"].get(key):
                raise ConfigError(f"{self.path}: written for {key} {old.get(key)!r}, this run evaluates "
                                  f"{header['header'].get(key)!r}; write to another output")

    def append(self, rows: list) -> None:
        for r in rows:
            self.rows[(r["bench"], r["budget"], r["id"])] = r
        if self.path is None or not self.writer:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
            f.flush()
            os.fsync(f.fileno())


# ----------------------------------------------------------------------------- running

def _render_prompt(item: Item, budget: Optional[int]) -> str:
    from megatron_bluelm.data.chat_template import render_chat

    return render_chat(item.messages, thinking=budget != 0, add_generation_prompt=True)


def _row(bench: Benchmark, item: Item, budget: Optional[int], samples: list) -> dict:
    out = []
    for s in samples:
        text = response_for_grading(s, budget)
        out.append({"response": s.response, "answer": extract_answer(item.grader, text),
                    "correct": grade(item.grader, text, item.answer, choices=item.choices),
                    "thinking_tokens": s.thinking_tokens, "tokens": s.tokens,
                    "finish_reason": s.finish_reason, "forced_close": s.forced_close,
                    **({"warnings": s.warnings} if s.warnings else {})})
    return {"bench": bench.name, "budget": budget_label(budget), "id": item.id, "where": item.where,
            "level": item.level, "prompt": _render_prompt(item, budget), "reference": item.answer, "samples": out}


def _batch_seed(seed: int, bench: str, budget: Optional[int], first_index: int) -> int:
    """A seed per batch that does not depend on what ran before (a resumed batch draws the same)."""
    import zlib

    return (seed * 1_000_003 + zlib.crc32(f"{bench}|{budget_label(budget)}|{first_index}".encode())) % 2**31


def evaluate(generate: GenerateFn, benchmarks: Sequence[Benchmark], settings: EvalSettings,
             results_path: Optional[str] = None, meta: Optional[dict] = None, progress: bool = True,
             writer: bool = True, stop_after_batches: Optional[int] = None, overlap: bool = True) -> dict:
    """Run the sweep (resuming from ``results_path``) and return the summary. Every rank of a model
    calls it with the same arguments; only ``writer`` writes. ``stop_after_batches``: end early (tests
    of resume use it to stand for an interruption). ``overlap``: grade and write on a second thread
    while generation goes on (``_RowMaker``); False does it all in this thread, between the calls
    (the same rows and summary, slower)."""
    settings.check()
    meta = dict(meta or {})
    results = ResultsFile(results_path, settings, meta, writer)
    _share_rows(results)
    todo = []  # (bench, budget, [items]) per generation call, in a fixed order
    for bench in benchmarks:
        for budget in settings.budgets:
            pending = [(i, it) for i, it in enumerate(bench.items)
                       if (bench.name, budget_label(budget), it.id) not in results.rows]
            for start in range(0, len(bench.items), settings.batch_size):
                batch = [p for p in pending if start <= p[0] < start + settings.batch_size]
                if batch:
                    todo.append((bench, budget, start, [it for _, it in batch]))
    bar = _progress(sum(len(t[3]) for t in todo), progress and writer)
    streams = _takes_on_sample(generate)
    rows = _RowMaker(results, settings, bar, overlap)
    t0, in_generate = time.perf_counter(), 0.0
    try:
        for calls, (bench, budget, start, items) in enumerate(todo):
            if stop_after_batches is not None and calls >= stop_after_batches:
                break
            rows.check()
            batch = rows.begin(bench, budget, items)
            seed = _batch_seed(settings.seed, bench.name, budget, start)
            args = ([it.messages for it in items], [it.images for it in items], budget,
                    settings.max_tokens(budget, getattr(generate, "forced_length", 1)), seed, settings.samples)
            t = time.perf_counter()
            outs = generate(*args, on_sample=batch.sample) if streams else generate(*args)
            in_generate += time.perf_counter() - t
            rows.end(batch, None if streams else outs)
    except BaseException:
        rows.close(raise_error=False)  # the caller sees this error, not a later one of the row thread
        raise
    rows.close()
    if bar is not None:
        bar.close()
    dt = time.perf_counter() - t0
    summary = summarize(results.rows, benchmarks, settings)
    n_items, n_tokens = rows.items, rows.tokens
    summary["throughput"] = {"items": n_items, "generated_tokens": n_tokens, "seconds": dt,
                             "items_per_s": n_items / dt if dt > 0 else 0.0,
                             "tokens_per_s": n_tokens / dt if dt > 0 else 0.0,
                             # the time this process was not generating: host work left on the
                             # critical path (rendering, grading and writing that did not overlap)
                             "generate_seconds": in_generate, "host_seconds": dt - in_generate}
    summary.update(meta)
    return summary


def _takes_on_sample(generate) -> bool:
    try:
        return "on_sample" in inspect.signature(generate).parameters
    except (TypeError, ValueError):  # a callable without a signature: the plain protocol
        return False


class _Batch:
    """One generation call's samples as they arrive (any order), graded item by item when complete."""

    def __init__(self, maker: "_RowMaker", bench: Benchmark, budget: Optional[int], items: list):
        self.maker, self.bench, self.budget, self.items = maker, bench, budget, items
        k = maker.settings.samples
        self.samples: list = [None] * (len(items) * k)
        self.left = [k] * len(items)
        self.rows: list = [None] * len(items)

    def sample(self, index: int, make: Callable[[], Sample]) -> None:
        """``GenerateFn`` streaming callback: sample ``index`` (conversation-major) is finished;
        ``make()`` returns it (decoding happens there, on the row thread)."""
        self.maker.submit(self._take, index, make)

    def _take(self, index: int, make) -> None:
        if self.samples[index] is not None:
            raise RuntimeError(f"generate reported sample {index} of a batch twice")
        self.samples[index] = make()
        j = index // self.maker.settings.samples
        self.left[j] -= 1
        if self.left[j] == 0:
            self._grade(j)

    def _grade(self, j: int) -> None:
        k = self.maker.settings.samples
        self.rows[j] = _row(self.bench, self.items[j], self.budget, self.samples[j * k:(j + 1) * k])

    def _finish(self, outs: Optional[list]) -> None:
        if outs is not None:
            if len(outs) != len(self.samples):
                raise RuntimeError(f"generate returned {len(outs)} samples for {len(self.samples)} prompts")
            for j in range(len(self.items)):
                if self.rows[j] is None:
                    k = self.maker.settings.samples
                    self.samples[j * k:(j + 1) * k] = outs[j * k:(j + 1) * k]
                    self._grade(j)
        missing = [i for i, s in enumerate(self.samples) if s is None]
        if missing:
            raise RuntimeError(f"generate returned without reporting samples {missing[:8]} of the batch")
        self.maker.written(self, self.rows)


class _RowMaker:
    """Builds the results rows (decode, grade) and appends them batch by batch, in batch order, so the
    results file and summary are the same as the plain path's. With ``overlap`` this runs on a thread
    of its own: the graders and the file write (flush + fsync, which releases the GIL) of finished
    samples run while the engine generates the rest of the batch and the next one, whose host loop
    mostly waits on the GPU with the GIL released. Without it (or for a batch's leftovers) the same
    code runs in the caller."""

    def __init__(self, results: ResultsFile, settings: EvalSettings, bar, overlap: bool):
        self.results, self.settings, self.bar = results, settings, bar
        self.items = self.tokens = 0
        self.error: Optional[BaseException] = None
        self.thread = None
        self.t0 = time.perf_counter()
        if overlap:
            self.queue: queue.SimpleQueue = queue.SimpleQueue()
            # the engine's host loop must get the GIL back from this thread soon after the GPU is
            # done; CPython hands it over only after the switch interval (5 ms by default)
            self.old_interval = sys.getswitchinterval()
            sys.setswitchinterval(min(self.old_interval, 0.001))
            self.thread = threading.Thread(target=self._run, name="eval-rows", daemon=True)
            self.thread.start()

    def begin(self, bench: Benchmark, budget: Optional[int], items: list) -> _Batch:
        return _Batch(self, bench, budget, items)

    def submit(self, fn, *args) -> None:
        if self.thread is None:
            fn(*args)
        else:
            self.queue.put((fn, args))

    def end(self, batch: _Batch, outs: Optional[list]) -> None:
        self.submit(batch._finish, outs)

    def written(self, batch: _Batch, rows: list) -> None:
        self.results.append(rows)
        self.items += len(rows)
        self.tokens += sum(s["tokens"] for r in rows for s in r["samples"])
        if self.bar is not None:
            dt = max(time.perf_counter() - self.t0, 1e-9)
            self.bar.set_postfix_str(f"{batch.bench.name} budget {budget_label(batch.budget)} | "
                                     f"{self.items / dt:.2f} items/s {self.tokens / dt:,.0f} tok/s")
            self.bar.update(len(rows))

    def _run(self) -> None:
        while True:
            task = self.queue.get()
            if task is None:
                return
            if self.error is None:  # after an error: drain, the caller raises it
                try:
                    task[0](*task[1])
                except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                    self.error = e

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self, raise_error: bool = True) -> None:
        if self.thread is not None:
            self.queue.put(None)
            self.thread.join()
            sys.setswitchinterval(self.old_interval)
            self.thread = None
        if raise_error:
            self.check()


def _share_rows(results: ResultsFile) -> None:
    """Every rank of the model must make the same generation calls: all take rank 0's view of what
    the results file already holds (other nodes may not see the file at all)."""
    import torch.distributed as dist

    if results.path is None or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    box = [results.rows if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    results.rows = box[0]


def _progress(total: int, enabled: bool):
    if not enabled or total == 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="item", dynamic_ncols=True)


# ----------------------------------------------------------------------------- summary

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al., 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def summarize(rows: dict, benchmarks: Sequence[Benchmark], settings: EvalSettings) -> dict:
    out = {"settings": asdict(settings) | {"bridge_text": settings.bridge()}, "benchmarks": {}}
    for bench in benchmarks:
        per_budget = {}
        for budget in settings.budgets:
            label = budget_label(budget)
            got = [rows[(bench.name, label, it.id)] for it in bench.items if (bench.name, label, it.id) in rows]
            if not got:
                continue
            per_budget[label] = _stats(got, budget, settings)
        out["benchmarks"][bench.name] = {"path": bench.path, "items": len(bench.items), "budgets": per_budget}
    return out


def _stats(rows: list, budget: Optional[int], settings: EvalSettings) -> dict:
    samples = [s for r in rows for s in r["samples"]]
    n = len(rows)
    stats = {"budget": budget, "mode": "nothink" if budget == 0 else "think", "items": n,
             "accuracy": sum(s["correct"] for s in samples) / len(samples),
             "mean_thinking_tokens": sum(s["thinking_tokens"] for s in samples) / len(samples),
             "max_thinking_tokens": max(s["thinking_tokens"] for s in samples),
             "mean_tokens": sum(s["tokens"] for s in samples) / len(samples),
             "forced_close_rate": sum(bool(s["forced_close"]) for s in samples) / len(samples),
             "unfinished_rate": sum(s["finish_reason"] != "stop" for s in samples) / len(samples)}
    for k in settings.pass_k:
        stats[f"pass@{k}"] = sum(pass_at_k(len(r["samples"]), sum(s["correct"] for s in r["samples"]), k)
                                 for r in rows) / n
    levels = sorted({r["level"] for r in rows if r.get("level") is not None})
    if levels:
        stats["accuracy_by_level"] = {
            str(lv): sum(s["correct"] for r in rows if r.get("level") == lv for s in r["samples"])
            / sum(len(r["samples"]) for r in rows if r.get("level") == lv) for lv in levels}
    return stats


def format_table(summary: dict) -> str:
    """Accuracy and mean thinking tokens per benchmark, budget and mode, as a Markdown table."""
    ks = [k for k in summary["settings"]["pass_k"] if k != 1]
    head = ["benchmark", "budget", "mode", "items", "accuracy", *[f"pass@{k}" for k in ks], "thinking tokens",
            "max thinking", "forced close"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, b in summary["benchmarks"].items():
        for label, s in b["budgets"].items():
            cells = [name, label if label != "inf" else "none", s["mode"], str(s["items"]), f"{s['accuracy']:.3f}",
                     *[f"{s[f'pass@{k}']:.3f}" for k in ks], f"{s['mean_thinking_tokens']:.1f}",
                     str(s["max_thinking_tokens"]), f"{s['forced_close_rate']:.2f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def budget_points(summary: dict, bench: str) -> tuple[list, Optional[tuple]]:
    """(thinking-mode points sorted by thinking tokens spent, the non-thinking point or None) for the plot."""
    points, nothink = [], None
    for label, s in summary["benchmarks"][bench]["budgets"].items():
        p = (s["mean_thinking_tokens"], s["accuracy"], _parse_budget_label(label))
        if label == "nothink":
            nothink = p
        else:
            points.append(p)
    return sorted(points, key=lambda p: (p[0], math.inf if p[2] is None else p[2])), nothink
