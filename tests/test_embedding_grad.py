"""The decoder's token-embedding gradient accumulated straight into DDP's fp32 main_grad
(models/embedding.py): the same gradients and training as the dense path (bit for bit on the CPU in
fp32: the same fp32 additions in the same order), with no dense gradient and no DDP add."""
import os
import sys
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from distributed import phase, phases, run_distributed
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "data"))

SEQ = 64
SMALL = ["--model.num_layers", "2"]  # the tiny preset's widths, fewer layers: the embedding is what is tested
HALF = 4096  # the tiny preset's 8192-token vocabulary: TP2 shards [0, 4096) and [4096, 8192)


def _batches(seed: int, n: int) -> list:
    """``n`` one-row micro-batches whose ids repeat within a row and across rows, from both TP2
    shards, never id HALF (rank 1's local row 0, where the ids of rank 0's shard are masked to)."""
    gen = torch.Generator().manual_seed(seed)
    pool = torch.cat([torch.arange(5, 40), torch.arange(HALF + 1, HALF + 30)])
    out = []
    for _ in range(n):
        tokens = pool[torch.randint(len(pool), (SEQ + 1,), generator=gen)]
        out.append({"tokens": tokens[None, :-1], "labels": tokens[None, 1:], "loss_mask": torch.ones(1, SEQ),
                    "position_ids": torch.arange(SEQ)[None], "attention_mask": None})
    return out


class _OpLog(TorchDispatchMode):
    """Counts the embedding backward into a dense [vocab shard, hidden] gradient, the one into a compact
    [distinct ids, hidden] gradient, and in-place adds into one tensor (the embedding's main_grad)."""

    def __init__(self, main_grad: torch.Tensor):
        super().__init__()
        self.ptr, self.rows, self.dense, self.compact, self.adds = main_grad.data_ptr(), main_grad.shape[0], 0, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("embedding_dense_backward", "embedding_backward"):
            if args[2] == self.rows:
                self.dense += 1
            else:
                self.compact += 1
        if name == "add_" and isinstance(args[0], torch.Tensor) and args[0].data_ptr() == self.ptr:
            self.adds += 1
        return func(*args, **(kwargs or {}))


def _word_embeddings(run):
    return run.model[0].module.embedding.word_embeddings


def _run(extra: list, into_main_grad: bool) -> dict:
    """Gradients of three micro-batches (logged ops), then two training steps, in the given layout."""
    from packed_workers import _grads_and_loss, tiny_overrides

    from megatron_bluelm.config.loader import load_config
    from megatron_bluelm.models.decoder import build_decoder
    from megatron_bluelm.parallel.setup import teardown
    from megatron_bluelm.training import step
    from megatron_bluelm.training.loop import prepare_config, setup_run

    cfg = load_config(None, tiny_overrides([*SMALL, *extra]))
    prepare_config(cfg)
    run = setup_run(cfg, partial(build_decoder, cfg, 8192), 0.0)  # on the CPU: nothing switched
    try:
        emb = _word_embeddings(run)
        # only the embedding (the linears' fused GEMM rounds differently: tests/test_wgrad_fusion.py)
        emb.gradient_accumulation_fusion = into_main_grad
        rank = torch.distributed.get_rank()
        log = _OpLog(emb.weight.main_grad)
        with log:
            out = _grads_and_loss(run, _batches(10 + rank, 3))
        out.update(dense=log.dense, compact=log.compact, adds=log.adds, flag=bool(emb.weight.grad_added_to_main_grad),
                   grad_is_none=emb.weight.grad is None, local_main_grad=emb.weight.main_grad.clone(),
                   vocab_start=emb.vocab_start_index)
        losses = []
        for i in range(2):
            res = step.train_step(run.model, run.optimizer, run.scheduler, [iter(_batches(100 * i + rank, 3))],
                                  num_microbatches=3, seq_length=SEQ, micro_batch_size=1, device=run.info.device)
            losses.append(res.loss)
        out.update(losses=losses, weight=emb.weight.detach().clone())
        return out
    finally:
        teardown()


