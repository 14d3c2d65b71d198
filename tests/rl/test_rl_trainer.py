"""The GRPO update on the megatron model: at the first update of a batch the ratio is exactly 1 and the
KL to the (just copied) reference is 0; after an update both move. Same under TP2 and PP2."""
import pytest
from distributed import run_distributed
from rl_workers import first_update_stats


def _check(stats):
    first, second = stats["first"], stats["second"]
    assert first["ratio_mean"] == 1.0 and first["kl"] == 0.0
    assert first["update_tokens"] == 1 + 2 + 3 + 4 + 1 + 2 + 3 + 4  # response tokens only
    assert second["kl"] > 0.0  # the policy moved away from the reference
    # the second update keeps the batch's old log-probs (as updates_per_step > 1 does): ratio moved
    assert abs(second["ratio_mean"] - 1.0) > 1e-4


@pytest.mark.parametrize("world,extra", [(1, []), (2, ["--parallel.tp", "2"]), (2, ["--parallel.pp", "2"])])
def test_first_update_ratio_one_kl_zero(world, extra):
    results = run_distributed(first_update_stats, world, extra)
    last = results[-1]
    _check(last)
    assert last["moved"] > 0
    d = last["delta"]  # advantages were [1, -1, 0.5, -0.5, 2, -2, 0, 0]
    assert d[0] > 0 > d[1] and d[4] > 0 > d[5]  # the update raised the log-probs of A > 0 responses


@pytest.mark.parametrize("temperature,top_p", [(0.7, 1.0), (0.7, 0.9)])
def test_token_logprobs_under_tp2(temperature, top_p):
    """The sampling distribution's log-probs and entropy from vocabulary-parallel logits (TP2: the
    vocab-parallel cross-entropy without a nucleus, gathered logits with one) equal the formula on the
    full logits; padding rows, banned ids and the think tags by state excluded on each rank's shard;
    finite gradients."""
    import torch
    from rl_workers import tp_token_logprobs

    for r in run_distributed(tp_token_logprobs, 2, temperature, top_p):
        torch.testing.assert_close(r["logp"], r["ref"])
        torch.testing.assert_close(r["entropy"], r["ref_entropy"])
        assert r["grad_finite"]


def test_token_logprobs_are_the_engine_samplers():
    """The trainer's log-prob of a sampled token is the one the engine's sampler (decode_state.advance)
    drew it with, bans included: <image> and padding rows always, a second <think> while thinking,
    </think> after the close. Large logits on those tokens make any missing ban visible (before: a
    trained model's non-thinking rollouts were ~2.5e-3 nats off, the mass it put on the think tags)."""
    import torch
    from megatron.core import parallel_state as ps

    from megatron_bluelm.inference import decode_state as ds
    from megatron_bluelm.rl.rollout import think_states
    from megatron_bluelm.rl.trainer import LogProbSpec, token_logprobs

    vocab, padded, think, end, image, per = 36, 40, 4, 5, 6, 20
    gen = torch.Generator().manual_seed(0)
    rows = 3 * per
    logits = torch.randn(rows, padded, generator=gen) * 2
    logits[:, [think, end, image]] += 3
    st = ds.DecodeState(rows, 4, padded, torch.device("cpu"))
    st.active[:], st.limit[:], st.limit_reason[:] = True, 4, ds.FINISH_LENGTH
    st.bstate[:] = torch.tensor([ds.BEFORE, ds.THINKING, ds.CLOSED]).repeat_interleave(per)
    st.temperature[:], st.budget[:], st.force_idx[:], st.key[:] = 0.7, -1, -1, torch.arange(rows)
    ban = torch.zeros(padded)
    ban[vocab:] = ban[image] = float("-inf")
    st.ban.copy_(ban)
    st.think_ids.copy_(torch.tensor([think, end]))
    state = st.bstate.clone()
    ds.advance(st, logits, rows, "sample")
    tokens, engine_lp = st.out_token[:, 0], st.out_logp[:, 0]
    assert {think, end} & set(tokens[:per].tolist())  # the bans are per state: unbanned ones get drawn

    ps.set_tensor_model_parallel_world_size(1)
    ps.set_tensor_model_parallel_rank(0)
    try:
        spec = LogProbSpec(vocab, 0.7, banned_ids=(image,), think_ids=(think, end))
        logp, _ = token_logprobs(logits[:, None], tokens[:, None], spec, state[:, None])
    finally:
        ps.set_tensor_model_parallel_world_size(None)
        ps.set_tensor_model_parallel_rank(None)
    torch.testing.assert_close(logp[:, 0], engine_lp, atol=1e-5, rtol=0)
    # the rows' states as the engine tracks them: opened by the first <think>, closed by a </think> after it
    row = torch.tensor([[7, end, think, 8, think, end, 9, end]])
    assert think_states(row, think, end).tolist() == [[0, 0, 1, 1, 1, 2, 2, 2]]
