"""The training step line carries the run's elapsed wall time and an ETA for the remaining steps."""
from megatron_bluelm.training.loop import _format


def test_step_line_has_elapsed_and_eta():
    line = _format(5, 10, {"loss": 2.5, "grad_norm": 0.5}, elapsed=65.0, eta=3725.0)
    assert line.startswith("step      5/10 | elapsed 1m05s eta 1h02m | loss 2.5000")


def test_step_line_without_timing_is_unchanged():
    assert _format(1, 2, {"loss": 1.0}) == "step      1/2 | loss 1.0000"
