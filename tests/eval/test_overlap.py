"""The harness's overlapped path (samples streamed from the generator, graded and written on the row
thread while generation goes on) gives the same per-item verdicts, results file and summary as the
plain path (everything graded after each call, in the caller's thread); its errors reach the caller."""
import json
import random
import sys
import threading
import time

import pytest

from megatron_bluelm.eval.benchmarks import load_benchmark
from megatron_bluelm.eval.harness import EvalSettings, Sample, evaluate

RESPONSES = ["{t}", "\\boxed{{{t}}}", "the answer is {t}.", "{w}", "\\frac{{{t2}}}{{2}}", "{t}, {w}", "(A) or (B)",
             "The answer is ({c})", "{c}", "x = {t}", "1,000 or {t}", ""]


class Plain:
    """Deterministic responses of many shapes (right, wrong, boxed, fractions, letters) from the seed."""

    forced_length = 3

    def __init__(self):
        self.threads = set()

    def _samples(self, conversations, budget, seed, samples):
        rng = random.Random(seed)
        out = []
        for messages in conversations:
            q = messages[-1]["content"].split("\n")[0]
            truth = eval(q.removeprefix("What is ").rstrip("?")) if q.startswith("What is ") else 0
            for _ in range(samples):
                text = rng.choice(RESPONSES).format(t=truth, t2=2 * truth, w=truth + rng.choice([1, -1]),
                                                    c=rng.choice("ABCD"))
                think = 0 if budget == 0 else rng.randrange(0, (budget or 9) + 1)
                out.append(Sample(("" if budget == 0 else "y " * think + "</think>\n") + text, think, think + 5,
                                  rng.choice(["stop", "length"]), rng.random() < 0.5))
        return out

    def __call__(self, conversations, images, budget, max_new_tokens, seed, samples):
        return self._samples(conversations, budget, seed, samples)


class Streaming(Plain):
    """Reports every sample through ``on_sample`` in a shuffled order, pausing now and then (the GPU)."""

    def __call__(self, conversations, images, budget, max_new_tokens, seed, samples, on_sample=None):
        outs = self._samples(conversations, budget, seed, samples)
        order = list(range(len(outs)))
        random.Random(seed + 1).shuffle(order)
        for n, i in enumerate(order):
            if n % 7 == 0:
                time.sleep(0.002)
            on_sample(i, lambda s=outs[i]: self._make(s))
        return None

    def _make(self, s):
        self.threads.add(threading.current_thread().name)
        return s


def _sweep(tmp_path, name, gen, overlap, **kw):
    bench = [load_benchmark("arithmetic", limit=23), load_benchmark("choice", limit=11)]
    settings = EvalSettings(budgets=[0, 4, None], batch_size=5, samples=3, temperature=0.7, pass_k=[1, 2])
    path = tmp_path / f"{name}.jsonl"
    summary = evaluate(gen, bench, settings, results_path=str(path), progress=False, overlap=overlap, **kw)
    return summary, path.read_text()


def _core(s):
    return {k: v for k, v in s.items() if k != "throughput"}


def test_overlapped_path_equals_plain_path(tmp_path):
    interval = sys.getswitchinterval()
    plain, plain_file = _sweep(tmp_path, "plain", Plain(), overlap=False)
    streamed = Streaming()
    over, over_file = _sweep(tmp_path, "over", streamed, overlap=True)
    assert streamed.threads == {"eval-rows"}  # the samples were made and graded off the caller's thread
    assert over_file == plain_file  # every row, verdict and answer, in the same order
    assert _core(over) == _core(plain)
    assert over["throughput"]["items"] == plain["throughput"]["items"] == 3 * 34
    assert over["throughput"]["generated_tokens"] == plain["throughput"]["generated_tokens"]
    assert 0 <= over["throughput"]["host_seconds"] <= over["throughput"]["seconds"]
    for gen, overlap in ((Plain(), True), (Streaming(), False)):  # the other two combinations
        s, f = _sweep(tmp_path, f"x{overlap}", gen, overlap=overlap)
        assert f == plain_file and _core(s) == _core(plain)
    rows = [json.loads(x) for x in plain_file.splitlines()[1:]]
    verdicts = [smp["correct"] for r in rows for smp in r["samples"]]
    assert 0.1 < sum(verdicts) / len(verdicts) < 0.9  # the comparison covers both verdicts
    assert sys.getswitchinterval() == interval


def test_overlapped_resume_equals_uninterrupted(tmp_path):
    full, full_file = _sweep(tmp_path, "full", Plain(), overlap=False)
    _sweep(tmp_path, "part", Streaming(), overlap=True, stop_after_batches=4)
    part = tmp_path / "part.jsonl"
    assert len(part.read_text().splitlines()) == 1 + 4 * 5  # every finished batch was written
    resumed, _ = _sweep(tmp_path, "part", Streaming(), overlap=True)
    assert _core(resumed) == _core(full)


class Failing(Streaming):
    def __init__(self, skip=False):
        super().__init__()
        self.skip = skip

    def __call__(self, conversations, images, budget, max_new_tokens, seed, samples, on_sample=None):
        if self.skip:  # a generator that forgets a sample
            return super().__call__(conversations, images, budget, max_new_tokens, seed, samples,
                                    on_sample=lambda i, make: None if i == 0 else on_sample(i, make))

        def bad():
            raise ValueError("cannot decode sample 2")
        return super().__call__(conversations, images, budget, max_new_tokens, seed, samples,
                                on_sample=lambda i, make: on_sample(i, bad if i == 2 else make))


@pytest.mark.parametrize("overlap", [True, False])
def test_row_errors_reach_the_caller(tmp_path, overlap):
    interval = sys.getswitchinterval()
    with pytest.raises(ValueError, match="cannot decode sample 2"):
        _sweep(tmp_path, f"a{overlap}", Failing(), overlap=overlap)
    with pytest.raises(RuntimeError, match=r"without reporting samples \[0\]"):
        _sweep(tmp_path, f"b{overlap}", Failing(skip=True), overlap=overlap)
    assert sys.getswitchinterval() == interval


def test_thinking_count_equals_the_token_walk():
    from megatron_bluelm.eval.generation import sampled_thinking_tokens

    def walk(tokens, forced, end_think, thinking):  # the definition: sampled tokens before the first </think>
        n = 0
        for tok, was_forced in zip(tokens, forced):
            if tok == end_think:
                break
            n += not was_forced
        return n if thinking else 0

    rng = random.Random(0)
    for _ in range(3000):
        tokens = [rng.randrange(5) for _ in range(rng.randrange(12))]
        forced = [rng.random() < 0.3 for _ in range(rng.choice([len(tokens), rng.randrange(12)]))]
        thinking = rng.random() < 0.9
        assert sampled_thinking_tokens(tokens, forced, 3, thinking) == walk(tokens, forced, 3, thinking)
