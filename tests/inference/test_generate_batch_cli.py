"""tools/generate.py batch mode (--input prompts.jsonl --output out.jsonl) on a tiny text checkpoint:
per-line settings end to end, SFT's forced close by default, resume after a killed run (torn last
line) gives the records of an uninterrupted run (greedy and sampled), bad lines named with exit 2."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
from distributed import run_distributed

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GENERATE = os.path.join(REPO, "tools", "generate.py")

LINES = [
    {"id": "a", "prompt": "reverse: cat sun tree", "thinking_budget": 2, "max_new_tokens": 24, "n": 2},
    {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}],
     "max_new_tokens": 8},
    None,  # a blank line: skipped, but counted for the default id (the line number)
    {"id": 7, "prompt": "def main(", "thinking_budget": 0, "max_new_tokens": 5},
    {"id": "b", "prompt": "count: one two", "n": 3, "max_new_tokens": 6},
]
EXPECTED_KEYS = {("a", 0), ("a", 1), (2, 0), (7, 0), ("b", 0), ("b", 1), ("b", 2)}
LIMITS = {"a": 24, 2: 8, 7: 5, "b": 6}


def _cli():
    spec = importlib.util.spec_from_file_location("generate_batch_cli", GENERATE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_input(path, lines):
    with open(path, "w") as f:
        for rec in lines:
            f.write("\n" if rec is None else (rec if isinstance(rec, str) else json.dumps(rec)) + "\n")
    return str(path)


def _records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _by_key(records):
    return {(r["id"], r["sample"]): r for r in records}


def _cut(src, dst, keep):
    """A killed run: ``keep`` complete lines, then half of the next one (no newline)."""
    with open(src) as f:
        lines = f.readlines()
    with open(dst, "w") as f:
        f.writelines(lines[:keep])
        f.write(lines[keep][:len(lines[keep]) // 2])


def batch_runs(tmp):
    """One process (imports once): a 1-step tiny pretrain checkpoint, then the batch runs."""
    from megatron_bluelm.config.loader import load_config
    from megatron_bluelm.parallel.setup import teardown
    from megatron_bluelm.stages.pretrain import run_pretrain

    ckpt = os.path.join(tmp, "ckpt")
    run_pretrain(load_config(None, [
        "--data.mock", "true", "--data.seq_length", "64", "--training.micro_batch_size", "2",
        "--training.global_batch_size", "2", "--training.eval_interval", "0", "--training.train_steps", "1",
        "--schedule.warmup_steps", "0", "--logging.tensorboard", "false",
        "--logging.output_dir", os.path.join(tmp, "log"), "--checkpoint.save", ckpt]))
    teardown()
    cli = _cli()
    inp = _write_input(os.path.join(tmp, "in.jsonl"), LINES)
    base = ["--checkpoint", ckpt, "--chat", "--input", inp, "--logprobs", "--no-progress", "--chunk-size", "3"]
    rc = {}

    def batch(name, *extra):
        rc[name] = cli.main(base + ["--output", os.path.join(tmp, name + ".jsonl"), *extra])

    sampled = ["--temperature", "0.9", "--seed", "5"]
    batch("greedy")
    _cut(os.path.join(tmp, "greedy.jsonl"), os.path.join(tmp, "greedy_resumed.jsonl"), 3)
    batch("greedy_resumed")
    batch("sampled", *sampled)
    _cut(os.path.join(tmp, "sampled.jsonl"), os.path.join(tmp, "sampled_resumed.jsonl"), 4)
    batch("sampled_resumed", *sampled)
    shutil.copy(os.path.join(tmp, "sampled.jsonl"), os.path.join(tmp, "complete.jsonl"))
    batch("complete", *sampled)  # nothing left to do
    # the same prompt through the single-prompt CLI: batch mode adds no difference of its own
    single = cli.run(cli.parse_args(["--checkpoint", ckpt, "--chat", "--prompt", LINES[0]["prompt"],
                                     "--thinking-budget", "2", "--max-new-tokens", "24"]))
    teardown()
    return {"rc": rc, "single": single, "ckpt": ckpt}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("gen_batch"))
    out = run_distributed(batch_runs, 1, tmp)[0]
    out["tmp"] = tmp
    return out


def test_batch_writes_every_sample_with_its_line_settings(runs):
    assert runs["rc"]["greedy"] == 0 and runs["rc"]["sampled"] == 0
    for name in ("greedy", "sampled"):
        records = _records(os.path.join(runs["tmp"], name + ".jsonl"))
        assert len(records) == len(EXPECTED_KEYS) and set(_by_key(records)) == EXPECTED_KEYS
        for r in records:
            assert set(r) >= {"text", "tokens", "prompt_tokens", "finish_reason", "thinking_tokens", "forced_close",
                              "warnings", "token_ids", "logprobs", "forced"}
            assert r["tokens"] == len(r["token_ids"]) == len(r["logprobs"]) == len(r["forced"]) <= LIMITS[r["id"]]
            assert r["finish_reason"] in ("stop", "length")
        by = _by_key(records)
        assert by[(7, 0)]["thinking_tokens"] == 0  # budget 0: the non-thinking prompt
        assert all(by[("a", k)]["thinking_tokens"] <= 2 for k in (0, 1))
    # the samples of one prompt differ when sampling, and equal each other when greedy
    greedy, sampled = (_by_key(_records(os.path.join(runs["tmp"], n + ".jsonl"))) for n in ("greedy", "sampled"))
    assert greedy[("b", 0)]["token_ids"] == greedy[("b", 1)]["token_ids"] == greedy[("b", 2)]["token_ids"]
    assert len({tuple(sampled[("b", k)]["token_ids"]) for k in range(3)}) > 1


def test_budget_forces_sfts_close_by_default(runs):
    from megatron_bluelm.data.chat_template import DEFAULT_BRIDGE, budget_close_ids
    from megatron_bluelm.data.tokenizer import load_tokenizer
    from megatron_bluelm.inference.loading import checkpoint_run_config

    tok = load_tokenizer(checkpoint_run_config(runs["ckpt"]).data.tokenizer_model)
    close = budget_close_ids(tok, DEFAULT_BRIDGE)
    forced = [r for r in _records(os.path.join(runs["tmp"], "greedy.jsonl")) if r["forced_close"]]
    assert forced, "the random tiny model never closes its thinking within 2 tokens: the budget must force it"
    for r in forced:
        assert [t for t, f in zip(r["token_ids"], r["forced"]) if f] == close
    # the single-prompt CLI gives the batch's text for the same prompt and settings
    assert runs["single"][0]["text"] == _by_key(forced)[("a", 0)]["text"]


@pytest.mark.parametrize("name", ["greedy", "sampled"])
def test_resume_after_a_torn_write_gives_the_uninterrupted_records(runs, name):
    assert runs["rc"][name + "_resumed"] == 0
    full = _records(os.path.join(runs["tmp"], name + ".jsonl"))
    resumed = _records(os.path.join(runs["tmp"], name + "_resumed.jsonl"))  # every line parses: torn one cut
    assert len(resumed) == len(full)
    full, resumed = _by_key(full), _by_key(resumed)
    assert set(resumed) == set(full)
    for key, r in resumed.items():
        # log-probs are fp32 sums over a batch of another composition: equal to rounding
        assert r.pop("logprobs") == pytest.approx(full[key].pop("logprobs"), abs=1e-4)
        assert r == full[key]


def test_tp2_under_torchrun_resumes_and_writes_each_sample_once(runs):
    out = os.path.join(runs["tmp"], "tp2.jsonl")
    _cut(os.path.join(runs["tmp"], "greedy.jsonl"), out, 2)  # rank 0's view of it goes to rank 1
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", GENERATE, "--checkpoint",
           runs["ckpt"], "--chat", "--input", os.path.join(runs["tmp"], "in.jsonl"), "--output", out, "--tp", "2",
           "--logprobs", "--no-progress", "--chunk-size", "3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tp2 = _records(out)
    assert len(tp2) == len(EXPECTED_KEYS)  # rank 0 alone writes, and only what was missing
    greedy = _by_key(_records(os.path.join(runs["tmp"], "greedy.jsonl")))
    assert {k: r["token_ids"] for k, r in _by_key(tp2).items()} == {k: r["token_ids"] for k, r in greedy.items()}


def test_complete_output_is_left_alone(runs):
    assert runs["rc"]["complete"] == 0
    with open(os.path.join(runs["tmp"], "sampled.jsonl")) as a, open(os.path.join(runs["tmp"], "complete.jsonl")) as b:
        assert a.read() == b.read()


BAD = [
    ("{not json", "not JSON"),
    ({"messages": []}, '"messages" must be a non-empty list'),
    ({"id": "x"}, 'needs exactly one of "prompt" (text) and "messages"'),
    ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "needs exactly one of"),
    ({"prompt": 3}, '"prompt" must be a non-empty string'),
    ({"prompt": "a", "max_new_tokens": "8"}, '"max_new_tokens" must be an integer > 0, got "8"'),
    ({"prompt": "a", "n": 0}, '"n" must be an integer > 0'),
    ({"prompt": "a", "thinking_budget": True}, '"thinking_budget" must be an integer >= 0'),
    ({"prompt": "a", "max_tokens": 8}, "unknown field(s) 'max_tokens'"),
    ({"id": [1], "prompt": "a"}, '"id" must be a string or an integer'),
    ({"prompt": "a", "messages_": 1}, "unknown field(s) 'messages_'"),
    ({"messages": [{"role": "robot", "content": "a"}]}, '"messages"[0] must be'),
    ([1, 2], "a JSON object is needed, got list"),
    ({"id": "dup", "prompt": "a"}, None),
    ({"id": "dup", "prompt": "b"}, 'id "dup" already used at'),
]


def test_bad_lines_are_named_with_exit_2(runs, tmp_path, capsys):
    inp = _write_input(tmp_path / "bad.jsonl", [b[0] for b in BAD])
    out = tmp_path / "out.jsonl"
    assert _cli().main(["--checkpoint", runs["ckpt"], "--input", inp, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    expected = [(no, msg) for no, (_, msg) in enumerate(BAD, start=1) if msg is not None]
    assert f"{len(expected)} bad line(s) in --input '{inp}'" in err
    for no, msg in expected:
        line = next(x for x in err.splitlines() if x.strip().startswith(f"{inp}:{no}:"))
        assert msg in line, (no, line)
    assert not out.exists()


def test_lines_that_do_not_fit_the_checkpoint_are_named(runs, tmp_path, capsys):
    inp = _write_input(tmp_path / "in.jsonl", [{"prompt": "fine"}, {"prompt": "word " * 200},
                                               {"prompt": "<image> hi", "images": ["cat.jpg"]}])
    assert _cli().main(["--checkpoint", runs["ckpt"], "--input", inp, "--output", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert f"{inp}:2: the prompt has" in err and "the model's context is 64" in err
    assert f"{inp}:3: 1 image(s), but checkpoint" in err and "is a text decoder" in err
    assert f"{inp}:1:" not in err


def test_damaged_output_line_is_named_not_dropped(runs, tmp_path, capsys):
    inp = _write_input(tmp_path / "in.jsonl", [{"prompt": "fine"}])
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": 1, "sample": 0, "text": "x"}\n{"text": "no id"}\n')
    assert _cli().main(["--checkpoint", runs["ckpt"], "--input", inp, "--output", str(out)]) == 2
    assert f"{out}:2: not a sample record of this tool" in capsys.readouterr().err


@pytest.mark.parametrize("argv, expected", [
    (["--input", "in.jsonl"], "--input needs --output"),
    (["--input", "in.jsonl", "--output", "o.jsonl", "--prompt", "hi"], "--prompt and --input exclude each other"),
    (["--input", "in.jsonl", "--output", "o.jsonl", "--image", "x.jpg"], "--image is for --prompt"),
    (["--prompt", "hi", "--output", "o.jsonl"], "--output is for batch mode"),
    ([], "give --prompt (repeatable) or --input"),
])
def test_argument_errors_exit_2(capsys, argv, expected):
    with pytest.raises(SystemExit) as e:
        _cli().parse_args(["--checkpoint", "ckpt", *argv])
    assert e.value.code == 2 and expected in capsys.readouterr().err


def test_batch_mode_refuses_data_parallel_replicas(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    argv = ["--checkpoint", "ckpt", "--input", "in.jsonl", "--output", str(tmp_path / "o.jsonl"), "--tp", "2"]
    assert _cli().main(argv) == 2
    assert "batch mode runs one model replica: launch --tp x --pp = 2 process(es), not 4" in capsys.readouterr().err


def test_missing_input_file_is_named(tmp_path, capsys):
    missing = str(tmp_path / "nowhere.jsonl")
    assert _cli().main(["--checkpoint", "ckpt", "--input", missing, "--output", str(tmp_path / "o.jsonl")]) == 2
    assert f"--input '{missing}': cannot read it" in capsys.readouterr().err
