import sys
import types

import pytest
import torch
from _kernel_check import assert_same, rel_err

from bluelm_kernels import FusedRMSNorm, rmsnorm, rmsnorm_ref, use_triton

SHAPES = [(5, 96), (3, 7, 100), (2, 1, 400), (1, 257), (33, 64)]


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_formula(shape):
    x, w = torch.randn(shape), torch.randn(shape[-1])
    assert use_triton(x)
    want = x.double() / (x.double().pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * w.double()
    assert rel_err(rmsnorm(x, w, eps=1e-6), want) < 1e-6


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_forward_backward(shape, with_residual):
    x, w = torch.randn(shape), torch.rand(shape[-1]) + 0.5
    if with_residual:
        r = torch.randn(shape)
        assert_same(lambda a, b, c: rmsnorm(a, b, residual=c),
                    lambda a, b, c: rmsnorm_ref(a, b, residual=c), [x, w, r])
    else:
        assert_same(rmsnorm, rmsnorm_ref, [x, w])


def test_residual_sum_is_returned():
    x, r, w = torch.randn(4, 100), torch.randn(4, 100), torch.ones(100)
    _, s = rmsnorm(x, w, residual=r)
    assert torch.equal(s, x + r)


def test_bf16_io():
    x, w = torch.randn(6, 100, dtype=torch.bfloat16), torch.randn(100, dtype=torch.bfloat16)
    y = rmsnorm(x, w)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, rmsnorm_ref(x.float(), w.float())) < 1e-2


def test_module_convention():
    cfg = types.SimpleNamespace(sequence_parallel=True)
    norm = FusedRMSNorm(cfg, 96, eps=1e-5)
    assert norm.weight.sequence_parallel is True
    assert torch.equal(norm.weight.detach(), torch.ones(96))
    x = torch.randn(3, 96)
    assert rel_err(norm(x), rmsnorm_ref(x, norm.weight)) < 1e-6


def test_bf16_residual():
    x, r = torch.randn(5, 100, dtype=torch.bfloat16), torch.randn(5, 100, dtype=torch.bfloat16)
    w = torch.randn(100, dtype=torch.bfloat16)
    y, s = rmsnorm(x, w, residual=r)
    # The interpreter rounds fp32 -> bf16 differently from torch (GPUs round to nearest even).
    torch.testing.assert_close(s, x + r)
    assert rel_err(y, rmsnorm_ref(x, w, residual=r)[0]) < 1e-2


@pytest.mark.parametrize("tune", [{"fwd_rows": 4, "bwd_rows": 2}, {"fwd_rows": 2, "bwd_rows": 4}])
def test_multi_row_tiles(monkeypatch, tune):
    from bluelm_kernels.rmsnorm import TUNE

    monkeypatch.setitem(TUNE, "fwd_rows", tune["fwd_rows"])
    monkeypatch.setitem(TUNE, "bwd_rows", tune["bwd_rows"])
    monkeypatch.setitem(TUNE, "bwd_res_rows", tune["bwd_rows"])
    x, w, r = torch.randn(7, 100), torch.randn(100), torch.randn(7, 100)
    assert_same(lambda a, b, c: rmsnorm(a, b, residual=c),
                lambda a, b, c: rmsnorm_ref(a, b, residual=c), [x, w, r])


@pytest.mark.parametrize("split,even", [(0, 0), (1, 1)])
@pytest.mark.parametrize("atomic", [0, 1])
@pytest.mark.parametrize("stages", [1, 3])
@pytest.mark.parametrize("m,rows,programs", [(37, 4, 3), (100, 2, 40), (5, 4, 1), (9, 1, 9)])
def test_backward_partial_sums(monkeypatch, split, even, atomic, stages, m, rows, programs):
    # Several row tiles per program (grid-stride), rows not a multiple of the tile, programs
    # with unequal tile counts, > 32 partial rows (several steps of the dW reduction) and
    # H > 64 (several column blocks of it); the loop as is and handed to the pipeliner (stages:
    # the interpreter runs it as written, a GPU issues later tiles' loads early); dW summed in
    # the kernel (atomic) or by the second kernel over partial rows; a row in one
    # padded column block or in two (64 + 64 for H = 100); programs trimmed to equal tile counts.
    from bluelm_kernels.rmsnorm import TUNE

    monkeypatch.setitem(TUNE, "bwd_dw_atomic", atomic)
    monkeypatch.setitem(TUNE, "bwd_split", split)
    monkeypatch.setitem(TUNE, "bwd_even", even)
    monkeypatch.setitem(TUNE, "bwd_rows", rows)
    monkeypatch.setitem(TUNE, "bwd_res_rows", rows)
    monkeypatch.setitem(TUNE, "bwd_stages", stages)
    monkeypatch.setitem(TUNE, "bwd_res_stages", stages)
    monkeypatch.setitem(TUNE, "bwd_programs_cpu", programs)
    x, w, r = torch.randn(m, 100), torch.rand(100) + 0.5, torch.randn(m, 100)
    assert_same(lambda a, b, c: rmsnorm(a, b, residual=c),
                lambda a, b, c: rmsnorm_ref(a, b, residual=c), [x, w, r])
    assert_same(rmsnorm, rmsnorm_ref, [x, w])


