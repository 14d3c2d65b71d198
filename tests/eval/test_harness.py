"""The budget-sweep harness without a model: a deterministic stand-in generator (answers depend on the
budget and the seed), resume after an interruption, settings checks, pass@k, benchmark parsing
errors by file:line, the table and the plots."""
import json
import os
import random
import subprocess
import sys

import pytest

from megatron_bluelm.config.errors import ConfigError
from megatron_bluelm.eval.benchmarks import BUNDLED, load_benchmark
from megatron_bluelm.eval.harness import EvalSettings, Sample, evaluate, format_table, pass_at_k
from megatron_bluelm.eval.plots import budget_plot, metrics_plot

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class FakeGenerate:
    """Thinks min(budget, 6) tokens; right when it thought >= 3 tokens (or by seeded chance)."""

    forced_length = 3

    def __init__(self):
        self.calls = []

    def __call__(self, conversations, images, budget, max_new_tokens, seed, samples):
        self.calls.append((len(conversations), budget, seed))
        rng = random.Random(seed)
        out = []
        for messages in conversations:
            question = messages[-1]["content"]
            truth = str(eval(question.removeprefix("What is ").rstrip("?")))  # the bundled arithmetic items
            for _ in range(samples):
                think = 0 if budget == 0 else min(6 if budget is None else budget, 6)
                right = think >= 3 or rng.random() < 0.2
                answer = truth if right else truth + "1"
                text = answer if budget == 0 else "x " * think + "</think>\n" + answer
                out.append(Sample(text, think, think + 2, "stop", budget is not None and budget < 6))
        return out


def _summary_core(s):
    return {k: v for k, v in s.items() if k not in ("throughput",)}


def test_sweep_resume_after_interruption_gives_the_same_summary(tmp_path):
    bench = [load_benchmark("arithmetic", limit=10)]
    settings = EvalSettings(budgets=[0, 2, 4, None], batch_size=3, samples=2, temperature=0.7, pass_k=[1, 2])
    full = evaluate(FakeGenerate(), bench, settings, results_path=str(tmp_path / "a.jsonl"), progress=False)
    part = tmp_path / "b.jsonl"
    evaluate(FakeGenerate(), bench, settings, results_path=str(part), progress=False, stop_after_batches=5)
    with open(part, "a") as f:  # the interruption tore the next batch's write
        f.write('{"bench": "arithmetic", "budget": "4", "id": "arith-1-0')
    rows_before = len(part.read_text().splitlines()) - 2  # header and the torn line
    gen = FakeGenerate()
    resumed = evaluate(gen, bench, settings, results_path=str(part), progress=False)
    assert _summary_core(resumed) == _summary_core(full)
    assert resumed["throughput"]["items"] == 40 - rows_before == sum(n for n, _, _ in gen.calls)
    lines = [json.loads(x) for x in part.read_text().splitlines()]
    assert len(lines) == 41 and len({(r["budget"], r["id"]) for r in lines[1:]}) == 40
    s = full["benchmarks"]["arithmetic"]["budgets"]
    assert s["4"]["accuracy"] == 1.0 and s["inf"]["mean_thinking_tokens"] == 6
    assert s["2"]["max_thinking_tokens"] == 2 and s["nothink"]["mean_thinking_tokens"] == 0
    assert 0 < s["2"]["accuracy"] <= s["2"]["pass@2"] < 1
    # the same results file under other settings is refused, naming the setting
    with pytest.raises(ConfigError, match="temperature=0.7, this run has temperature=0.9"):
        evaluate(FakeGenerate(), bench, EvalSettings(budgets=[0], temperature=0.9, samples=2, pass_k=[1]),
                 results_path=str(part), progress=False)
    # a finished run generates nothing more
    again = FakeGenerate()
    evaluate(again, bench, settings, results_path=str(part), progress=False)
    assert again.calls == []


def test_corrupt_results_line_in_the_middle_is_an_error(tmp_path):
    bench = [load_benchmark("arithmetic", limit=4)]
    path = tmp_path / "r.jsonl"
    evaluate(FakeGenerate(), bench, EvalSettings(budgets=[0]), results_path=str(path), progress=False)
    lines = path.read_text().splitlines(True)
    lines[2] = "garbage\n"
    path.write_text("".join(lines))
    with pytest.raises(ConfigError, match=r"r.jsonl:3: not a results line"):
        evaluate(FakeGenerate(), bench, EvalSettings(budgets=[0]), results_path=str(path), progress=False)


def test_pass_at_k():
    assert pass_at_k(4, 0, 1) == 0 and pass_at_k(4, 4, 2) == 1
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25) and pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert pass_at_k(5, 2, 3) == pytest.approx(1 - 1 / 10)


