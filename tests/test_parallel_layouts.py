"""The parallel layouts are the same model: losses of the first steps and the parameters after a few
optimizer steps match the 1-rank run (fp32, gloo ranks on CPU)."""
import pytest
import torch
from distributed import phase, phases, run_distributed

STEPS = 3
TOL = dict(rtol=1e-5, atol=2e-5)


def _overrides(prefix, out_dir, extra):
    return [
        "--data.prefix", prefix, "--data.seq_length", "64",
        "--training.train_steps", str(STEPS), "--training.micro_batch_size", "1",
        "--training.global_batch_size", "8", "--training.eval_interval", "0",
        "--optimizer.lr", "1e-3", "--schedule.warmup_steps", "1",
        "--logging.output_dir", out_dir, "--logging.tensorboard", "false",
        "--logging.log_interval", "100", "--data.cache_dir", f"{out_dir}/cache",
    ] + list(extra)


def train_and_gather(overrides):
    """Worker: train, then return the per-step losses and the full trained parameters."""
    from megatron_bluelm.config.loader import load_config
    from megatron_bluelm.parallel.gather import full_state_dict
    from megatron_bluelm.stages.pretrain import run_pretrain

    cfg = load_config(None, overrides)
    result = run_pretrain(cfg, collect=lambda run: full_state_dict(run.model))
    return {"losses": result["losses"], "params": result["collected"]}


# 1-rank runs besides the baseline (one process start for all of them, the baseline first)
ONE_RANK = {
    # The fused backend (bluelm_kernels/; torch references on CPU) incl. the fused linear cross-entropy is
    # the same model as the torch backend of the baseline.
    "fused_backend": ["--model.backend", "fused"],
    # Selective and full activation recomputation change memory, not the math.
    "recompute_selective": ["--training.recompute", "selective"],
    "recompute_full": ["--training.recompute", "full"],
}


@pytest.fixture(scope="module")
def one_rank(demo_prefix, tmp_path_factory):
    """The baseline and every ONE_RANK run, in one process, each with its own process group."""
    out = tmp_path_factory.mktemp("one_rank")
    runs = {"baseline": [], **ONE_RANK}
    results = run_distributed(phases, 1, [phase(train_and_gather, _overrides(demo_prefix, str(out / name), extra))
                                          for name, extra in runs.items()])[0]
    return dict(zip(runs, results))


@pytest.fixture(scope="module")
def baseline(one_rank):
    return one_rank["baseline"]


def _last_rank_losses(results):
    return results[-1]["losses"]  # the last rank holds the last pipeline stage


def _assert_same(baseline, results):
    losses = _last_rank_losses(results)
    assert len(losses) == STEPS and all(loss is not None for loss in losses)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(baseline["losses"]), **TOL)
    assert losses[-1] < losses[0], "training did not reduce the loss"
    for rank_result in results:  # every rank gathered the same complete model
        params = rank_result["params"]
        assert params.keys() == baseline["params"].keys()
        for name, ref in baseline["params"].items():
            torch.testing.assert_close(params[name], ref, **TOL, msg=lambda m, name=name: f"{name}: {m}")


LAYOUTS = {
    "tp2_pp2": (4, ["--parallel.tp", "2", "--parallel.pp", "2"]),
    "tp2_dp2": (4, ["--parallel.tp", "2"]),
    "pp2_dp2": (4, ["--parallel.pp", "2"]),
    "tp2_sp_dp2_distopt": (4, ["--parallel.tp", "2", "--parallel.sequence_parallel", "true",
                               "--parallel.distributed_optimizer", "true"]),
    "pp2_vpp2_tp2": (4, ["--parallel.tp", "2", "--parallel.pp", "2", "--parallel.vpp", "2"]),
    # The fused backend is the torch backend's model also vocab-parallel under TP + SP.
    "fused_tp2_sp_pp2": (4, ["--model.backend", "fused", "--parallel.tp", "2", "--parallel.pp", "2",
                             "--parallel.sequence_parallel", "true"]),
    "dp2_distopt_overlap": (2, ["--parallel.distributed_optimizer", "true",
                                "--parallel.overlap_grad_reduce", "true"]),
}
# Layouts of the same TP x PP x DP grid run in one start of their ranks, one after the other (each its
# own process group): what differs (SP, the distributed optimizer, the backend) is per-run config.
SHARED_START = (("tp2_pp2", "fused_tp2_sp_pp2"), ("tp2_dp2", "tp2_sp_dp2_distopt"))


@pytest.fixture(scope="module")
def layout_results(demo_prefix, tmp_path_factory):
    """layout -> every rank's result, running the layout's SHARED_START group on first use."""
    done = {}

    def get(layout):
        if layout not in done:
            group = next((g for g in SHARED_START if layout in g), (layout,))
            out = tmp_path_factory.mktemp(layout)
            calls = [phase(train_and_gather, _overrides(demo_prefix, str(out / name), LAYOUTS[name][1]))
                     for name in group]
            results = run_distributed(phases, LAYOUTS[layout][0], calls)
            done.update({name: [rank[i] for rank in results] for i, name in enumerate(group)})
        return done[layout]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_matches_single_rank(layout, baseline, layout_results):
    _assert_same(baseline, layout_results(layout))


@pytest.mark.slow
@pytest.mark.parametrize("run", sorted(ONE_RANK))
def test_one_rank_variant_matches(run, baseline, one_rank):
    _assert_same(baseline, [one_rank[run]])


@pytest.mark.slow
def test_tp2_pp2_dp2_eight_ranks(baseline, demo_prefix, tmp_path):
    extra = ["--parallel.tp", "2", "--parallel.pp", "2", "--parallel.distributed_optimizer", "true"]
    results = run_distributed(train_and_gather, 8, _overrides(demo_prefix, str(tmp_path), extra))
    _assert_same(baseline, results)
