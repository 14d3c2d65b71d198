"""The multimodal model's fused loss runs on the positions with a loss only (``<image>`` and prompt
positions dropped before the output layer, training/step.py ``loss_rows``) and trains as the loss on
every position does."""
import torch
from distributed import phase, phases, run_distributed
from mm_workers import overrides, train_mm

STEPS = 2


def _train(args, rows: bool) -> dict:
    import bluelm_kernels.cross_entropy as ce
    from megatron_bluelm.training import step

    original, seen = ce.fused_linear_cross_entropy, []

    def recording(hidden, *a, **kw):
        seen.append(hidden.shape[0])
        return original(hidden, *a, **kw)

    ce.fused_linear_cross_entropy, step.LOSS_ROWS = recording, rows
    try:
        out = train_mm(args)
    finally:
        ce.fused_linear_cross_entropy, step.LOSS_ROWS = original, True
    out["kernel_rows"] = seen
    return out


def test_fused_vlm_loss_on_kept_rows_trains_the_same(mm_prefix, tmp_path):
    calls = [phase(_train, overrides(mm_prefix, str(tmp_path / str(rows)), STEPS, ["--model.backend", "fused"]), rows)
             for rows in (False, True)]
    every, kept = run_distributed(phases, 1, calls)[0]
    n = STEPS * 4  # micro-batches of one 256-position row
    assert every["kernel_rows"] == [256] * n
    assert len(kept["kernel_rows"]) == n and 0 < max(kept["kernel_rows"]) < 128  # most positions carry no loss
    torch.testing.assert_close(torch.tensor(kept["losses"]), torch.tensor(every["losses"]), rtol=1e-6, atol=0)
    for name, p in every["params"].items():
        torch.testing.assert_close(kept["params"][name], p, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
