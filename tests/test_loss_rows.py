"""The fused loss on the positions with a loss only (``loss_rows``, training/step.py ->
models/fused_loss.py): the same loss sum, token count and gradients as the kernel on every position
(where masked rows are ignore_index rows, contributing exactly 0), with the kernel given only the kept
rows, in rows folded by ``fold_rows`` and under DP2, TP2 + SP and PP2."""
import os
import sys
from functools import partial
from types import SimpleNamespace

import pytest
import torch
from distributed import phase, phases, run_distributed

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "data"))

TOL = dict(rtol=1e-5, atol=2e-5)  # across layouts: tests/test_parallel_layouts.py's
SEQ = 64


# ----------------------------------------------------------------------------- unit: fused_output_loss

def _layer(weight):
    return SimpleNamespace(weight=weight, sequence_parallel=False, tp_group=SimpleNamespace(size=lambda: 1))


def _masks(b: int, s: int, gen) -> dict:
    some = (torch.rand(b, s, generator=gen) < 0.35).float()
    some[0, :5] = 0  # rows of the micro-batch differ, so an [s, b] order of the indices picks other rows
    some[-1, -7:] = 1
    return {"some": some, "none": torch.zeros(b, s), "all": torch.ones(b, s)}


def _loss_and_grads(hidden_states, weight, labels, mask, rows):
    from megatron_bluelm.models.fused_loss import fused_output_loss

    hs, w = hidden_states.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fused_output_loss(_layer(w), hs, labels, mask, rows)
    loss.backward()
    return loss.detach(), hs.grad, w.grad