# TP2 with the embedding's reduce-scatter (sequence parallel); the overlapped gradient reduction needs
# a .grad from every parameter's backward (DDP's hook asserts it), which the placeholder is
LAYOUTS = {"tp2_sp_overlap": ["--parallel.tp", "2", "--parallel.sequence_parallel", "true",
                              "--parallel.distributed_optimizer", "true", "--parallel.overlap_grad_reduce", "true",
                              "--training.global_batch_size", "3"]}


@pytest.fixture(scope="module")
def layouts():
    """Every run below in one start of two ranks, each run its own process group."""
    runs = [(name, path) for name in LAYOUTS for path in ("old", "new")]
    calls = [phase(_run, LAYOUTS[name], path == "new") for name, path in runs] + [phase(_bare_and_frozen)]
    results = run_distributed(phases, 2, calls)
    out = {name: [{} for _ in results] for name in LAYOUTS}
    for i, (name, path) in enumerate(runs):
        for rank, r in enumerate(results):
            out[name][rank][path] = r[i]
    out["bare"] = results[0][-1]
    return out


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_main_grad_rows_equal_the_dense_path(layout, layouts):
    for r in layouts[layout]:
        old, new = r["old"], r["new"]
        # the dense path: one embedding_dense_backward and one DDP add into main_grad per micro-batch
        assert (old["dense"], old["compact"], old["adds"], old["flag"]) == (3, 0, 3, False)
        # the new one: a compact gradient of the distinct ids (known from the host tokens the step
        # registers), no DDP add, the DDP flag set, and the placeholder .grad dropped by DDP's hook
        assert (new["dense"], new["compact"], new["adds"], new["flag"], new["grad_is_none"]) == (0, 3, 0, True, True)
        assert new["tokens"] == old["tokens"] > 0
        assert new["loss_sum"] == old["loss_sum"]
        assert new["grads"].keys() == old["grads"].keys()
        for name, g in old["grads"].items():  # bit for bit: the same fp32 additions in the same order
            assert torch.equal(new["grads"][name], g), name
        assert float(old["grads"]["embedding.word_embeddings.weight"].abs().max()) > 0
        assert new["losses"] == old["losses"] and len(set(old["losses"])) == 2  # training moved, identically
        assert torch.equal(new["weight"], old["weight"])


def test_ids_of_the_other_shard_add_nothing(layouts):
    """TP2: rank 1's local row 0 (global id HALF) is no token's row, but every id of rank 0's shard is
    looked up there (masked); its main_grad stays exactly zero, while the rows of used ids are not."""
    r1 = layouts["tp2_sp_overlap"][1]
    assert r1["new"]["vocab_start"] == HALF
    for path in ("old", "new"):
        g = r1[path]["local_main_grad"]
        assert torch.count_nonzero(g[0]) == 0
        assert torch.count_nonzero(g[1:30].abs().sum(1)) == 29
    assert torch.equal(r1["new"]["local_main_grad"], r1["old"]["local_main_grad"])


def _lookup_node(t: torch.Tensor) -> str:
    """The name of the autograd node that looked ``t``'s rows up (below the TP reduction)."""
    todo, seen = [t.grad_fn], []
    while todo:
        node = todo.pop()
        if node is not None:
            seen.append(type(node).__name__)
            todo.extend(fn for fn, _ in node.next_functions)
    found = [n for n in seen if n in ("EmbeddingBackward0", "_LookupIntoMainGradBackward")]
    assert len(found) == 1, seen
    return found[0]


