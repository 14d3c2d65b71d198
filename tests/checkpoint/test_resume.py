"""Exact resume (2N straight == N + resume + N), preemption signals, keep-last, resharding."""
import os

import pytest
import torch
from ckpt_workers import loaded_loss, pretrain, tiny_overrides
from distributed import phase, phases, run_distributed

from megatron_bluelm.training.checkpointing import LATEST, META, list_iterations, read_latest


def assert_same_params(a: dict, b: dict, exact: bool = True):
    assert a.keys() == b.keys()
    for name in a:
        if exact:
            assert torch.equal(a[name], b[name]), name
        else:
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


def test_preempt_and_resume_is_exact(reference_run, demo_prefix, tmp_path):
    """SIGUSR1 at step 3 saves and stops cleanly; resuming to step 6 reproduces the straight run bit
    for bit: losses, parameters, data position."""
    ref, _ = reference_run
    save = str(tmp_path / "save")
    args = tiny_overrides(demo_prefix, str(tmp_path), save=save, load=save)
    first = run_distributed(pretrain, 1, args, 3)[0]
    assert first["step"] == 3 and read_latest(save) == 3
    second = run_distributed(pretrain, 1, args)[0]
    assert second["step"] == 6 and second["consumed"] == ref["consumed"]
    assert first["losses"] + second["losses"] == ref["losses"]
    assert_same_params(second["params"], ref["params"])


def test_keep_last_and_latest(reference_run, tmp_path):
    _, save = reference_run
    assert read_latest(save) == 6 and list_iterations(save) == [3, 6]  # keep_last 2 (default)
    assert all(os.path.isfile(os.path.join(save, f"iter_{i:07d}", META)) for i in (3, 6))
    assert open(os.path.join(save, LATEST)).read() == "6"


@pytest.fixture(scope="module")
def tp2pp2(reference_run, demo_prefix, tmp_path_factory):
    """The TP2 x PP2 runs of the two tests below, in one start of 4 ranks (one layout; each run has
    its own process group): the distributed-optimizer run saved at 3 and its resume from there; the
    TP1 reference's step-3 checkpoint continued in TP2 x PP2, then that run's checkpoint loaded alone."""
    _, ref_save = reference_run
    tmp = tmp_path_factory.mktemp("tp2pp2")
    dist_save, up_save = str(tmp / "save"), str(tmp / "up_save")
    kw = dict(tp=2, pp=2, distopt=True)
    results = run_distributed(phases, 4, [
        phase(pretrain, tiny_overrides(demo_prefix, str(tmp / "s"), save=dist_save, save_interval=3, **kw)),
        phase(pretrain, tiny_overrides(demo_prefix, str(tmp / "r"), load=os.path.join(dist_save, "iter_0000003"),
                                       **kw)),
        phase(pretrain, tiny_overrides(demo_prefix, str(tmp / "u"), tp=2, pp=2, save=up_save,
                                       load=os.path.join(ref_save, "iter_0000003"))),
        phase(loaded_loss, tiny_overrides(demo_prefix, str(tmp / "b"), tp=2, pp=2, load=up_save))])
    straight, resumed, up, loss_tp2pp2 = results[-1]  # the last rank holds the last pipeline stage
    return {"straight": straight, "resumed": resumed, "up": up, "up_save": up_save, "loss_tp2pp2": loss_tp2pp2}


@pytest.mark.slow
def test_tp2pp2_distributed_optimizer_resume_is_exact(reference_run, tp2pp2):
    """TP2 x PP2 with the distributed optimizer: resuming at 3 equals the straight run; and the TP1
    reference and the TP2 x PP2 run agree (layout equivalence, to fp32 tolerance)."""
    ref, _ = reference_run
    straight, resumed = tp2pp2["straight"], tp2pp2["resumed"]
    assert resumed["losses"] == straight["losses"][3:]
    assert_same_params(resumed["params"], straight["params"])
    torch.testing.assert_close(straight["losses"], ref["losses"], rtol=1e-4, atol=0)


@pytest.mark.slow
def test_reshard_tp2pp2_to_tp1_and_back(reference_run, demo_prefix, tp2pp2, tmp_path):
    """Model and optimizer reshard both ways: TP1 checkpoint -> TP2 x PP2 run, and that run's
    checkpoint -> TP1, continue training like the straight TP1 run; identical weights give the same loss."""
    ref, _ = reference_run
    up = tp2pp2["up"]
    torch.testing.assert_close(up["losses"], ref["losses"][3:], rtol=1e-4, atol=0)
    assert_same_params(up["params"], ref["params"], exact=False)
    # Back to TP1: the weights load exactly, and give the TP2 x PP2 model's loss.
    loss_tp1 = run_distributed(loaded_loss, 1, tiny_overrides(demo_prefix, str(tmp_path / "a"),
                                                              load=tp2pp2["up_save"]))[0]
    torch.testing.assert_close(loss_tp1, tp2pp2["loss_tp2pp2"], rtol=1e-5, atol=0)


def test_fused_backend_saves_and_loads_the_same_checkpoints(reference_run, demo_prefix, tmp_path):
    """The fused backend (the default on CUDA without Transformer Engine) resumes from the torch
    backend's checkpoint, saves its own, and trains the same model: megatron's MLP asks every child
    module (our fused SwiGLU activation too) for its sharded state."""
    ref, ref_save = reference_run
    save = str(tmp_path / "fused")
    args = tiny_overrides(demo_prefix, str(tmp_path), save=save, load=os.path.join(ref_save, "iter_0000003"))
    fused = run_distributed(pretrain, 1, args + ["--model.backend", "fused"])[0]
    assert fused["step"] == 6 and read_latest(save) == 6
    torch.testing.assert_close(fused["losses"], ref["losses"][3:], rtol=1e-5, atol=0)
    assert_same_params(fused["params"], ref["params"], exact=False)
    back = run_distributed(pretrain, 1, tiny_overrides(demo_prefix, str(tmp_path / "t"), steps=6, load=save)
                           + ["--model.backend", "torch"])[0]
    assert back["step"] == 6 and back["losses"] == []  # nothing left to train: loaded at step 6
    assert_same_params(back["params"], fused["params"])
