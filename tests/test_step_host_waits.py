"""What makes the host wait for the device at a step's end: the loss is read before the optimizer's
kernels are queued, the finiteness check exchanges nothing when every rank already knows it, and the
throughput meter times with CUDA events, waiting only when it reports."""
import math
from types import SimpleNamespace

import pytest
import torch

from megatron_bluelm.training import loop, step


def test_train_step_reads_the_loss_before_the_update(monkeypatch):
    calls = []
    monkeypatch.setattr(step, "_run_schedule", lambda *a, **k: calls.append("schedule") or ["report"])
    monkeypatch.setattr(step, "_reduce_loss", lambda losses: calls.append("loss") or (1.5, 7))

    class Optimizer:
        def zero_grad(self):
            calls.append("zero")

        def step(self):
            calls.append("update")
            return True, 0.25, None

    chunk = SimpleNamespace(zero_grad_buffer=lambda: None)
    res = step.train_step([chunk], Optimizer(), SimpleNamespace(step=lambda increment: calls.append("lr")), [iter([])],
                          num_microbatches=1, seq_length=4, micro_batch_size=1, device=torch.device("cpu"))
    assert calls == ["zero", "schedule", "loss", "update", "lr"]
    assert (res.loss, res.tokens, res.grad_norm, res.skipped) == (1.5, 7, 0.25, False)


def _run(policy="stop"):
    cfg = SimpleNamespace(training=SimpleNamespace(nan_policy=policy, max_skipped_steps=3))
    return SimpleNamespace(cfg=cfg, info=SimpleNamespace(device=torch.device("cpu")), step=5, skipped_steps=0,
                           logger=SimpleNamespace(print=lambda *a: None))


@pytest.mark.parametrize("pp,agreed,exchanged", [(1, True, False), (1, False, True), (2, True, True)])
def test_finiteness_check_exchanges_only_what_a_rank_may_not_know(monkeypatch, pp, agreed, exchanged):
    reduced = []

    def all_reduce(t, op=None):
        reduced.append(t.clone())
        t.fill_(1.0)  # another rank's NaN

    monkeypatch.setattr(loop.dist, "all_reduce", all_reduce)
    monkeypatch.setattr(loop.parallel_state, "get_pipeline_model_parallel_world_size", lambda: pp)
    finite = step.StepResult(loss=2.0, tokens=3, grad_norm=1.0)
    if exchanged:  # the other rank's flags count: the step stops
        with pytest.raises(loop.NonFiniteStep):
            loop._check_finite(_run(), finite, agreed=agreed)
        assert len(reduced) == 1
    else:
        loop._check_finite(_run(), finite, agreed=agreed)
        assert reduced == []
    # this rank's own NaN is seen without any exchange as well
    with pytest.raises(loop.NonFiniteStep, match="loss not finite"):
        loop._check_finite(_run(), step.StepResult(loss=math.nan, tokens=3, grad_norm=1.0), agreed=True)


class _Clock:
    now = 0.0


class _FakeEvent:
    """A CUDA event on a device whose work completes as it is queued (the fake clock's time)."""

    def __init__(self, enable_timing=False):
        self.t = None

    def record(self):
        self.t = _Clock.now

    def synchronize(self):
        pass

    def elapsed_time(self, other):
        return (other.t - self.t) * 1e3


def test_throughput_meter_waits_for_the_device_only_when_it_reports(monkeypatch):
    syncs = []
    monkeypatch.setattr(loop.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(loop.torch.cuda, "synchronize", lambda *a: syncs.append(1))
    monkeypatch.setattr(loop.torch.cuda, "Event", _FakeEvent)
    cfg = SimpleNamespace(logging=SimpleNamespace(peak_tflops=100.0),
                          training=SimpleNamespace(global_batch_size=2), data=SimpleNamespace(seq_length=8))
    run = SimpleNamespace(cfg=cfg, flops_per_token=1e9, info=SimpleNamespace(world_size=1))
    meter = loop.Throughput(run)
    for i in range(10):
        _Clock.now += 0.5  # the step
        meter.steps += 1
        meter.pause()
        _Clock.now += 3.0 if i == 4 else 0.0  # a checkpoint save at one step end: not step time
        meter.resume()
    out = meter.report()
    assert syncs == []  # events only: no synchronize per step (nor at the report: it waits on its event)
    assert out["step_time_s"] == pytest.approx(0.5)
    assert out["tokens_per_s"] == pytest.approx(10 * 2 * 8 / 5.0)


@pytest.mark.parametrize("signalled", [True, False])
def test_preemption_agreement_is_a_host_exchange(monkeypatch, signalled):
    """The per-step preemption flag is a CPU tensor reduced over the checkpointer's host (gloo) group:
    nothing on the device to wait for, whatever the run's device."""
    from megatron_bluelm.training import checkpointing

    seen = []

    def all_reduce(t, op=None, group=None):
        seen.append((t.device.type, group))
        t.fill_(1.0)  # another rank was signalled

    monkeypatch.setattr(checkpointing.dist, "all_reduce", all_reduce)
    ckpt = checkpointing.Checkpointer.__new__(checkpointing.Checkpointer)
    ckpt._signalled, ckpt._host_group = signalled, "host-group"
    ckpt.run = SimpleNamespace(info=SimpleNamespace(device=torch.device("meta")))  # a device never read
    assert ckpt._agree_on_signal() is True
    assert seen == [("cpu", "host-group")]