@pytest.mark.parametrize("b", [1, 2])
@pytest.mark.parametrize("kind", ["some", "none", "all"])
def test_kept_rows_equal_every_row(b, kind):
    from megatron_bluelm.training.step import loss_rows

    gen = torch.Generator().manual_seed(b)
    s, h, v = 48, 32, 300
    hidden_states, weight = torch.randn(s, b, h, generator=gen), torch.randn(v, h, generator=gen) * 0.3
    labels = torch.randint(0, v, (b, s), generator=gen)
    labels[0, 7] = -100  # a label that is ignored although its mask keeps it: still no loss
    mask = _masks(b, s, gen)[kind]
    mask[0, 7] = 1
    full = _loss_and_grads(hidden_states, weight, labels, mask, None)
    rows = loss_rows(mask)
    assert rows.dtype == torch.int64 and len(rows) == int(mask.sum())
    kept = _loss_and_grads(hidden_states, weight, labels, mask, rows)
    # The same per-row arithmetic (logits, softmax, dlogits @ W: per-row results do not depend on which
    # other rows share the GEMM); the loss sum and grad_W reduce over fewer (zero) rows, so they may
    # round differently: asserted close, and the hidden-state gradient bit for bit.
    torch.testing.assert_close(kept[0], full[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kept[2], full[2], rtol=1e-6, atol=1e-7)
    assert torch.equal(kept[1], full[1])
    dropped = (mask.t() == 0)  # [s, b]: the hidden states' layout
    assert torch.count_nonzero(kept[1][dropped]) == 0
    if kind == "none":
        assert float(kept[0]) == 0.0 and torch.count_nonzero(kept[2]) == 0 and torch.count_nonzero(kept[1]) == 0
    else:
        assert float(kept[0]) > 0 and torch.count_nonzero(kept[2]) > 0


def test_rows_in_the_hidden_states_order_pick_other_rows():
    """Mutation check of the test above: indices in the [s, b] order of the hidden states (not labels'
    [b, s] order) give another loss."""
    gen = torch.Generator().manual_seed(3)
    b, s, h, v = 2, 48, 32, 300
    hidden_states, weight = torch.randn(s, b, h, generator=gen), torch.randn(v, h, generator=gen) * 0.3
    labels = torch.randint(0, v, (b, s), generator=gen)
    mask = _masks(b, s, gen)["some"]
    full = _loss_and_grads(hidden_states, weight, labels, mask, None)
    wrong = torch.nonzero(mask.t().reshape(-1) > 0).view(-1)
    assert not torch.allclose(_loss_and_grads(hidden_states, weight, labels, mask, wrong)[0], full[0])


def test_bad_rows_are_refused():
    from megatron_bluelm.models.fused_loss import fused_output_loss

    w = torch.randn(10, 4)
    labels, hs = torch.zeros(1, 3, dtype=torch.long), torch.randn(3, 1, 4)
    with pytest.raises(ValueError, match="no loss_mask"):
        fused_output_loss(_layer(w), hs, labels, None, torch.arange(2))
    with pytest.raises(ValueError, match="int64"):
        fused_output_loss(_layer(w), hs, labels, torch.ones(1, 3), torch.arange(2, dtype=torch.int32))


def test_device_masks_give_no_rows():
    """A mask already on a device would need a device nonzero (the host waits): no rows, today's path."""
    from megatron_bluelm.training.step import loss_rows

    assert loss_rows(None) is None
    assert loss_rows(torch.ones(1, 4, device="meta")) is None


# ----------------------------------------------------------------------------- the training step

def _batches(seed: int, packed: bool) -> list:
    """Two micro-batches of two rows: packed rows (document ids: the step folds them into one row of
    2 * SEQ) or plain rows (no ids: [s, b] activations with b = 2); a mask keeping ~1/3 of the
    positions, one row of the plain ones with no loss at all."""
    from packed_workers import documents, packed_batch, stack_rows

    gen = torch.Generator().manual_seed(seed)
    out = []
    for m in range(2):
        rows = []
        for r, docs in enumerate(documents(seed + m)):
            row = packed_batch(docs)
            if not packed:
                row = {k: row[k] for k in ("tokens", "labels", "position_ids")}
                row.update(position_ids=torch.arange(SEQ)[None], attention_mask=None)
            mask = (torch.rand(1, SEQ, generator=gen) < 0.35).float()
            if not packed and m == 1 and r == 0:
                mask.zero_()
            row["loss_mask"] = mask
            rows.append(row)
        out.append(stack_rows(rows))
    return out


def _step_run(extra: list) -> dict:
    """Loss sums, token counts, gradients and the kernel's input rows, the loss on every position
    (``LOSS_ROWS = False``) and on the kept rows, packed (folded) and plain rows."""
    from packed_workers import _grads_and_loss, tiny_overrides

    import bluelm_kernels.cross_entropy as ce
    from megatron_bluelm.config.loader import load_config
    from megatron_bluelm.data import load_tokenizer
    from megatron_bluelm.models.decoder import build_decoder
    from megatron_bluelm.parallel.setup import teardown
    from megatron_bluelm.training import step
    from megatron_bluelm.training.loop import prepare_config, setup_run

    cfg = load_config(None, tiny_overrides(["--model.backend", "fused", "--model.num_layers", "2",
                                            "--training.micro_batch_size", "2", "--training.global_batch_size",
                                            "4", "--data.reset_position_ids", "true",
                                            "--data.reset_attention_mask", "true", *extra]))
    prepare_config(cfg)
    vocab = cfg.model.vocab_size or load_tokenizer(cfg.data.tokenizer_model).vocab_size
    run = setup_run(cfg, partial(build_decoder, cfg, vocab), 0.0)
    original, seen = ce.fused_linear_cross_entropy, []

    def recording(hidden, *args, **kwargs):
        seen.append(hidden.shape[0])
        return original(hidden, *args, **kwargs)

    ce.fused_linear_cross_entropy = recording
    out = {}
    try:
        for packed in (True, False):
            batches = _batches(7, packed)
            for rows in (False, True):
                seen.clear()
                step.LOSS_ROWS = rows
                r = _grads_and_loss(run, batches, mbs=2)
                r["kernel_rows"] = list(seen)
                # copies: without model parallelism the gathered gradients are views of main_grad
                r["grads"] = {k: v.detach().clone() for k, v in r["grads"].items()}
                out[(packed, rows)] = r
        out["kept"] = {packed: [int(b["loss_mask"].sum()) for b in _batches(7, packed)] for packed in (True, False)}
        return out
    finally:
        ce.fused_linear_cross_entropy, step.LOSS_ROWS = original, True
        teardown()


LAYOUTS = {  # two ranks, one start; DP2 gets the same micro-batches on both ranks: the 1-rank model
    "dp2": [],
    "tp2_sp": ["--parallel.tp", "2", "--parallel.sequence_parallel", "true", "--training.global_batch_size", "2"],
    "pp2": ["--parallel.pp", "2", "--training.global_batch_size", "2"],
}


@pytest.fixture(scope="module")
def runs():
    results = run_distributed(phases, 2, [phase(_step_run, extra) for extra in LAYOUTS.values()])
    return {name: [rank[i] for rank in results] for i, name in enumerate(LAYOUTS)}


def _close(a, b, name, **tol):
    # assert_close (and allclose) only for the report: on a busy 2-core CPU they take seconds a tensor
    if not bool(((a - b).abs() <= tol["atol"] + tol["rtol"] * b.abs()).all()):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{name}: {m}")


def _last(ranks):
    return ranks[-1]  # the last pipeline stage's rank has the loss


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_kernel_runs_on_the_kept_rows_only(layout, runs):
    for rank in runs[layout]:
        for packed in (True, False):
            full, kept = rank[(packed, False)], rank[(packed, True)]
            if layout == "pp2" and rank is runs[layout][0]:
                assert full["kernel_rows"] == kept["kernel_rows"] == []  # no loss on the first stage
                continue
            assert kept["kernel_rows"] == rank["kept"][packed]  # one call per micro-batch
            assert full["kernel_rows"] == [2 * SEQ] * 2
            assert full["folded"] == kept["folded"] == ([(1, 2 * SEQ)] * 2 if packed else [])


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_same_loss_tokens_and_gradients(layout, runs):
    """Each layout's kept-row run equals its every-row run (close: the loss sum and grad_W reduce over
    fewer zero rows) and the 1-rank model's every-row run (DP2 on identical rows)."""
    ref = _last(runs["dp2"])
    for packed in (True, False):
        base = ref[(packed, False)]
        assert base["tokens"] == sum(ref["kept"][packed]) and base["loss_sum"] > 0
        for rank in runs[layout]:
            got = rank[(packed, True)]
            if rank is _last(runs[layout]):
                assert got["tokens"] == base["tokens"]
                torch.testing.assert_close(got["loss_sum"], base["loss_sum"], **TOL)
                torch.testing.assert_close(got["loss_sum"], rank[(packed, False)]["loss_sum"], rtol=1e-6, atol=0)
            assert got["grads"].keys() == base["grads"].keys()
            for name, g in base["grads"].items():
                _close(got["grads"][name], g, name, **TOL)
                _close(got["grads"][name], rank[(packed, False)]["grads"][name], name, rtol=1e-5, atol=1e-7)
            assert float(got["grads"]["output_layer.weight"].abs().max()) > 0


def test_benchmark_runs_at_a_tiny_size_and_agrees_in_fp32(capsys):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools", "bench"))
    from loss_rows_bench import main

    main(["--tokens", "1024", "--hidden", "16", "--vocab", "300", "--iters", "1", "--rounds", "1",
          "--dtype", "fp32", "--device", "cpu"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and "every row" in lines[1] and "kept rows" in lines[1]
    assert "grad_hidden 0.0e+00" in lines[2], lines
