"""Worker functions for the multi-process RL tests (importable by spawned ranks)."""
import os
import tempfile

import torch

# Logs go under the temporary directory, never into the working tree (tests/conftest.py checks).
OUT = os.path.join(tempfile.gettempdir(), "bluelm_tests")


def tiny_overrides(extra=()):
    return ["--data.mock", "true", "--data.seq_length", "16", "--training.micro_batch_size", "4",
            "--training.global_batch_size", "8", "--training.eval_interval", "0", "--schedule.style", "constant",
            "--schedule.warmup_steps", "0", "--optimizer.lr", "1e-3", "--optimizer.min_lr", "1e-3",
            "--logging.tensorboard", "false", "--logging.output_dir", OUT + "/rl", *extra]


def first_update_stats(extra=()):
    """Old / reference log-probs then one GRPO update on random rows with hand-made advantages."""
    from megatron_bluelm.config.loader import load_config
    from megatron_bluelm.models.decoder import build_decoder
    from megatron_bluelm.parallel.setup import teardown
    from megatron_bluelm.rl.loss import GRPOSettings
    from megatron_bluelm.rl.rollout import training_rows
    from megatron_bluelm.rl.trainer import LogProbSpec, micro_batches, policy_update, reduce_stats, sequence_logprobs
    from megatron_bluelm.stages.rl import build_reference, copy_policy
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
        copy_policy(run.model, ref_model)
        spec = LogProbSpec(8192)
        dev = run.info.device
        old = sequence_logprobs(run.model, batches, spec, 16, 4, dev)
        ref = sequence_logprobs(ref_model, batches, spec, 16, 4, dev)
        for i, mb in enumerate(batches):
            mb["old_logp"] = old[i] if old is not None else None
            mb["ref_logp"] = ref[i] if ref is not None else None
        s = GRPOSettings(kl_coef=0.1)
        first = reduce_stats(policy_update(run.model, run.optimizer, run.scheduler, batches, s, spec,
                                           seq_length=16, mbs=4, device=dev)[1], dev)
        old2 = sequence_logprobs(run.model, batches, spec, 16, 4, dev)  # after the first update
        second = reduce_stats(policy_update(run.model, run.optimizer, run.scheduler, batches, s, spec,
                                            seq_length=16, mbs=4, device=dev)[1], dev)
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

    cfg = load_config("examples/rl_toy.yaml", ["--logging.output_dir", OUT + "/rl_toy", *extra])
    return run_rl(cfg)["rl"]


def next_port():
    """Before a second process group in the same ranks: a fresh rendezvous port (the same on every rank)."""
    import os

    os.environ["MASTER_PORT"] = str(int(os.environ["MASTER_PORT"]) + 1)


def rl_stage(config, overrides, pretrained=None, collect=None):
    """One RL stage run on this rank: its history, evaluations, final step and ``collect(run)``."""
    from megatron_bluelm.config.loader import load_config
    from megatron_bluelm.stages.rl import run_rl

    cfg = load_config(config, list(overrides))
    out = run_rl(cfg, pretrained=pretrained, collect=collect)
    return {"rl": out["rl"], "eval": out["eval"], "step": out["step"], "collected": out.get("collected")}


def scheduler_decay_steps(run):
    return run.scheduler.lr_decay_steps


def pretrain_checkpoint(save_dir, extra=()):
    """A 1-step pretrain run of the tiny model (mock data) saved to ``save_dir``: a non-RL checkpoint."""
    from megatron_bluelm.config.loader import load_config
    from megatron_bluelm.stages.pretrain import run_pretrain

    cfg = load_config(None, tiny_overrides(["--training.train_steps", "1", "--checkpoint.save", save_dir,
                                            "--logging.output_dir", save_dir + "_log", *extra]))
    run_pretrain(cfg)
    return save_dir


