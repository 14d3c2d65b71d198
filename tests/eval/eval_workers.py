"""Worker for the end-to-end evaluation test (module level: spawned by run_distributed): a few SFT
steps on the bundled arithmetic split with periodic benchmark evaluation, then tools/evaluate.py on
the checkpoint: a full sweep, a sweep interrupted (results cut after the first batch, the next
write torn) and run again, and the sweep on the checkpoint's HF export."""
import gzip
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _preprocess(tmp: str, n: int) -> str:
    from megatron_bluelm.config.data import BUNDLED_TOKENIZER
    from megatron_bluelm.data.sft import ChatOptions, preprocess_chat

    src = os.path.join(ROOT, "megatron_bluelm", "assets", "eval", "arithmetic_train.jsonl.gz")
    with gzip.open(src, "rt") as f, open(os.path.join(tmp, "chats.jsonl"), "w") as out:
        for _, line in zip(range(n), f):
            out.write(line)
    preprocess_chat(ChatOptions([os.path.join(tmp, "chats.jsonl")], os.path.join(tmp, "sft"), BUNDLED_TOKENIZER,
                                think_ratio=0.7, budget_ratio=0.3))
    return os.path.join(tmp, "sft_text_document")


def _tool(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_tool", os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sft_then_evaluate(tmp: str, eval_argv: list, cut_rows: int) -> dict:
    from megatron_bluelm.config.loader import load_config
    from megatron_bluelm.stages.sft import run_sft

    evaluate_cli, convert_cli = _tool("evaluate"), _tool("convert_checkpoint")
    prefix = _preprocess(tmp, 200)
    overrides = ["--data.prefix", prefix, "--data.seq_length", "64", "--training.micro_batch_size", "2",
                 "--training.global_batch_size", "2", "--training.train_steps", "4", "--schedule.warmup_steps", "1",
                 "--training.eval_interval", "2", "--training.eval_benchmarks", "arithmetic",
                 "--training.eval_limit", "2", "--training.eval_budgets", "0,2", "--training.eval_max_new_tokens", "8",
                 "--training.eval_answer_tokens", "4", "--logging.output_dir", os.path.join(tmp, "run"),
                 "--logging.log_interval", "2", "--checkpoint.save", os.path.join(tmp, "ckpt"),
                 "--model.backend", "torch"]
    run_sft(load_config(os.path.join(ROOT, "examples", "eval_toy_sft.yaml"), overrides))
    ckpt = ["--checkpoint", os.path.join(tmp, "ckpt"), "--no-progress"]
    full, part = os.path.join(tmp, "full"), os.path.join(tmp, "part")
    assert evaluate_cli.main(ckpt + eval_argv + ["--output", full]) == 0
    assert evaluate_cli.main(ckpt + eval_argv + ["--output", part]) == 0
    results = os.path.join(part, "results.jsonl")
    with open(results) as f:
        lines = f.readlines()
    with open(results, "w") as f:  # an interruption: one batch written, the next write torn
        f.writelines(lines[:1 + cut_rows])
        f.write(lines[1 + cut_rows][:40])
    os.remove(os.path.join(part, "summary.json"))
    assert evaluate_cli.main(ckpt + eval_argv + ["--output", part]) == 0
    hf = os.path.join(tmp, "hf")  # the same sweep on the HF export (arithmetic only: the slow path)
    convert_cli.main(["mcore-to-hf", "--load", os.path.join(tmp, "ckpt"), "--out", hf])
    i = eval_argv.index("word_problems")
    hf_argv = eval_argv[:i - 1] + eval_argv[i + 1:]
    assert evaluate_cli.main(["--hf", hf, "--no-progress", "--output", os.path.join(tmp, "hf_eval")] + hf_argv) == 0
    out = {}
    for name in ("full", "part", "hf_eval"):
        with open(os.path.join(tmp, name, "summary.json")) as f:
            out[name] = json.load(f)
        with open(os.path.join(tmp, name, "results.jsonl")) as f:
            out[name + "_rows"] = [json.loads(x) for x in f][1:]
    return out


def evaluate_main(argv: list) -> dict:
    """tools/evaluate.py on this rank (every rank of the model runs it; rank 0 writes)."""
    assert _tool("evaluate").main(argv) == 0
    return {}


def image_sweep(budgets: list) -> list:
    """The bundled image questions on a randomly initialized tiny multimodal model (the wiring of
    images through the harness and the engine, not accuracy)."""
    from megatron_bluelm.config.loader import load_config
    from megatron_bluelm.data.tokenizer import load_tokenizer
    from megatron_bluelm.eval.benchmarks import load_benchmark
    from megatron_bluelm.eval.generation import EngineGenerate
    from megatron_bluelm.eval.harness import EvalSettings, evaluate
    from megatron_bluelm.inference.engine import TextGenerator
    from megatron_bluelm.inference.model import build_inference_model

    cfg = load_config(None, ["--vision.preset", "vit-tiny", "--vision.max_tiles", "1", "--vision.thumbnail", "false",
                             "--data.seq_length", "512", "--model.backend", "torch"])
    tok = load_tokenizer(cfg.data.tokenizer_model)
    im = build_inference_model(cfg, tok.vocab_size, image_token_id=tok.special_ids["<image>"])
    settings = EvalSettings(budgets=budgets, max_new_tokens=8, answer_tokens=2, batch_size=2)
    summary = evaluate(EngineGenerate(TextGenerator(im, tok), settings), [load_benchmark("images", limit=2)],
                       settings, progress=False)
    return summary["benchmarks"]["images"]["budgets"]