def test_atomic_dw_workspace_is_left_zeroed(monkeypatch):
    # The one-launch backward reuses its fp32 accumulator and counter across calls: the last
    # program must hand them back zeroed, or the next call's dW would include this one's.
    mod = sys.modules["bluelm_kernels.rmsnorm"]

    monkeypatch.setitem(mod.TUNE, "bwd_dw_atomic", 1)
    x, w = torch.randn(11, 96), torch.rand(96) + 0.5
    for _ in range(3):  # same shape: same workspace every time
        assert_same(rmsnorm, rmsnorm_ref, [x, w])
    acc, counter = mod._dw_workspace(x.device, 96)
    assert torch.count_nonzero(acc) == 0 and counter.item() == 0


def test_deterministic_mode_sums_partials_in_order(monkeypatch):
    # torch.use_deterministic_algorithms(True) selects the fixed-order two-kernel dW sum:
    # bit-identical dW across calls.
    mod = sys.modules["bluelm_kernels.rmsnorm"]

    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    calls = []
    real = mod._sum_rows
    monkeypatch.setattr(mod, "_sum_rows", lambda p, d: calls.append(p.shape) or real(p, d))
    x, w = torch.randn(13, 96, requires_grad=True), (torch.rand(96) + 0.5).requires_grad_()
    grads = [torch.autograd.grad(rmsnorm(x, w).sum(), (x, w)) for _ in range(2)]
    assert len(calls) == 2
    assert torch.equal(grads[0][1], grads[1][1]) and torch.equal(grads[0][0], grads[1][0])


@pytest.mark.parametrize("h,parts", [(2560, (2048, 512)), (100, (64, 64)), (96, (64, 32)),
                                     (257, (256, 1)), (64, (64, 0)), (4096, (4096, 0))])
def test_backward_column_parts(monkeypatch, h, parts):
    mod = sys.modules["bluelm_kernels.rmsnorm"]
    monkeypatch.setitem(mod.TUNE, "bwd_split", 1)
    assert mod._col_parts(h) == parts
    monkeypatch.setitem(mod.TUNE, "bwd_split", 0)
    assert mod._col_parts(h) == (mod._block(h), 0)


@pytest.mark.parametrize("m,slots,want", [(8192, 264, 256), (4096, 264, 256), (100, 40, 34),
                                          (5, 40, 5), (264, 264, 264)])
def test_backward_programs_get_equal_tiles(monkeypatch, m, slots, want):
    mod = sys.modules["bluelm_kernels.rmsnorm"]
    monkeypatch.setitem(mod.TUNE, "bwd_programs_cpu", slots)
    monkeypatch.setitem(mod.TUNE, "bwd_even", 1)
    p = mod._bwd_programs(m, torch.device("cpu"), 1, 2)
    assert p == want and -(-m // p) == -(-m // min(m, slots))  # no more tiles per program


@pytest.mark.parametrize("h,loads,per_sm,stages,want", [
    (2560, 2, 1, 6, 6),     # the tuned plain case: 6 x 10 KB stages fit
    (2560, 3, 2, 3, 3),     # the tuned residual case: 2 programs x 3 x 15 KB
    (16384, 2, 1, 6, 2),    # 64 KB a stage: 2 fit in 3/4 of 228 KB
    (16384, 3, 2, 3, 1),    # nothing fits twice: no pipelining
    (2560, 2, 1, 1, 1)])
def test_backward_stages_fit_shared_memory(monkeypatch, h, loads, per_sm, stages, want):
    # The pipeliner's stage buffers live in shared memory; with per_sm programs per SM they must
    # fit together, or the persistent grid spills into a second wave (large H).
    mod = sys.modules["bluelm_kernels.rmsnorm"]

    class Props:
        shared_memory_per_multiprocessor = 228 * 1024

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: Props())
    tile = sum(mod._col_parts(h)) * 2 * loads  # bf16, 1 row a tile
    assert mod._bwd_stages(torch.device("cuda"), stages, per_sm, tile) == want
    assert mod._bwd_stages(torch.device("cpu"), stages, per_sm, tile) == stages


def test_register_cap_applies_to_cuda_launches_only(monkeypatch):
    mod = sys.modules["bluelm_kernels.rmsnorm"]
    assert mod._reg_cap(torch.device("cuda")) == {}  # default: the compiler's choice
    monkeypatch.setitem(mod.TUNE, "bwd_maxnreg", 80)
    assert mod._reg_cap(torch.device("cuda")) == {"maxnreg": 80}
    assert mod._reg_cap(torch.device("cpu")) == {}  # the interpreter takes no PTX options


@pytest.mark.parametrize("shape", SHAPES)
def test_passthrough_equals_the_norm_and_its_input(shape):
    """rmsnorm_passthrough(x) = (rmsnorm(x), x), the second output's gradient added inside the norm's
    backward (one autograd node)."""
    from bluelm_kernels.rmsnorm import rmsnorm_passthrough

    x, w = torch.randn(shape), torch.rand(shape[-1]) + 0.5
    assert_same(rmsnorm_passthrough, lambda a, b: (rmsnorm_ref(a, b), a), [x, w])
    xl = x.clone().requires_grad_()
    y, x2 = rmsnorm_passthrough(xl, w)
    assert torch.equal(x2, x) and x2.grad_fn is y.grad_fn