def reference_equals_checkpoint(root, run):
    """collect(run): is the RL reference (the policy at RL start) the checkpoint's weights?"""
    from megatron_bluelm.inference.loading import load_weights
    from megatron_bluelm.models.decoder import build_decoder
    from megatron_bluelm.training.model_setup import build_model_chunks

    fresh = build_model_chunks(run.cfg, lambda **kw: build_decoder(run.cfg, 8192, **kw), run.info.device)
    load_weights(fresh, root)
    ref = run.frozen_models["reference"]
    return all(torch.equal(a, b) for m, r in zip(fresh, ref)
               for a, b in zip(m.state_dict().values(), r.state_dict().values()) if torch.is_tensor(a))


def checkpoint_story(tmp, config, overrides):
    """In one process: a pretrain checkpoint (1 step); RL's checkpoint.load refuses it naming
    --pretrained (checked before any process group); RL started from it with --pretrained (1 step);
    an RL run saved at step 2 of 3 (warm-up SFT first, so the policy moves), then resumed from step 2."""
    from functools import partial

    ckpt = pretrain_checkpoint(tmp + "/pre")
    err = stage_then_error(config, [*overrides, "--checkpoint.load", ckpt])
    started = rl_stage(config, [*overrides, "--training.train_steps", "1"], pretrained=ckpt,
                       collect=partial(reference_equals_checkpoint, ckpt))
    save, runs = tmp + "/rl_ckpt", [*overrides, "--rl.warmup_sft_steps", "2"]
    straight = rl_stage(config, [*runs, "--checkpoint.save", save, "--checkpoint.save_interval", "2"])
    resumed = rl_stage(config, [*runs, "--checkpoint.load", save + "/iter_0000002"])
    return {"error": err, "started": started, "straight": straight, "resumed": resumed}


def stage_then_error(config, overrides):
    """The ConfigError text an RL run gives (None if it ran)."""
    from megatron_bluelm.config.errors import ConfigError

    try:
        rl_stage(config, overrides)
    except ConfigError as e:
        return str(e)
    return None


def reward_model_story(tmp, world_overrides):
    """In one process: a pretrain checkpoint; the reward-model stage from it on the toy preference;
    an RL step whose only reward is that model. All three in the same layout: megatron-core keeps
    some state of the first process group's layout (seen: checkpoint replica ids) across a re-init."""
    from megatron_bluelm.config.loader import load_config
    from megatron_bluelm.stages.reward_model import run_reward_model

    ckpt = pretrain_checkpoint(tmp + "/pre", world_overrides)
    rm_dir = tmp + "/rm"
    cfg = load_config("examples/reward_model_tiny.yaml", ["--checkpoint.save", rm_dir, "--logging.output_dir",
                                                          tmp + "/rm_log", "--training.train_steps", "12",
                                                          "--training.eval_interval", "12", *world_overrides])
    next_port()
    rm = run_reward_model(cfg, pretrained=ckpt)
    next_port()
    rl = rl_stage("examples/rl_toy.yaml",
                  ["--rl.warmup_sft_steps", "0", "--training.train_steps", "1", "--rl.prompts_per_step", "4",
                   "--rl.group_size", "4", "--training.micro_batch_size", "4", "--rl.updates_per_step", "1",
                   "--rl.reward_model", rm_dir, "--rl.rewards", '{"default": {"model": 1.0}}',
                   "--logging.output_dir", tmp + "/rl_log", *world_overrides])
    return {"rm_eval": rm["eval"], "rm_history": rm["history"], "rl": rl["rl"]}


def mixed_batches(task_path, world_overrides, tmp):
    """RL steps of the multimodal model on a task mixing two sources and text / image prompts."""
    over = ["--vision.preset", "vit-tiny", "--vision.max_tiles", "1", "--vision.freeze", '["vision"]',
            "--data.seq_length", "64", "--rl.task", task_path, "--rl.source_ratios", '{"math": 1, "vqa": 1}',
            "--rl.rewards", '{"math": {"exact_match": 1.0, "format": 0.1}, "vqa": {"image_qa": 1.0}}',
            "--rl.warmup_sft_steps", "0", "--training.train_steps", "2", "--rl.prompts_per_step", "8",
            "--rl.group_size", "2", "--training.micro_batch_size", "4", "--rl.updates_per_step", "1",
            "--rl.max_new_tokens", "7", "--rl.filter_zero_variance", "false", "--rl.kl_coef", "0.01",
            "--rl.bridge_text", "",
            "--logging.output_dir", tmp + "/log", *world_overrides]
    return rl_stage("examples/rl_toy.yaml", over)["rl"]