def _bare_and_frozen() -> dict:
    """No DDP (a bare decoder), a frozen embedding and evaluation (no grad mode): megatron-core's path,
    even with the switch on."""
    from packed_workers import tiny_overrides

    from megatron_bluelm.config.loader import load_config
    from megatron_bluelm.models.decoder import build_decoder
    from megatron_bluelm.models.init import init_decoder_
    from megatron_bluelm.parallel.setup import setup_parallel, teardown
    from megatron_bluelm.training.loop import prepare_config
    from megatron_bluelm.training.model_setup import use_fused_wgrad_accumulation

    cfg = load_config(None, tiny_overrides(SMALL))
    prepare_config(cfg)
    setup_parallel(1, 1, None, 1, cfg.training.seed, "gloo")  # two ranks: DP2, nothing shared
    try:
        model = build_decoder(cfg, 8192)
        init_decoder_(model, cfg.training.seed, cfg.model.init_std, cfg.model.num_layers)
        emb = model.embedding.word_embeddings
        out = {"class": type(emb).__name__, "state_keys": sorted(model.state_dict())[:3],
               "switched_without_main_grad": use_fused_wgrad_accumulation([model])}
        emb.gradient_accumulation_fusion = True
        ids = _batches(0, 1)[0]["tokens"]
        w = emb.weight.detach().clone().requires_grad_(True)
        want = F.embedding(ids, w)
        want.square().sum().backward()
        got = emb(ids)  # no main_grad: the dense path
        got.square().sum().backward()
        out.update(bare_fn=_lookup_node(got), bare_out=torch.equal(got, want),
                   bare_grad=torch.equal(emb.weight.grad, w.grad))
        emb.weight.main_grad = torch.zeros_like(emb.weight, dtype=torch.float32)  # as DDP gives it
        emb.weight.grad = None
        with torch.no_grad():
            evaluated = emb(ids)
        out.update(eval_out=torch.equal(evaluated, want), eval_fn=evaluated.grad_fn)
        emb.weight.requires_grad_(False)
        frozen = emb(ids)
        emb.gradient_accumulation_fusion = False
        out.update(frozen_out=torch.equal(frozen, want), frozen_grad_fn=frozen.grad_fn,
                   frozen_switched=use_fused_wgrad_accumulation([model]) + emb.gradient_accumulation_fusion)
        emb.weight.requires_grad_(True)
        emb.gradient_accumulation_fusion = True
        unknown = emb(ids)  # tokens the host did not register (as generated on the device): the dense path
        out.update(unknown_fn=_lookup_node(unknown))
        del unknown
        from megatron_bluelm.models.embedding import register_host_tokens

        register_host_tokens(ids, ids.clone())  # what training's forward step does with the loader's copy
        trained = emb(ids)
        trained.square().sum().backward()
        out.update(main_grad_fn=_lookup_node(trained),
                   main_grad=torch.equal(emb.weight.main_grad, w.grad), grad_without_ddp_flag=emb.weight.grad)
        return out
    finally:
        teardown()


def test_no_ddp_frozen_and_evaluation_take_the_dense_path(layouts):
    r = layouts["bare"]
    assert r["class"] == "MainGradVocabParallelEmbedding"
    assert r["switched_without_main_grad"] == 0  # a bare model: nothing has main_grad
    assert r["bare_fn"] == "EmbeddingBackward0" and r["bare_out"] and r["bare_grad"]
    assert r["eval_out"] and r["eval_fn"] is None
    assert r["frozen_out"] and r["frozen_grad_fn"] is None and r["frozen_switched"] == 0
    assert r["unknown_fn"] == "EmbeddingBackward0"  # tokens the host does not know
    # registered tokens, main_grad but no DDP flag: the rows go into main_grad, no placeholder (megatron-core's rule)
    assert r["main_grad_fn"] == "_LookupIntoMainGradBackward" and r["main_grad"]
    assert r["grad_without_ddp_flag"] is None


def _dense_reference(main_grad, ids, grad):
    """main_grad + the dense path's gradient (F.embedding's backward) in fp32."""
    w = torch.zeros(main_grad.shape, requires_grad=True)
    F.embedding(ids, w).backward(grad.float())
    return main_grad + w.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_accumulate_rows_is_the_dense_sum_bit_for_bit_and_deterministic(dtype):
    from megatron_bluelm.models.embedding import accumulate_rows

    gen = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # CPU index_put_(accumulate) would race here; the accumulate must not
    try:
        main = torch.randn(300, 24, generator=gen)
        for _ in range(3):  # micro-batches accumulate
            ids = torch.randint(0, 40, (5000,), generator=gen)  # many repeats; rows 40.. never used
            grad = torch.randn(5000, 24, generator=gen).to(dtype)
            want = _dense_reference(main, ids, grad)
            runs = []
            for _ in range(3):
                got = main.clone()
                accumulate_rows(got, ids, grad)
                runs.append(got)
            assert all(torch.equal(g, want) for g in runs)
            main = runs[0]
        assert torch.equal(main[40:], torch.randn(300, 24, generator=torch.Generator().manual_seed(0))[40:])
    finally:
        torch.set_num_threads(threads)


