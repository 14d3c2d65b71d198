"""Worker functions for the multi-process RL tests (importable by spawned ranks)."""
import torch


def tiny_overrides(extra=()):
    return ["--data.mock", "true", "--data.seq_length", "16", "--training.micro_batch_size", "4",
            "--training.global_batch_size", "8", "--training.eval_interval", "0", "--schedule.style", "constant",
            "--schedule.warmup_steps", "0", "--optimizer.lr", "1e-3", "--optimizer.min_lr", "1e-3",
            "--logging.tensorboard", "false", "--logging.output_dir", "outputs/test_rl", *extra]


def first_update_stats(extra=()):
    """Old / reference log-probs then one GRPO update on random rows with hand-made advantages."""
    from megatron_bluelm.config.loader import load_config
    from megatron_bluelm.models.decoder import build_decoder
    from megatron_bluelm.parallel.setup import teardown
    from megatron_bluelm.rl.loss import GRPOSettings
    from megatron_bluelm.rl.rollout import training_rows
    from megatron_bluelm.rl.trainer import micro_batches, policy_update, sequence_logprobs
    from megatron_bluelm.stages.rl import build_reference
    from megatron_bluelm.training.loop import prepare_config, setup_run

    cfg = load_config(None, tiny_overrides(extra))
    prepare_config(cfg)
    build_chunk = lambda **kw: build_decoder(cfg, 8192, **kw)  # noqa: E731
    run = setup_run(cfg, build_chunk, 1.0)
    try:
        gen = torch.Generator().manual_seed(0)
        prompts = [torch.randint(20, 8000, (5,), generator=gen).tolist() for _ in range(8)]
        responses = [torch.randint(20, 8000, (1 + i % 4,), generator=gen).tolist() for i in range(8)]
        rows = training_rows(prompts, responses, 16, pad_id=0)
        adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 0.0, 0.0])
        batches = micro_batches(rows, {"advantages": adv, "keep": torch.ones(8)}, 4)
        ref_model = build_reference(run, build_chunk)
        old = sequence_logprobs(run.model, batches, 16, 4, run.info.device)
        ref = sequence_logprobs(ref_model, batches, 16, 4, run.info.device)
        for i, mb in enumerate(batches):
            mb["old_logp"] = old[i] if old is not None else None
            mb["ref_logp"] = ref[i] if ref is not None else None
        first = policy_update(run.model, run.optimizer, run.scheduler, batches, GRPOSettings(kl_coef=0.1),
                              seq_length=16, mbs=4, device=run.info.device)
        old2 = sequence_logprobs(run.model, batches, 16, 4, run.info.device)  # after the first update
        second = policy_update(run.model, run.optimizer, run.scheduler, batches, GRPOSettings(kl_coef=0.1),
                               seq_length=16, mbs=4, device=run.info.device)
        moved = delta = None
        if old2 is not None:
            moved = max((a - b).abs().max().item() for a, b in zip(old, old2))
            mask = rows["loss_mask"]
            before, after = torch.cat(old), torch.cat(old2)
            delta = (((after - before) * mask).sum(1) / mask.sum(1)).tolist()  # per-sample mean change
        return {"first": first, "second": second, "moved": moved, "delta": delta}
    finally:
        teardown()


def toy_run(extra=()):
    from megatron_bluelm.config.loader import load_config
    from megatron_bluelm.stages.rl import run_rl

    cfg = load_config("examples/rl_toy.yaml", ["--logging.output_dir", "outputs/test_rl_toy", *extra])
    return run_rl(cfg)["rl"]


def reward_model_checks():
    """The scalar head scores rows, ignores padding, learns a preference, plugs into HybridReward."""
    from megatron_bluelm.config.loader import load_config
    from megatron_bluelm.config.validate import validate
    from megatron_bluelm.data import load_tokenizer
    from megatron_bluelm.models.decoder import build_decoder
    from megatron_bluelm.models.init import init_decoder_
    from megatron_bluelm.parallel.setup import setup_parallel, teardown
    from megatron_bluelm.rl.reward_model import ScalarRewardModel, pairwise_loss
    from megatron_bluelm.rl.rewards import HybridReward

    cfg = load_config(None, tiny_overrides())
    validate(cfg, 1)
    setup_parallel(1, 1, None, 1, 0)
    try:
        tok = load_tokenizer(cfg.data.tokenizer_model)
        decoder = build_decoder(cfg, tok.vocab_size)
        init_decoder_(decoder, seed=0, std=0.02, num_layers=cfg.model.num_layers)
        rm = ScalarRewardModel(decoder)
        a = torch.tensor([[5, 6, 7, 0, 0], [5, 6, 7, 9, 9]])
        scores = rm(a, torch.tensor([3, 3]))
        padded_equal = torch.allclose(scores[0], scores[1])  # tokens after `length` do not matter
        good, bad = torch.tensor([[10, 11, 12]]), torch.tensor([[10, 11, 13]])
        opt = torch.optim.Adam(rm.parameters(), lr=1e-3)
        before = (rm(good, torch.tensor([3])) - rm(bad, torch.tensor([3]))).item()
        for _ in range(20):
            opt.zero_grad()
            pairwise_loss(rm(good, torch.tensor([3])), rm(bad, torch.tensor([3]))).backward()
            opt.step()
        after = (rm(good, torch.tensor([3])) - rm(bad, torch.tensor([3]))).item()
        hybrid = HybridReward(default={"model": 1.0}, model_reward=rm.as_reward(tok, lambda s: tok.encode(s["prompt"])))
        out = hybrid(["7", "8"], [{"prompt": "3+4=", "answer": "7"}, {"prompt": "3+4=", "answer": "7"}])
        return {"shape": tuple(scores.shape), "padded_equal": bool(padded_equal), "before": before,
                "after": after, "hybrid": [o["reward"] for o in out]}
    finally:
        teardown()