def tp_token_logprobs(temperature, top_p):
    """token_logprobs on this rank's vocabulary shard vs the formula on the full logits."""
    from megatron.core import parallel_state

    from megatron_bluelm.inference.sampling import filter_top_p
    from megatron_bluelm.parallel.setup import setup_parallel, teardown
    from megatron_bluelm.rl.trainer import LogProbSpec, token_logprobs

    tp = int(__import__("os").environ["WORLD_SIZE"])
    setup_parallel(tp, 1, None, 1, 0)
    try:
        gen = torch.Generator().manual_seed(0)
        vocab, padded = 50, 64  # 14 embedding padding rows, never sampled
        full = torch.randn(2, 3, padded, generator=gen) * 3
        labels = torch.randint(0, vocab, (2, 3), generator=gen)
        # the engine's bans: <think> (id 4, shard 0) from state 1, </think> (40, shard 1) in state 2,
        # an always-banned id (45); a position's own label is never masked
        think, end, banned = 4, 40, 45
        state = torch.tensor([[0, 1, 2], [2, 1, 0]])
        labels[1, 0] = end  # a banned label (as a prompt token can be): stays finite
        rank = parallel_state.get_tensor_model_parallel_rank()
        shard = full.chunk(tp, dim=-1)[rank].clone().requires_grad_(True)
        spec = LogProbSpec(vocab, temperature, 0, top_p, banned_ids=(banned,), think_ids=(think, end))
        logp, entropy = token_logprobs(shard, labels, spec, state)
        logp.sum().backward()
        ref = full[..., :vocab] / temperature
        bans = torch.zeros_like(ref, dtype=torch.bool)
        bans[..., banned] = True
        bans[..., think] = state >= 1
        bans[..., end] = state == 2
        bans.scatter_(-1, labels[..., None], False)
        ref = ref.masked_fill(bans, float("-inf"))
        keep = torch.isfinite(filter_top_p(ref, top_p))
        keep.scatter_(-1, labels[..., None], True)
        ref = ref.masked_fill(~keep, float("-inf")).log_softmax(-1)
        p = ref.exp()
        return {"logp": logp.detach(), "ref": ref.gather(-1, labels[..., None]).squeeze(-1),
                "entropy": entropy, "ref_entropy": -(p * ref.nan_to_num(neginf=0.0)).sum(-1),
                "grad_finite": bool(torch.isfinite(shard.grad).all())}
    finally:
        teardown()


def sft_then_rl(data: dict, tmp: str, sft_overrides=(), rl_overrides=()):
    """In one process: the SFT stage (examples/rl_from_sft_toy_sft.yaml) on the toy's conversations,
    then the RL stage (examples/rl_from_sft_toy.yaml) from its checkpoint with --pretrained, held-out
    prompts evaluated at RL start and every eval_interval steps. Same layout for both (see
    reward_model_story)."""
    from megatron_bluelm.config.loader import load_config
    from megatron_bluelm.stages.sft import run_sft

    ckpt = tmp + "/sft_ckpt"
    cfg = load_config("examples/rl_from_sft_toy_sft.yaml",
                      ["--data.prefix", data["sft_prefix"], "--checkpoint.save", ckpt,
                       "--logging.output_dir", tmp + "/sft_log", *sft_overrides])
    sft = run_sft(cfg)
    next_port()
    rl = rl_stage("examples/rl_from_sft_toy.yaml",
                  ["--rl.task", data["rl_train"], "--rl.eval_task", data["rl_heldout"],
                   "--logging.output_dir", tmp + "/rl_log", *rl_overrides], pretrained=ckpt)
    return {"sft_losses": sft["losses"], **rl}
