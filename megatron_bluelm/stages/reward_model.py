"""Reward-model stage: a Bradley-Terry reward model on preference pairs, from an SFT checkpoint.

    python -m megatron_bluelm.stages.reward_model --config examples/reward_model_tiny.yaml
    torchrun --nproc-per-node 4 -m megatron_bluelm.stages.reward_model --config my_rm.yaml \\
        --pretrained outputs/sft/ckpt --parallel.tp 2 --parallel.pp 2 --rl.preference_data prefs.jsonl

The model is our decoder with a scalar head in place of the vocabulary projection
(rl/reward_model.py); ``--pretrained`` loads an SFT / pretrain checkpoint's decoder (the head starts
fresh). Loss per pair: ``-log sigmoid(r_chosen - r_rejected)``, averaged over the global batch's
pairs. The data (``rl.preference_data``) is a JSONL of ``{"prompt": ...}`` or ``{"messages": [...]}``
with ``"chosen"`` and ``"rejected"`` answers, or ``toy`` (a built-in preference for tests and the
recipe). ``rl.preference_holdout`` of the pairs are held out: their accuracy (chosen scored higher)
is the evaluation. It runs in the shared loop (logging, NaN policy, checkpoints; TP x PP x DP);
``training.global_batch_size`` and ``micro_batch_size`` count rows (two per pair), so both are even.
The RL stage loads the saved checkpoint with ``rl.reward_model`` for its ``model`` reward.
"""
from __future__ import annotations

import argparse
import random
from functools import partial
from typing import Callable, Optional, Sequence

import torch

from megatron_bluelm.config.errors import ConfigError
from megatron_bluelm.config.loader import load_config
from megatron_bluelm.config.schema import RunConfig

TOY_GOOD = ("great", "good", "nice", "fine", "clear", "kind", "right", "useful")
TOY_BAD = ("awful", "bad", "rude", "wrong", "poor", "ugly", "vague", "useless")