@pytest.mark.parametrize("kwargs,match", [
    (dict(budgets=[]), "at least one"), (dict(budgets=[-1]), "not a token count"),
    (dict(samples=4), "greedy decoding gives the same response"),
    (dict(samples=2, temperature=1.0, pass_k=[4]), "every k must be in 1..samples"),
])
def test_settings_checked(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        EvalSettings(**kwargs).check()


@pytest.mark.parametrize("line,match", [
    ("{not json", "invalid JSON"), ('{"question": "q"}', "needs 'answer'"), ('{"answer": "1"}', "'question'"),
    ('{"question": "q", "answer": "E", "choices": ["a", "b"], "grader": "choice"}', "not one of the option letters"),
    ('{"question": "q", "answer": "A", "grader": "choice"}', "needs 'choices'"),
    ('{"question": "q", "answer": "1", "grader": "fuzzy"}', "grader 'fuzzy'"),
    ('{"question": "q", "answer": "1", "images": ["nope.png"]}', "does not exist"),
    ('{"messages": [{"role": "assistant", "content": "x"}], "answer": "1"}', "end with a user turn"),
    ('{"question": "q", "solution": "no box"}', "no \\\\boxed"),
    ('{"id": 1, "question": "q", "answer": "1"}', "id '1' already used at line 1"),
])
def test_bad_items_named_by_file_and_line(tmp_path, line, match):
    path = tmp_path / "bench.jsonl"
    path.write_text('{"id": 1, "question": "fine", "answer": "2"}\n\n' + line + "\n")
    with pytest.raises(ConfigError, match=match) as e:
        load_benchmark(str(path))
    assert f"{path}:3" in str(e.value)


def test_public_set_spellings(tmp_path):
    path = tmp_path / "mix.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"question": "q1", "answer": "Natalia sold 48/2 = 24 clips.\n#### 72"},  # GSM8K
        {"problem": "q2", "solution": "so it is $\\boxed{\\frac{1}{2}}$."},  # MATH
        {"question": "q3", "options": ["x", "y", "z"], "answer": 2, "grader": "choice"},
    ]) + "\n")
    items = load_benchmark(f"mine={path}").items
    assert [i.answer for i in items] == [["72"], ["\\frac{1}{2}"], ["C"]]
    assert items[2].messages[-1]["content"] == "q3\nA. x\nB. y\nC. z"


def test_bundled_sets_load():
    sizes = {name: len(load_benchmark(name).items) for name in BUNDLED}
    assert sizes == {"arithmetic": 160, "word_problems": 120, "choice": 60, "images": 12}
    assert {i.level for i in load_benchmark("arithmetic").items} == {1, 2, 3, 4}


def test_bundled_sets_are_what_the_script_writes(tmp_path):
    subprocess.run([sys.executable, "-m", "megatron_bluelm.eval.make_sets", "--out", str(tmp_path)], check=True,
                   cwd=ROOT, capture_output=True)
    assets = os.path.join(ROOT, "megatron_bluelm", "assets", "eval")
    for name in sorted(os.listdir(assets)):
        with open(os.path.join(assets, name), "rb") as a, open(tmp_path / name, "rb") as b:
            assert a.read() == b.read(), name


def test_table_plots_and_compare(tmp_path):
    bench = [load_benchmark("arithmetic", limit=6), load_benchmark(f"other={BUNDLED_PATH}", limit=6)]
    summary = evaluate(FakeGenerate(), bench, EvalSettings(budgets=[0, 1, 3, None]), progress=False)
    table = format_table(summary)
    assert "| arithmetic | nothink | nothink | 6 |" in table and "| other | none | think |" in table
    png = budget_plot([("toy", summary)], str(tmp_path / "b.png"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(png) > 10_000
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "summary.json").write_text(json.dumps(summary))
    out = subprocess.run([sys.executable, "tools/evaluate.py", "--compare", str(tmp_path / "a"),
                          str(tmp_path / "a" / "summary.json"), "--labels", "x,y", "--plot", str(tmp_path / "c.png")],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert os.path.getsize(tmp_path / "c.png") > 10_000


BUNDLED_PATH = os.path.join(ROOT, "megatron_bluelm", "assets", "eval", "arithmetic.jsonl")


def test_metrics_plot_panels(tmp_path):
    rows = [{"step": s, "split": "train", "loss": 5.0 / s, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 100.0}
            for s in range(1, 11)]
    rows += [{"step": 5, "split": "eval", "arithmetic/nothink/accuracy": 0.2, "arithmetic/8/accuracy": 0.5},
             {"step": 10, "split": "eval", "arithmetic/nothink/accuracy": 0.3, "arithmetic/8/accuracy": 0.7}]
    rl = [{"step": s, "split": "rl", "reward": s / 10, "kl": 0.01 * s, "response_len": 10.0 + s} for s in range(1, 6)]
    drawn = metrics_plot([("sft", rows), ("rl", rl)], str(tmp_path / "m.png"))
    assert drawn == ["loss", "learning rate", "grad norm", "throughput", "RL reward", "RL KL", "RL response length",
                     "eval accuracy"]
    assert os.path.getsize(tmp_path / "m.png") > 10_000
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "{bad\n")
    out = subprocess.run([sys.executable, "tools/plot_metrics.py", str(tmp_path / "run"), "--output",
                          str(tmp_path / "x.png")], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and f"{tmp_path / 'run' / 'metrics.jsonl'}:13: invalid JSON" in out.stderr