def test_benchmark_runs_at_a_tiny_size_and_agrees_in_fp32(capsys):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools", "bench"))
    from embedding_grad_bench import main

    main(["--vocab", "300", "--hidden", "16", "--tokens", "200", "--iters", "2", "--dtype", "fp32", "--device", "cpu"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all(all(f"{p} " in line for p in ("dense", "rows", "compact")) for line in lines[1:])
    assert all("max diff from dense: rows 0.0e+00, compact 0.0e+00" in line for line in lines[1:]), lines


@pytest.mark.parametrize("shard", [(0, 300), (0, 150), (150, 300)])
def test_compact_rows_backward_is_the_dense_sum_bit_for_bit(shard):
    """The registered-host-tokens path: the compact gradient of the distinct ids added at their rows
    equals main_grad + the dense gradient exactly, for a full vocabulary and for either TP shard (ids
    outside the shard: a zero output and no row touched); without registration, accumulate_rows."""
    from megatron_bluelm.models.embedding import _host_tokens, _LookupIntoMainGrad, compact_rows, register_host_tokens

    start, end = shard
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 300, (6, 97), generator=gen)
    ids[:, ::3] = 7  # one id in a third of the positions (as <image> in multimodal rows)
    slot, rows, width = compact_rows(ids, start, end)
    inside = (ids >= start) & (ids < end)
    assert torch.equal(rows, torch.unique(ids[inside]) - start)
    assert width == rows.numel() + int(bool((~inside).any()))
    assert bool((slot.view(ids.shape)[~inside] == width - 1).all()) and int(slot.max()) < width
    weight = torch.randn(end - start, 16, generator=gen, requires_grad=True)
    main = torch.randn(end - start, 16, generator=gen)
    grad = torch.randn(6, 97, 16, generator=gen)
    grad[~inside] = 0.0  # what the TP masking leaves for ids of the other shard
    local = torch.where(inside, ids - start, 0)
    want = _dense_reference(main, local, grad)

    weight.main_grad = main.clone()
    out = _LookupIntoMainGrad.apply(local, weight, slot, rows, width)
    out.backward(grad)
    assert torch.equal(weight.main_grad, want)
    assert torch.equal(weight.main_grad[(~torch.isin(torch.arange(end - start), rows))], main[
        ~torch.isin(torch.arange(end - start), rows)])  # rows no id of the shard uses: untouched
    # registration: found by the same tensor, not by another with equal values; CPU ids only
    dev_ids = ids.clone()
    register_host_tokens(dev_ids, ids)
    assert _host_tokens(dev_ids) is ids and _host_tokens(ids.clone()) is None
    with pytest.raises(ValueError, match="differ in shape"):
        register_host_tokens(dev_ids, ids[:, :5])


def test_lookup_without_compact_rows_sums_on_the_device():
    """``_LookupIntoMainGrad`` given no compact rows sums with ``accumulate_rows`` (the device-only way,
    which the module does not take: it measured slower than the dense path on Zipf ids)."""
    from megatron_bluelm.models.embedding import _LookupIntoMainGrad

    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 50, (200,), generator=gen)
    weight = torch.randn(50, 8, generator=gen, requires_grad=True)
    weight.main_grad = torch.zeros(50, 8)
    grad = torch.randn(200, 8, generator=gen)
    _LookupIntoMainGrad.apply(ids, weight).backward(grad)
    assert torch.equal(weight.main_grad, _dense_reference(torch.zeros(50, 8), ids, grad))