def toy_pairs(n: int, seed: int) -> list[dict]:
    """A surface preference a tiny model learns in a few steps: answers made of 'good' words are
    preferred over answers made of 'bad' words, whatever the prompt."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        good = " ".join(rng.choice(TOY_GOOD) for _ in range(rng.randint(1, 3)))
        bad = " ".join(rng.choice(TOY_BAD) for _ in range(rng.randint(1, 3)))
        out.append({"prompt": f"review {a} {b}:", "chosen": good, "rejected": bad})
    return out


def load_pairs(spec: str, seed: int) -> list[dict]:
    if spec == "toy":
        return toy_pairs(512, seed)
    from megatron_bluelm.data.jsonl import read_json_records

    pairs = []
    for lineno, rec in read_json_records(spec, f"rl.preference_data: no such file '{spec}'"):
        if not isinstance(rec, dict) or ("prompt" not in rec and "messages" not in rec) \
                or not isinstance(rec.get("chosen"), str) or not isinstance(rec.get("rejected"), str):
            raise ConfigError(f"{spec}:{lineno}: a pair needs 'prompt' or 'messages', and 'chosen' and "
                              "'rejected' answers (strings)")
        pairs.append(rec)
    if len(pairs) < 2:
        raise ConfigError(f"rl.preference_data: '{spec}' has {len(pairs)} pair(s); need at least 2")
    return pairs


def check_config(cfg: RunConfig, dp: int) -> None:
    t = cfg.training
    if not cfg.rl.preference_data:
        raise ConfigError("rl.preference_data: the reward-model stage needs preference pairs (a JSONL or 'toy')")
    if t.micro_batch_size % 2 or t.global_batch_size % 2:
        raise ConfigError(f"training.micro_batch_size ({t.micro_batch_size}) and global_batch_size "
                          f"({t.global_batch_size}) count rows, two per pair: both must be even")
    if cfg.vision.enabled:
        raise ConfigError("vision.preset: the reward model is a text model (it scores answers)")
    if not 0 < cfg.rl.preference_holdout < 1:
        raise ConfigError(f"rl.preference_holdout: must be in (0, 1), got {cfg.rl.preference_holdout}")


class PairRows:
    """Pairs as token rows [chosen, rejected, chosen, rejected, ...] (rl/reward_model.score_tokens)."""

    def __init__(self, pairs: list, tok, seq_length: int):
        from megatron_bluelm.rl.reward_model import score_tokens

        self.rows = [(score_tokens(tok, p, p["chosen"], seq_length), score_tokens(tok, p, p["rejected"], seq_length))
                     for p in pairs]
        self.seq_length, self.pad = seq_length, tok.pad

    def micro_batch(self, pair_ids: list[int]) -> dict:
        from megatron_bluelm.rl.reward_model import rows_to_batch

        rows = [r for i in pair_ids for r in self.rows[i % len(self.rows)]]
        return rows_to_batch(rows, self.seq_length, self.pad)

    def iterator(self, consumed_rows: int, mbs_rows: int, dp_rank: int, dp: int, gbs_rows: int):
        """Micro-batches of this DP rank from global row ``consumed_rows`` on (exact resume)."""
        pairs_per_step, mbs = gbs_rows // 2, mbs_rows // 2
        step = consumed_rows // gbs_rows
        while True:
            base = step * pairs_per_step + dp_rank * (pairs_per_step // dp)
            for j in range(0, pairs_per_step // dp, mbs):
                yield self.micro_batch(list(range(base + j, base + j + mbs)))
            step += 1


def _loss(mb: dict, output: torch.Tensor):
    from megatron_bluelm.rl.reward_model import last_token_scores

    scores = last_token_scores(output, mb["lengths"])
    chosen, rejected = scores[0::2], scores[1::2]
    loss = -torch.nn.functional.logsigmoid(chosen - rejected).sum()
    pairs = torch.tensor(chosen.numel(), device=output.device)
    report = torch.stack([loss.detach(), pairs.float(), (chosen > rejected).float().sum(),
                          (chosen - rejected).detach().sum()])
    return loss, pairs.to(torch.int), {"rm": report}


def _forward_step(device, data_iterator, model):
    from megatron_bluelm.rl.reward_model import _forward

    out, mb = _forward(device, data_iterator, model)
    return out, partial(_loss, mb)


def _reduce(reports: list, device) -> Optional[dict]:
    import torch.distributed as dist
    from megatron.core import parallel_state

    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    total = torch.zeros(4, dtype=torch.float64, device=device)
    for r in reports:
        total += r["rm"].double().to(device)
    dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    n = max(total[1].item(), 1.0)
    return {"loss": total[0].item() / n, "pairs": int(total[1].item()), "accuracy": total[2].item() / n,
            "margin": total[3].item() / n}


def rm_step(run, iterators: list):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_bluelm.training.step import StepResult

    t = run.cfg.training
    for chunk in run.model:
        chunk.zero_grad_buffer()
    run.optimizer.zero_grad()
    n_mb = t.global_batch_size // (t.micro_batch_size * run.info.dp)
    reports = get_forward_backward_func()(
        forward_step_func=partial(_forward_step, run.info.device), data_iterator=iterators[0], model=run.model,
        num_microbatches=n_mb, seq_length=run.cfg.data.seq_length, micro_batch_size=t.micro_batch_size,
        forward_only=False)
    ok, grad_norm, _ = run.optimizer.step()
    if ok:
        run.scheduler.step(increment=1)
    stats = _reduce(reports, run.info.device)
    return StepResult(loss=None if stats is None else stats["loss"], tokens=0 if stats is None else stats["pairs"],
                      grad_norm=grad_norm, skipped=not ok,
                      metrics={} if stats is None else {"accuracy": stats["accuracy"], "margin": stats["margin"]})


@torch.no_grad()
def holdout_accuracy(run, held: PairRows) -> dict:
    """Share of held-out pairs whose chosen answer scores higher (every rank gets the value)."""
    from megatron_bluelm.rl.reward_model import score_rows

    rows = [r for pair in held.rows for r in pair]
    scores = score_rows(run.model, rows, seq_length=held.seq_length, mbs=run.cfg.training.micro_batch_size,
                        pad=held.pad, device=run.info.device)
    for chunk in run.model:
        chunk.train()
    return {"pair_accuracy": float((scores[0::2] > scores[1::2]).float().mean()),
            "margin": float((scores[0::2] - scores[1::2]).mean())}


def run_reward_model(cfg: RunConfig, pretrained: Optional[str] = None, collect: Optional[Callable] = None) -> dict:
    from megatron.core import parallel_state

    from megatron_bluelm.data import load_tokenizer
    from megatron_bluelm.models.counting import DecoderShape, train_flops_per_token
    from megatron_bluelm.rl.reward_model import build_reward_model, load_backbone
    from megatron_bluelm.training.loop import prepare_config, run_stage, setup_run, train

    dp = prepare_config(cfg)
    check_config(cfg, dp)
    tok = load_tokenizer(cfg.data.tokenizer_model)
    vocab = cfg.model.vocab_size or tok.vocab_size
    pairs = load_pairs(cfg.rl.preference_data, cfg.training.seed)
    n_held = max(1, int(len(pairs) * cfg.rl.preference_holdout))
    train_rows = PairRows(pairs[:-n_held], tok, cfg.data.seq_length)
    held = PairRows(pairs[-n_held:], tok, cfg.data.seq_length)
    flops = train_flops_per_token(DecoderShape.from_model_config(cfg.model, vocab), cfg.data.seq_length)
    run = setup_run(cfg, partial(build_reward_model, cfg, vocab), flops)
    run.stage = "reward_model"
    evals: list = []

    def on_eval(run) -> dict:
        evals.append({"step": run.step, **holdout_accuracy(run, held)})
        return {"holdout/accuracy": evals[-1]["pair_accuracy"], "holdout/margin": evals[-1]["margin"]}

    def body(run, checkpointer):
        t = cfg.training
        if run.step == 0:
            evals.append({"step": 0, **holdout_accuracy(run, held)})
        make = lambda consumed: [train_rows.iterator(  # noqa: E731
            consumed, t.micro_batch_size, parallel_state.get_data_parallel_rank(), run.info.dp, t.global_batch_size)]
        train(run, make, on_step_end=checkpointer.on_step_end, on_eval=on_eval, step_fn=rm_step)

    def initial(run):
        path = load_backbone(run.model, pretrained)
        run.optimizer.reload_model_params()
        run.logger.print(f"reward model: decoder weights from '{path}', new scalar head")

    result = run_stage(run, body, collect, initial_weights=initial if pretrained else None)
    result["eval"] = evals
    result["history"] = run.history
    return result


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[RunConfig, Optional[str]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="YAML recipe (examples/reward_model_tiny.yaml)")
    ap.add_argument("--pretrained", default=None, help="SFT / pretrain checkpoint whose decoder the model starts from")
    args, overrides = ap.parse_known_args(argv)
    return load_config(args.config, overrides), args.pretrained


def main(argv: Optional[Sequence[str]] = None) -> None:
    from megatron_bluelm.training.loop import cli

    cli(lambda: run_reward_model(*parse_args(argv)))


if __name__ == "__main__":
    main()
